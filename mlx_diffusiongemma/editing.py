"""Infill, edit and score: what a canvas-at-once model can do that a left-to-right one cannot.

- `infill` / `stream_infill`: a template with named holes; fixed text pinned, holes denoised.
- `fill_json`: a small JSON schema -> a template whose structure is pinned; the output parses.
- `edit` / `stream_edit`: start canvases from existing text (warm start) with a fraction of
  positions renoised, or rewrite marked spans with everything else pinned.
- `score`: a template with option slots read in ONE decoder pass (no denoising loop).

The stream variants yield the engine's events (`StepEvent` with `.pinned`, `BlockEvent`,
`GenerationResult`) and then one `InfillResult`. Library code never prints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import template as tpl
from .canvas import CanvasState
from .engine import NoiseSource, run
from .events import GenerationResult
from .generate import make_request, prompt_ids
from .template import Fixed, Hole, Layout, TemplateError


@dataclass
class InfillResult:
    """A filled template: `text` (fixed text with every hole's value), `holes` (name -> value),
    `details` (name -> tokens, and whether the value ended early / filled its whole hole),
    `result` (the engine's GenerationResult: steps, tokens_per_forward, seed...)."""

    text: str
    holes: dict[str, str]
    details: dict[str, dict]
    result: GenerationResult
    value: Any = None  # fill_json: the parsed object
    segments: list = field(default_factory=list)  # the template's fixed text and holes, in order

    def to_json(self) -> dict:
        out = {"text": self.text, "holes": dict(self.holes),
               "steps_per_block": list(self.result.steps_per_block),
               "decoder_passes": self.result.extra.get("decoder_passes"),
               "seed": self.result.extra.get("seed")}
        if self.value is not None:
            out["value"] = self.value
        return out


def _end_ids(model) -> set[int]:
    gen = model.generation
    return set(gen.eos_token_ids) | {gen.pad_token_id}


def _prepare(model, tokenizer, prompt, segments, thinking: bool) -> tuple[list[int], Layout]:
    """Everything checked before any model work: template, tokenization, context."""
    lay = tpl.layout(tokenizer, segments)
    ids = prompt_ids(tokenizer, prompt, thinking)
    tpl.check_context(lay, model, len(ids))
    return ids, lay


def _run_layout(model, tokenizer, ids: list[int], lay: Layout, options: dict, *, warm=None,
                allowed_rows=None) -> Iterator:
    """Run the engine over the template's canvases; yields events, then the InfillResult."""
    c = model.canvas_length
    if allowed_rows is None:
        allowed_rows = _allowed_rows(tokenizer, model, lay)
    states = tpl.states(lay, c, model.vocab_size, warm=warm, allowed_rows=allowed_rows)
    slots = [h for h in lay.holes if h.option_ids is not None]
    slot_rows = [p for h in slots for p in range(h.start, h.start + h.length)]
    captured: dict[tuple[int, int], tuple[list[int], mx.array]] = {}

    def capture(view):
        # Log-probabilities at option-slot positions of every step; the committing step's pick
        # the best option (a slot may straddle two canvases).
        rows = [p for p in slot_rows if p // c == view.block]
        if rows and view.processed_logits is not None:  # (fast mode has no full logits)
            lp = _log_softmax(view.processed_logits[mx.array([p - view.block * c for p in rows])])
            mx.async_eval(lp)
            captured[(view.block, view.step)] = (rows, lp)
        return None

    request = make_request(ids, dict(options, max_tokens=len(states) * c))
    request = replace(request, canvases=states, stop_at_eos=False, hooks=(capture,) if slots else ())
    result = None
    for event in run(model, request, decode=tokenizer.decode, detokenizer=tokenizer.detokenizer):
        if isinstance(event, GenerationResult):
            result = event
        yield event
    tokens = list(result.tokens)
    end = _end_ids(model)
    final = {}
    for block in {p // c for p in slot_rows}:
        if (block, result.steps_per_block[block]) in captured:
            rows, lp = captured[(block, result.steps_per_block[block])]
            final.update({p: row for p, row in zip(rows, np.array(lp))})
    for h in slots:  # resolve each option slot from the committing step's probabilities
        span = range(h.start, h.start + h.length)
        if all(p in final for p in span):
            scores = _option_scores(np.stack([final[p] for p in span]), h.option_ids, end)
        else:  # no logits (fast mode): the option that agrees with most committed tokens
            committed = tokens[h.start:h.start + h.length]
            scores = np.array([sum(a == b for a, b in zip(committed, o + [min(end)] * h.length)) for o in h.option_ids])
        best = h.option_ids[int(np.argmax(scores))]
        tokens[h.start:h.start + h.length] = best + [min(end)] * (h.length - len(best))
    details = tpl.hole_values(tokenizer, lay, tokens, end)
    values = {k: v["text"] for k, v in details.items()}
    yield InfillResult(tpl.fill_text(lay, values), values, details, result, segments=list(lay.segments))


def _log_softmax(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _option_scores(logp: mx.array, option_ids: Sequence[Sequence[int]], end_ids: set[int]) -> np.ndarray:
    """Log-probability of each option on a slot: its tokens at its positions, an end token (any of
    them) at the slot's unused positions -- the hole rule of template.py."""
    lp = np.asarray(logp, dtype=np.float32)
    ends = sorted(end_ids)
    end_lp = np.logaddexp.reduce(lp[:, ends], axis=-1)
    out = []
    for ids in option_ids:
        s = sum(lp[i, t] for i, t in enumerate(ids)) + end_lp[len(ids):].sum()
        out.append(float(s))
    return np.array(out)


def stream_infill(model, tokenizer, prompt, template: str, *, thinking: bool = False, **options: Any) -> Iterator:
    """`infill` as events (see the module docstring); the last item is the InfillResult."""
    ids, lay = _prepare(model, tokenizer, prompt, tpl.parse(template), thinking)
    yield from _run_layout(model, tokenizer, ids, lay, options)


def infill(model, tokenizer, prompt, template: str, *, thinking: bool = False, **options: Any) -> InfillResult:
    """Fill the holes of `template` as the reply to `prompt` (a string, messages or ids).

    Options are `stream_generate`'s (`seed`, sampler knobs, ...) except `max_tokens`, which the
    template sets. Raises TemplateError (before any work) for a bad template."""
    if "max_tokens" in options:
        raise TypeError("infill takes no max_tokens: the template sets the length")
    out = None
    for item in stream_infill(model, tokenizer, prompt, template, thinking=thinking, **options):
        out = item
    return out


# -- JSON ------------------------------------------------------------------------------------------

_JSON_TYPES = ("string", "integer", "number", "boolean")


def json_segments(schema: dict, string_tokens: int = 16, number_tokens: int = 6) -> list[tpl.Segment]:
    """A template for an object schema (string / integer / number / boolean / enum fields): keys,
    quotes and punctuation fixed, one hole per value. Numbers are written as whole numbers,
    non-negative unless the schema's `minimum` is negative."""
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise TemplateError("the JSON schema must be an object schema with 'properties'")
    props = schema["properties"]
    if not props:
        raise TemplateError("the JSON schema has no properties")
    segments: list[tpl.Segment] = []
    text = "{"
    for i, (key, spec) in enumerate(props.items()):
        if not isinstance(spec, dict):
            raise TemplateError(f"property {key!r}: its schema must be an object")
        name = f"f{i}"
        # Compact separators: no space before a value, so that tokenizers that join a space to
        # the next word do not see a pinned lone space before a hole (see template.check_merges).
        text += ("" if i == 0 else ",") + json.dumps(key, ensure_ascii=False) + ":"
        if "enum" in spec:
            options = spec["enum"]
            if not options or not all(isinstance(o, str) for o in options):
                raise TemplateError(f"property {key!r}: only non-empty enums of strings are supported")
            segments += [Fixed(text + '"'), Hole(name, None, options=tuple(options))]
            text = '"'
        elif spec.get("type") == "boolean":
            segments += [Fixed(text), Hole(name, None, options=("true", "false"))]
            text = ""
        elif spec.get("type") == "string":
            n = int(spec.get("maxLength", string_tokens))
            segments += [Fixed(text + '"'), Hole(name, max(1, n), exact=False, allowed="string")]
            text = '"'
        elif spec.get("type") in ("integer", "number"):
            minimum = spec.get("minimum")
            kind = "signed" if isinstance(minimum, (int, float)) and minimum < 0 else "integer"
            segments += [Fixed(text), Hole(name, number_tokens, exact=False, allowed=kind)]
            text = ""
        else:
            raise TemplateError(f"property {key!r}: type {spec.get('type')!r} is not supported "
                                f"(use one of {', '.join(_JSON_TYPES)} or an enum of strings)")
    segments.append(Fixed(text + "}"))
    return [s for s in segments if not (isinstance(s, Fixed) and not s.text)]


def _token_texts(tokenizer, vocab: int) -> list[str]:
    return [tokenizer.decode([i]) for i in range(vocab)]


def _special_ids(tokenizer) -> list[int]:
    """Control tokens (chat markers, BOS...): never part of a generated value."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i in added}
    return sorted(ids)


def _allowed_rows(tokenizer, model, lay: Layout) -> dict[int, np.ndarray]:
    """Per template position, the tokens a constrained hole may take (end tokens always)."""
    v = model.vocab_size
    end = sorted(_end_ids(model))
    texts = None
    rows: dict[int, np.ndarray] = {}
    for h in lay.holes:
        if h.allowed is None and h.option_ids is None:
            continue
        if h.option_ids is not None:  # option slots: only the options' tokens
            row = np.zeros(v, dtype=bool)
            row[[t for o in h.option_ids for t in o]] = True
            row[end] = True
            for p in range(h.start, h.start + h.length):
                rows[p] = row
            continue
        texts = texts or _token_texts(tokenizer, v)
        if isinstance(h.allowed, tuple):  # a set of allowed token texts (e.g. Sudoku digits)
            row = np.array([t in h.allowed for t in texts])
            row[end] = not h.exact
            for p in range(h.start, h.start + h.length):
                rows[p] = row
        elif h.allowed == "string":  # no quote, backslash or control character: any mix is a JSON string
            row = np.array([bool(t) and not any(ch in '"\\' or ord(ch) < 32 for ch in t) for t in texts])
            row[[i for i in _special_ids(tokenizer) if i < v]] = False
            row[end] = True
            for p in range(h.start, h.start + h.length):
                rows[p] = row
        elif h.allowed in ("integer", "signed"):
            # Digits, then digits or an end token: every outcome is a whole number (leading zeros
            # are dropped when parsing). "signed" lets the first position be "-" and then needs a
            # digit at the second, so that "-" alone cannot occur.
            digits = np.array([bool(t) and t.isascii() and t.isdigit() for t in texts])
            with_end = digits.copy()
            with_end[end] = True
            signed = h.allowed == "signed" and h.length > 1
            for k, p in enumerate(range(h.start, h.start + h.length)):
                if k == 0:
                    rows[p] = digits | (np.array([t == "-" for t in texts]) if signed else False)
                elif k == 1 and signed:
                    rows[p] = digits
                else:
                    rows[p] = with_end
    return rows


def _json_value(spec: dict, text: str):
    if "enum" in spec or spec.get("type") == "string":
        return text
    if spec.get("type") == "boolean":
        return text == "true"
    return int(text)  # digits with an optional sign (the masks guarantee it)


def stream_fill_json(model, tokenizer, prompt, schema: dict, *, thinking: bool = False, **options: Any) -> Iterator:
    segments = json_segments(schema)
    ids, lay = _prepare(model, tokenizer, prompt, segments, thinking)
    out = None
    for item in _run_layout(model, tokenizer, ids, lay, options):
        if isinstance(item, InfillResult):
            out = item
            break
        yield item
    specs = list(schema["properties"].items())
    value = {}
    holes = {}
    for i, (key, spec) in enumerate(specs):
        raw = out.holes[f"f{i}"]
        if spec.get("type") in ("integer", "number") and "enum" not in spec:
            if raw in ("", "-"):  # cannot happen with the masks; kept as a guard
                raise TemplateError(f"the model wrote no number for {key!r}")
            raw = str(int(raw))
        holes[key] = raw
        value[key] = _json_value(spec, raw)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # as pinned on the canvas
    yield InfillResult(text, holes, out.details, out.result, value=value)


def fill_json(model, tokenizer, prompt, schema: dict, *, thinking: bool = False, **options: Any) -> InfillResult:
    """Fill a JSON object for a small schema; `.value` is the parsed object, `.text` its JSON.

    Keys and punctuation are pinned; string values cannot contain a quote, a backslash or a
    control character, integers are digits with an optional sign, enums and booleans are read as
    the best option on the committing step. The text therefore always parses and matches."""
    out = None
    for item in stream_fill_json(model, tokenizer, prompt, schema, thinking=thinking, **options):
        out = item
    return out


# -- edit ------------------------------------------------------------------------------------------


def _span_segments(text: str, spans: Sequence[tuple[int, int]], slack: int, tokenizer) -> list[tpl.Segment]:
    spans = sorted(spans)
    segments: list[tpl.Segment] = []
    pos = 0
    for i, (a, b) in enumerate(spans):
        if not (0 <= a < b <= len(text)) or a < pos:
            raise TemplateError(f"span {a}:{b} is empty, outside the text or overlaps another")
        if a > pos:
            segments.append(Fixed(text[pos:a]))
        n = len(tpl._encode(tokenizer, text[a:b]))
        segments.append(Hole(f"span{i}", n + slack, exact=False))
        pos = b
    if pos < len(text):
        segments.append(Fixed(text[pos:]))
    return segments


def find_span(text: str, needle: str) -> tuple[int, int]:
    """Character span of the first occurrence of `needle` in `text` (TemplateError if absent)."""
    start = text.find(needle)
    if not needle or start < 0:
        raise TemplateError(f"{needle!r} does not occur in the text")
    return start, start + len(needle)


def stream_edit(model, tokenizer, text: str, instruction: str, *, strength: float = 0.5,
                spans: Sequence[tuple[int, int]] | None = None, slack: int = 4, include_text: bool = True,
                context: Sequence[dict] | None = None, thinking: bool = False,
                max_tokens: int | None = None, **options: Any) -> Iterator:
    """`edit` as events; the last item is an InfillResult (holes are the spans, if any)."""
    if not text:
        raise TemplateError("nothing to edit: the text is empty")
    c = model.canvas_length
    prompt = f"{instruction}\n\n{text}" if include_text else instruction
    if context:  # earlier turns of a conversation, then the instruction as the user's message
        prompt = list(context) + [{"role": "user", "content": prompt}]
    if spans:
        segments = _span_segments(text, spans, slack, tokenizer)
        ids, lay = _prepare(model, tokenizer, prompt, segments, thinking)
        yield from _run_layout(model, tokenizer, ids, lay, options)
        return
    if not 0.0 <= strength <= 1.0:
        raise ValueError("strength must be between 0 and 1")
    tokens = tpl._encode(tokenizer, text)
    ids = prompt_ids(tokenizer, prompt, thinking)
    n_blocks = max(math.ceil(len(tokens) / c), math.ceil((max_tokens or 0) / c))
    seed = options.get("seed")
    noise = NoiseSource(seed)
    options = dict(options, seed=noise.seed)
    rng = np.random.default_rng(noise.seed)
    renoise = rng.random(len(tokens)) < strength
    warm = [-1 if r else t for t, r in zip(tokens, renoise)]
    lay = Layout([Fixed(text)], [-1] * len(tokens), [], [])
    tpl.check_context(lay, model, len(ids))
    states = []
    for b in range(n_blocks):
        part = warm[b * c:(b + 1) * c]
        part = part + [-1] * (c - len(part))
        states.append(CanvasState.from_lists(c, warm=[max(t, 0) for t in part], warm_mask=[t >= 0 for t in part]))
    request = make_request(ids, dict(options, max_tokens=n_blocks * c))
    request = replace(request, canvases=states)
    result = None
    for event in run(model, request, decode=tokenizer.decode, detokenizer=tokenizer.detokenizer):
        if isinstance(event, GenerationResult):
            result = event
        yield event
    yield InfillResult(result.text, {}, {}, result)


def edit(model, tokenizer, text: str, instruction: str, **options: Any) -> InfillResult:
    """Rewrite `text` following `instruction` (the prompt).

    Without `spans`: the canvases start from `text` with a `strength` fraction of positions
    renoised (all positions stay live, as the reference's starting canvas); the reply may end
    early (EOS) and `max_tokens` may add canvases after the text. With `spans` (character
    ranges, see `find_span`): everything outside the spans is pinned, each span is rewritten from
    noise into a hole of up to its token count + `slack` tokens (the template hole rule).
    The prompt is the instruction followed by the text (`include_text=False`: the instruction
    alone; the canvas then carries the text), after the `context` messages if given."""
    out = None
    for item in stream_edit(model, tokenizer, text, instruction, **options):
        out = item
    return out


# -- structured read -------------------------------------------------------------------------------


@dataclass
class SlotScore:
    choice: str
    probabilities: dict[str, float]  # over the options, summing to 1
    confidence: float  # probability of the choice
    margin: float  # choice minus the runner-up


@dataclass
class ScoreResult:
    slots: dict[str, SlotScore]
    decoder_passes: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def choice(self) -> str:
        return next(iter(self.slots.values())).choice

    @property
    def probabilities(self) -> dict[str, float]:
        return next(iter(self.slots.values())).probabilities

    @property
    def confidence(self) -> float:
        return next(iter(self.slots.values())).confidence

    def to_json(self) -> dict:
        return {"slots": {k: vars(v) for k, v in self.slots.items()}, "decoder_passes": self.decoder_passes}


def score(model, tokenizer, prompt, options: Sequence[str] | dict[str, Sequence[str]], *,
          template: str = "{{answer}}", seed: int = 0, thinking: bool = False) -> ScoreResult:
    """Read option probabilities from ONE decoder pass, without sampling.

    The template (default: the whole reply is one slot) is put on the first canvas: fixed text
    pinned, each `{{slot}}` as noise, exactly as a denoising loop's first step sees it. One
    decoder pass gives per-position probabilities; an option's score is the log-probability of
    its tokens at the slot's positions and of an end token at the slot's unused ones; the
    probabilities are those scores normalised over the options. `options` is a list (for a
    single slot) or {slot name: options}."""
    segments = tpl.parse(template)
    slot_names = [s.name for s in segments if isinstance(s, Hole)]
    if not isinstance(options, dict):
        if len(slot_names) != 1:
            raise TemplateError(f"the template has {len(slot_names)} slots: give options as {{name: [...]}}")
        options = {slot_names[0]: list(options)}
    if set(options) != set(slot_names):
        raise TemplateError(f"options are given for {sorted(options)}, the template's slots are {sorted(slot_names)}")
    segments = [replace(s, options=tuple(options[s.name])) if isinstance(s, Hole) else s for s in segments]
    ids, lay = _prepare(model, tokenizer, prompt, segments, thinking)
    c = model.canvas_length
    if lay.length > c:
        raise TemplateError(f"a scoring template must fit one canvas ({c} tokens); this one has {lay.length}")
    state = tpl.states(lay, c, model.vocab_size)[0]
    noise = NoiseSource(seed)
    canvas = mx.where(state.pinned, state.ids, noise.canvas(0, 1, c, model.vocab_size)[0])[None]
    cache = model.make_cache()
    model.extend(cache, ids)
    logits = model.denoise(canvas, cache, None)
    logp = _log_softmax(logits[0])
    end = _end_ids(model)
    slots = {}
    for h in lay.holes:
        scores = _option_scores(logp[h.start:h.start + h.length], h.option_ids, end)
        p = np.exp(scores - np.logaddexp.reduce(scores))
        order = np.argsort(-p)
        probs = {o: float(q) for o, q in zip(h.options, p)}
        best = h.options[int(order[0])]
        runner = float(p[order[1]]) if len(order) > 1 else 0.0
        slots[h.name] = SlotScore(best, probs, float(p[order[0]]), float(p[order[0]]) - runner)
    return ScoreResult(slots, 1, {"seed": noise.seed, "prompt_tokens": len(ids)})
