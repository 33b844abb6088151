"""Templates with named holes -> canvas states: the fixed text is tokenized and pinned, holes are denoised.

Syntax: text with holes `{{name:N}}` (exactly N tokens) or `{{name:..N}}` (at most N tokens).
A hole without a length, `{{name}}`, is an option slot for `score` (its length is the longest option).
Write `\\{{` for a literal `{{`. Names are identifiers and unique within a template.

Rule for the unused positions of a hole: a hole's value is its tokens up to (not including) the
first end token -- any of the checkpoint's EOS ids or its pad id -- and everything after that
inside the hole is ignored. The model fills every position of a hole; in an `..N` hole it ends the
value early by writing an end token (in a fixed-length hole an end token is a shortfall, reported).

Everything is checked before any work (`TemplateError`): unknown hole syntax, duplicate names,
zero or oversized lengths, a template longer than the context, fixed text that does not survive
the tokenizer, and fixed text whose edge next to a hole the tokenizer merges with a typical
first (last) letter or digit of the hole (the pinned tokens would then be a split the model never sees: move the
whitespace into the hole, e.g. `Name:{{name:..8}}` instead of `Name: {{name:..8}}` for tokenizers
that attach spaces to the next word).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..diffusion.canvas import CanvasState
from ..errors import DiffusionGemmaError

MAX_HOLE_TOKENS = 4096
MAX_TEMPLATE_CHARS = 200_000
# All holes together: far above any context (the released model's is 131072), far below what
# would fill memory before the context check (thousands of 4096-token holes fit in 200k characters).
MAX_TEMPLATE_HOLE_TOKENS = 1 << 20
_HOLE = re.compile(r"\{\{(.*?)\}\}", re.S)
_HOLE_BODY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*(\.\.)?\s*(\d+)\s*)?$")
# Characters a hole's value typically starts / ends with: if the tokenizer merges a fixed edge
# with any of them, the pinned split is one it would not make for such a value.
_PROBES = ("a", "e", "s", "t", "A", "S", "T", "1", "2")


class TemplateError(DiffusionGemmaError):
    """A template that cannot be filled as written (raised before any model work)."""


@dataclass(frozen=True)
class Fixed:
    text: str


@dataclass(frozen=True)
class Hole:
    name: str
    length: int | None  # None: an option slot (score)
    exact: bool = True  # False: `..N`, at most N tokens
    options: tuple[str, ...] | None = None  # option texts (score, enums)
    # Optional allowed tokens: "string" / "integer" / "signed" (JSON values) or a tuple of token
    # texts; None: any token.
    allowed: object = None
    probes: tuple[str, ...] | None = None  # typical values, for the merge check (default: letters, digits)


Segment = Fixed | Hole


def parse(template: str) -> list[Segment]:
    """Split a template into fixed text and holes; raises TemplateError on bad syntax."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template is {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}")
    segments: list[Segment] = []
    names: set[str] = set()
    text: list[str] = []
    pos = 0
    while pos < len(template):
        if template.startswith("\\{{", pos):
            text.append("{{")
            pos += 3
            continue
        if template.startswith("{{", pos):
            m = _HOLE.match(template, pos)
            if m is None:
                raise TemplateError(f"unclosed hole at character {pos}: {template[pos:pos + 20]!r} "
                                    "(write \\{{ for a literal '{{')")
            body = _HOLE_BODY.match(m.group(1))
            if body is None:
                raise TemplateError(
                    f"unknown hole syntax {m.group(0)!r} at character {pos}: use {{{{name:N}}}} (N tokens), "
                    "{{name:..N}} (at most N tokens) or {{name}} (an option slot)")
            name, upto, length = body.group(1), body.group(2), body.group(3)
            if name in names:
                raise TemplateError(f"hole name {name!r} is used twice")
            names.add(name)
            n = None if length is None else int(length)
            if n is not None and not 1 <= n <= MAX_HOLE_TOKENS:
                raise TemplateError(f"hole {name!r} has length {n}; holes take 1 to {MAX_HOLE_TOKENS} tokens")
            if text:
                segments.append(Fixed("".join(text)))
                text = []
            segments.append(Hole(name, n, exact=upto is None))
            pos = m.end()
            continue
        text.append(template[pos])
        pos += 1
    if text:
        segments.append(Fixed("".join(text)))
    total = sum(s.length or 0 for s in segments if isinstance(s, Hole))
    if total > MAX_TEMPLATE_HOLE_TOKENS:
        raise TemplateError(f"the holes add up to {total} tokens; a template takes at most {MAX_TEMPLATE_HOLE_TOKENS}")
    if not any(isinstance(s, Hole) for s in segments):
        raise TemplateError("the template has no holes: write {{name:N}} where the model should write")
    return segments


def encode(tokenizer, text: str) -> list[int]:
    """The token ids of `text` alone (no special tokens): how fixed text is pinned."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))


def _probes(hole: Hole) -> tuple[str, ...]:
    """Typical first / last characters of what the hole will hold."""
    if hole.probes:
        return hole.probes
    if hole.allowed in ("integer", "signed"):
        return ("1", "7")
    if isinstance(hole.allowed, tuple) and hole.allowed:
        return tuple(hole.allowed[:2])
    if hole.options:
        return tuple(hole.options[:2])
    return _PROBES


def _can_start_apart(tokenizer, text: str, ids: Sequence[int], hole: Hole) -> bool:
    """Whether a free hole after fixed `text` can hold a value that keeps the pinned split: `text`
    ends in a visible character and a value that starts with a space does not merge with it
    (`a b d{{x:1}} o q` with a merge `d e`: " e" keeps `d` apart). Only a hole the model may fill
    with any token can; an option slot or a constrained hole holds what its options say."""
    if not text[-1:].strip() or hole.options is not None or hole.allowed is not None or hole.probes:
        return False
    return all(encode(tokenizer, text + " " + p)[: len(ids)] == list(ids) for p in _PROBES)


def check_merges(tokenizer, segments: Sequence[Segment]) -> None:
    """TemplateError if a fixed segment does not round-trip, or its edge next to a hole is one the
    tokenizer merges with a typical character of the hole (a letter or digit; a constrained
    hole's own options) and no value of the hole can keep it apart (a free hole's value may start
    with a space: see `_can_start_apart`)."""
    for i, seg in enumerate(segments):
        if not isinstance(seg, Fixed):
            continue
        ids = encode(tokenizer, seg.text)
        if _decode(tokenizer, ids) != seg.text:
            raise TemplateError(f"fixed text {seg.text!r} does not survive the tokenizer "
                                f"(it decodes as {_decode(tokenizer, ids)!r}): unknown characters?")
        if i + 1 < len(segments) and isinstance(segments[i + 1], Hole):
            hole = segments[i + 1]
            if any(encode(tokenizer, seg.text + p)[: len(ids)] != ids for p in _probes(hole)) and \
                    not _can_start_apart(tokenizer, seg.text, ids, hole):
                raise TemplateError(
                    f"the fixed text {seg.text!r} before hole {segments[i + 1].name!r} ends in a token the "
                    f"tokenizer merges with the next word, so pinning it contradicts the tokenizer's merges: "
                    f"move {seg.text[-1]!r} into the hole (or end the fixed text differently)")
        if i > 0 and isinstance(segments[i - 1], Hole):
            if any(encode(tokenizer, p + seg.text)[-len(ids):] != ids for p in _probes(segments[i - 1])):
                raise TemplateError(
                    f"the fixed text {seg.text!r} after hole {segments[i - 1].name!r} starts with a token the "
                    f"tokenizer merges with the previous word, so pinning it contradicts the tokenizer's "
                    f"merges: move {seg.text[0]!r} into the hole (or start the fixed text differently)")


@dataclass
class HoleSpan:
    name: str
    start: int  # position in the template's token sequence
    length: int
    exact: bool
    options: tuple[str, ...] | None = None
    option_ids: list[list[int]] | None = None
    allowed: object = None


@dataclass
class Layout:
    """A template laid out on canvases: `ids` (pinned token or -1 for hole positions) and holes."""

    segments: list[Segment]
    ids: list[int]  # -1 at hole positions
    holes: list[HoleSpan]
    fixed: list[tuple[int, str]] = field(default_factory=list)  # (token start, text) per fixed segment

    @property
    def length(self) -> int:
        return len(self.ids)

    def blocks(self, canvas_length: int) -> int:
        return max(1, math.ceil(self.length / canvas_length))


def layout(tokenizer, segments: Sequence[Segment], *, check: bool = True) -> Layout:
    """Tokenize the fixed text, size the holes (option slots take their longest option)."""
    if check:
        check_merges(tokenizer, segments)
    ids: list[int] = []
    holes: list[HoleSpan] = []
    fixed: list[tuple[int, str]] = []
    for seg in segments:
        if isinstance(seg, Fixed):
            fixed.append((len(ids), seg.text))
            ids.extend(encode(tokenizer, seg.text))
            continue
        option_ids = None
        length = seg.length
        if seg.options is not None:
            if not seg.options:
                raise TemplateError(f"slot {seg.name!r} has no options")
            option_ids = [encode(tokenizer, o) for o in seg.options]
            if any(not o for o in option_ids):
                raise TemplateError(f"slot {seg.name!r} has an empty option")
            if len({tuple(o) for o in option_ids}) != len(option_ids):
                raise TemplateError(f"slot {seg.name!r} has options that tokenize the same")
            longest = max(map(len, option_ids))
            if length is None:
                length = longest
            elif longest > length:
                raise TemplateError(f"an option of slot {seg.name!r} has {longest} tokens; the slot has {length}")
        if length is None:
            raise TemplateError(f"hole {seg.name!r} needs a length ({{{{{seg.name}:N}}}}) or options")
        holes.append(HoleSpan(seg.name, len(ids), length, seg.exact and seg.options is None, seg.options,
                              option_ids, seg.allowed))
        ids.extend([-1] * length)
    return Layout(list(segments), ids, holes, fixed)


def check_context(lay: Layout, model, prompt_len: int) -> None:
    """TemplateError when the prompt plus the template's canvases exceed the context."""
    c = model.canvas_length
    limit = model.text.max_position_embeddings
    for h in lay.holes:
        if h.length > limit:
            raise TemplateError(f"hole {h.name!r} ({h.length} tokens) is longer than the model's context ({limit})")
    need = prompt_len + lay.blocks(c) * c
    if need > limit:
        raise TemplateError(f"prompt ({prompt_len} tokens) plus the template ({lay.length} tokens, "
                            f"{lay.blocks(c)} canvas(es) of {c}) needs {need} positions; the context is {limit}")
    plan = getattr(model, "memory_plan", None)  # the loader's memory plan, as engine.check_fits applies it
    if plan is not None:
        plan.check_request(need)


def states(lay: Layout, canvas_length: int, vocab_size: int, *, warm: Sequence[int] | None = None,
           allowed_rows: dict[int, np.ndarray] | None = None) -> list[CanvasState]:
    """One CanvasState per canvas: fixed tokens pinned, holes (and the tail after the template) live.

    `warm` (template positions -> token, -1 for noise) starts hole positions from given tokens;
    `allowed_rows` maps template positions to `[V]` bool rows of the tokens they may take."""
    c = canvas_length
    out = []
    for b in range(lay.blocks(c)):
        part = lay.ids[b * c:(b + 1) * c]
        pins = {i: t for i, t in enumerate(part) if t >= 0}
        warm_part = warm_mask = None
        if warm is not None:
            w = list(warm[b * c:(b + 1) * c]) + [-1] * (c - len(part))
            warm_mask = [t >= 0 for t in w]
            warm_part = [max(t, 0) for t in w]
        allowed = None
        rows = {p - b * c: r for p, r in (allowed_rows or {}).items() if b * c <= p < (b + 1) * c}
        if rows:
            table = np.ones((c, vocab_size), dtype=bool)
            for i, row in rows.items():
                table[i] = row
            allowed = mx.array(table)
        out.append(CanvasState.from_lists(c, pins, warm=warm_part, warm_mask=warm_mask, allowed=allowed))
    return out


def hole_values(tokenizer, lay: Layout, tokens: Sequence[int], end_ids: set[int]) -> dict[str, dict]:
    """Each hole's value by the end-token rule: `{name: {"text", "tokens", "ended", "full"}}`."""
    out = {}
    for h in lay.holes:
        span = list(tokens[h.start:h.start + h.length])
        cut = next((i for i, t in enumerate(span) if t in end_ids), len(span))
        value = span[:cut]
        out[h.name] = {"text": _decode(tokenizer, value), "tokens": value, "ended": cut < len(span),
                       "full": cut == len(span)}
    return out


def filled_ids(tokenizer, lay: Layout, values: dict[str, str], end_id: int) -> list[int]:
    """The token sequence a model should write for `values` on this layout: the pinned ids, and in
    each hole its value's tokens followed by `end_id` up to the hole's length (the end-token rule
    above). This is what template-shaped training examples are made of (scripts/train_demo.py):
    a model that never saw an end token inside a canvas does not end a short value early."""
    ids = list(lay.ids)
    for h in lay.holes:
        value = encode(tokenizer, values[h.name])
        if len(value) > h.length:
            raise TemplateError(f"the value of {h.name!r} has {len(value)} tokens; the hole has {h.length}")
        if h.exact and len(value) != h.length:
            raise TemplateError(f"the value of {h.name!r} has {len(value)} tokens; the hole needs exactly {h.length}")
        ids[h.start:h.start + h.length] = value + [end_id] * (h.length - len(value))
    return ids


def fill_text(lay: Layout, values: dict[str, str]) -> str:
    """The template's text with each hole replaced by its value."""
    parts = []
    for seg in lay.segments:
        parts.append(seg.text if isinstance(seg, Fixed) else values[seg.name])
    return "".join(parts)


# -- constraints: the tokens a constrained hole may take ------------------------------------------


def token_texts(tokenizer, vocab: int) -> list[str]:
    """Every token's text decoded alone."""
    return [tokenizer.decode([i]) for i in range(vocab)]


def special_ids(tokenizer) -> list[int]:
    """Control tokens (chat markers, BOS...): never part of a generated value."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i in added}
    return sorted(ids)


def allowed_rows(tokenizer, model, lay: Layout) -> dict[int, np.ndarray]:
    """Per template position, the tokens a constrained hole may take (end tokens always)."""
    v = model.vocab_size
    end = sorted(end_ids(model))
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
        texts = texts or token_texts(tokenizer, v)
        if isinstance(h.allowed, tuple):  # a set of allowed token texts (e.g. Sudoku digits)
            row = np.array([t in h.allowed for t in texts])
            row[end] = not h.exact
            for p in range(h.start, h.start + h.length):
                rows[p] = row
        elif h.allowed == "string":  # no quote, backslash or control character: any mix is a JSON string
            row = np.array([bool(t) and not any(ch in '"\\' or ord(ch) < 32 for ch in t) for t in texts])
            row[[i for i in special_ids(tokenizer) if i < v]] = False
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


def end_ids(model) -> set[int]:
    """The end tokens of the hole rule: the checkpoint's EOS ids and its pad id."""
    gen = model.generation
    return set(gen.eos_token_ids) | {gen.pad_token_id}
