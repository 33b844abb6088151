"""Templates, infill, JSON, edit and score: the mechanics, on random weights.

What the filled values are worth needs a trained model (scripts/eval_editing.py measures that on
the demo model); here the contracts: pinned text comes back verbatim, holes are read by the
documented rule, JSON always parses and matches its schema, bad templates fail before any model
work, score costs one decoder pass.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_diffusiongemma as dg
from conftest import build_reference, save_checkpoint, tiny_text_config
from mlx_diffusiongemma import edit, fill_json, infill, score, stream_infill
from mlx_diffusiongemma.editing.edit import find_span
from mlx_diffusiongemma.editing import template as tpl
from mlx_diffusiongemma.diffusion.events import StepEvent
from mlx_diffusiongemma.editing.template import TemplateError

C = 16
FAST = dict(max_denoising_steps=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = build_reference(tiny_text_config(max_position_embeddings=256), canvas_length=C, seed=2, vision=False)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("editing") / "ckpt")
    return dg.load(folder)


class Counting:
    """Forwards to the model, counting decoder and encoder calls (and failing if told to)."""

    def __init__(self, model, fail: bool = False):
        self._model, self.fail = model, fail
        self.denoise_calls = self.extend_calls = 0
        self.canvases = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def denoise(self, canvas, *args, **kwargs):
        assert not self.fail, "model work before the template was checked"
        self.canvases.append(canvas[0].tolist())
        self.denoise_calls += 1
        return self._model.denoise(canvas, *args, **kwargs)

    def extend(self, *args, **kwargs):
        assert not self.fail, "model work before the template was checked"
        self.extend_calls += 1
        return self._model.extend(*args, **kwargs)


# -- parsing and checks -------------------------------------------------------------------------------


def test_parse_holes_and_fixed_text():
    segs = tpl.parse("Name: {{name:6}}, born in {{ year : ..2 }} \\{{x}}")
    assert segs == [tpl.Fixed("Name: "), tpl.Hole("name", 6, True), tpl.Fixed(", born in "),
                    tpl.Hole("year", 2, False), tpl.Fixed(" {{x}}")]


@pytest.mark.parametrize("bad, message", [
    ("a {{name:abc}}", "unknown hole syntax"),
    ("a {{1x:3}}", "unknown hole syntax"),
    ("a {{x:3", "unclosed hole"),
    ("{{x:2}} and {{x:3}}", "used twice"),
    ("a {{x:0}}", "has length 0"),
    ("a {{x:99999}}", "holes take 1 to"),
    ("no holes here", "no holes"),
])
def test_bad_templates_fail_before_any_work(tiny, bad, message):
    model, tok = tiny
    counting = Counting(model, fail=True)
    with pytest.raises(TemplateError, match=message):
        infill(counting, tok, "hi", bad, **FAST)


def test_template_longer_than_the_context_fails_before_any_work(tiny):
    model, tok = tiny
    counting = Counting(model, fail=True)
    with pytest.raises(TemplateError, match="longer than the model's context"):
        infill(counting, tok, "hi", "x {{a:300}}", **FAST)
    with pytest.raises(TemplateError, match="the context is 256"):
        infill(counting, tok, "hi", "x {{a:120}} y {{b:120}}", **FAST)


@pytest.fixture
def merging_tokenizer(tmp_path):
    """A BPE tokenizer that attaches a space to the next letter (' x' is one token), as
    SentencePiece-style tokenizers do, and a period to the letter before it ('x.')."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars = letters + list(" :,.0123456789")
    vocab = {ch: i for i, ch in enumerate(chars)}
    merges = []
    for ch in letters:
        vocab[" " + ch] = len(vocab)
        merges.append((" ", ch))
        vocab[ch + "."] = len(vocab)
        merges.append((ch, "."))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_pinned_tokens_contradicting_merges_are_rejected(merging_tokenizer):
    with pytest.raises(TemplateError, match="merges with the next word"):
        tpl.layout(merging_tokenizer, tpl.parse("Name: {{name:4}}"))
    with pytest.raises(TemplateError, match="merges with the previous word"):
        tpl.layout(merging_tokenizer, tpl.parse("Name:{{name:4}}. Next"))
    lay = tpl.layout(merging_tokenizer, tpl.parse("Name:{{name:4}}, here"))  # the space goes in the hole
    assert [h.start for h in lay.holes] == [5] and lay.length == 5 + 4 + 5


def test_unknown_characters_are_rejected(merging_tokenizer):
    with pytest.raises(TemplateError, match="does not survive the tokenizer"):
        tpl.layout(merging_tokenizer, tpl.parse("Name;{{name:4}}"))


def test_hole_rule_end_tokens(tiny):
    _, tok = tiny
    lay = tpl.layout(tok, tpl.parse("A{{x:..4}}B{{y:3}}"))
    x = tok.encode("hi", add_special_tokens=False)
    tokens = [lay.ids[0]] + x + [1, 66, 67] [:4 - len(x)] + [lay.ids[5]] + tok.encode("abc", add_special_tokens=False)
    values = tpl.hole_values(tok, lay, tokens, {0, 1})
    assert values["x"]["text"] == "hi" and values["x"]["ended"]
    assert values["y"]["text"] == "abc" and values["y"]["full"]
    assert tpl.fill_text(lay, {k: v["text"] for k, v in values.items()}) == "AhiBabc"


def test_filled_ids_follow_the_hole_rule(tiny):
    """Training targets for templates: the values come back by the hole rule, pins unchanged."""
    _, tok = tiny
    lay = tpl.layout(tok, tpl.parse("A{{x:..4}}B{{y:3}}"))
    y = tok.decode(tok.encode("abc", add_special_tokens=False)[:3])
    ids = tpl.filled_ids(tok, lay, {"x": "hi", "y": y}, end_id=1)
    assert [t for t, pin in zip(ids, lay.ids) if pin >= 0] == [pin for pin in lay.ids if pin >= 0]
    values = tpl.hole_values(tok, lay, ids, {1})
    assert values["x"]["text"] == "hi" and values["x"]["ended"] and values["y"]["full"]
    with pytest.raises(TemplateError, match="has 4"):
        tpl.filled_ids(tok, lay, {"x": "hi there you all", "y": y}, end_id=1)
    with pytest.raises(TemplateError, match="exactly 3"):
        tpl.filled_ids(tok, lay, {"x": "hi", "y": "a"}, end_id=1)


# -- infill ----------------------------------------------------------------------------------------


def test_infill_pins_the_fixed_text_across_canvases(tiny):
    """A template of three canvases: every fixed token is committed verbatim at its position, at
    every step; each hole's value is its tokens; the same seed gives the same fill."""
    model, tok = tiny
    template = "Name: {{name:6}}, born in {{year:4}}. " + "Lives in a town by the sea. " + "Likes {{thing:..10}}!"
    events = list(stream_infill(model, tok, "Describe a person.", template, seed=3, **FAST))
    out = events[-1]
    lay = tpl.layout(tok, tpl.parse(template))
    assert lay.length > 2 * C
    assert out.result.steps_per_block and len(out.result.steps_per_block) == lay.blocks(C)
    for e in events:
        if isinstance(e, StepEvent):
            part = lay.ids[e.block * C:(e.block + 1) * C]
            argmax = e.argmax.tolist()
            assert all(a == t for a, t in zip(argmax, part) if t >= 0)
            assert e.pinned.tolist()[:len(part)] == [t >= 0 for t in part]
    tokens = out.result.tokens
    assert all(tokens[i] == t for i, t in enumerate(lay.ids) if t >= 0)
    assert out.text.startswith("Name: ") and ", born in " in out.text and out.text.endswith("!")
    assert set(out.holes) == {"name", "year", "thing"}
    for h in lay.holes:
        assert out.details[h.name]["tokens"] == [t for t in tokens[h.start:h.start + h.length]][:len(out.details[h.name]["tokens"])]
    assert out.text == tpl.fill_text(lay, out.holes)
    again = infill(model, tok, "Describe a person.", template, seed=3, **FAST)
    assert again.text == out.text and again.holes == out.holes


# -- JSON ------------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "delta": {"type": "integer", "minimum": -50},
        "color": {"enum": ["red", "green", "blue"]},
        "member": {"type": "boolean"},
    },
}


def _matches(value, schema):
    assert list(value) == list(schema["properties"])
    for key, spec in schema["properties"].items():
        v = value[key]
        if "enum" in spec:
            assert v in spec["enum"]
        elif spec["type"] == "string":
            assert isinstance(v, str)
        elif spec["type"] == "integer":
            assert isinstance(v, int) and not isinstance(v, bool)
        elif spec["type"] == "boolean":
            assert isinstance(v, bool)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_always_parses_and_matches(tiny, seed):
    """Random weights write nonsense, but the structure is pinned and the values constrained:
    the text parses and matches the schema every time."""
    model, tok = tiny
    out = fill_json(model, tok, "A person as JSON.", SCHEMA, seed=seed, **FAST)
    value = json.loads(out.text)
    assert value == out.value
    _matches(value, SCHEMA)


def test_json_schema_errors(tiny):
    model, tok = tiny
    with pytest.raises(TemplateError, match="object schema"):
        fill_json(model, tok, "x", {"type": "array"})
    with pytest.raises(TemplateError, match="not supported"):
        fill_json(model, tok, "x", {"type": "object", "properties": {"a": {"type": "array"}}})


# -- edit ------------------------------------------------------------------------------------------


def test_edit_warm_start_renoises_the_chosen_fraction(tiny):
    model, tok = tiny
    text = "The cat sat on the mat and looked at the door."
    ids = tok.encode(text, add_special_tokens=False)
    one_step = dict(max_denoising_steps=1)  # one decoder call per canvas: call i is canvas i's start
    zero = Counting(model)
    out = edit(zero, tok, text, "Rewrite it.", strength=0.0, seed=1, **one_step)
    assert sum(zero.canvases, [])[:len(ids)] == ids  # the first decoder inputs are the text itself
    half = Counting(model)
    edit(half, tok, text, "Rewrite it.", strength=0.5, seed=1, **one_step)
    kept = sum(a == b for a, b in zip(sum(half.canvases, []), ids))
    assert 0.3 * len(ids) < kept < 0.75 * len(ids)
    assert isinstance(out.text, str) and out.result.seed == 1


def test_edit_span_keeps_everything_else(tiny):
    model, tok = tiny
    text = "The cat sat on the mat."
    span = find_span(text, "cat")
    out = edit(model, tok, text, "Use another animal.", spans=[span], seed=0, **FAST)
    assert out.text.startswith("The ") and out.text.endswith(" sat on the mat.")
    assert set(out.holes) == {"span0"}
    assert out.text == "The " + out.holes["span0"] + " sat on the mat."
    with pytest.raises(TemplateError, match="does not occur"):
        find_span(text, "dog")


# -- score -----------------------------------------------------------------------------------------


def test_score_is_one_decoder_pass(tiny):
    model, tok = tiny
    counting = Counting(model)
    res = score(counting, tok, "Is 7 odd?", ["yes", "no", "maybe"])
    assert counting.denoise_calls == 1
    assert sum(res.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert res.choice == max(res.probabilities, key=res.probabilities.get)
    assert res.confidence == pytest.approx(res.probabilities[res.choice])
    assert res.decoder_passes == 1
    again = score(model, tok, "Is 7 odd?", ["yes", "no", "maybe"])
    assert again.probabilities == res.probabilities


def test_score_matches_its_definition(tiny):
    """Options' probabilities from the pass's log-probabilities by hand: tokens at the slot, an end
    token (any) at its unused positions, normalised over the options."""
    model, tok = tiny
    res = score(model, tok, "Pick.", {"a": ["xy", "z"], "b": ["q", "r"]}, template="A={{a}} B={{b}}", seed=5)
    # recompute by hand from one pass with the same canvas
    lay = tpl.layout(tok, [tpl.Fixed("A="), tpl.Hole("a", None, options=("xy", "z")), tpl.Fixed(" B="),
                           tpl.Hole("b", None, options=("q", "r"))])
    from mlx_diffusiongemma.prompts.render import prompt_ids
    ids = prompt_ids(tok, "Pick.")
    cache = model.make_cache()
    model.extend(cache, ids)
    noise = dg.NoiseSource(5).canvas(0, 1, C, model.vocab_size)[0]
    state = tpl.states(lay, C, model.vocab_size)[0]
    canvas = mx.where(state.pinned, state.ids, noise)[None]
    lp = np.array(mx.log(mx.softmax(model.denoise(canvas, cache, None)[0].astype(mx.float32), axis=-1)))
    end = sorted(set(model.generation.eos_token_ids) | {model.generation.pad_token_id})
    a = lay.holes[0].start
    xy = tok.encode("xy", add_special_tokens=False)
    z = tok.encode("z", add_special_tokens=False)
    s_xy = lp[a, xy[0]] + lp[a + 1, xy[1]]
    s_z = lp[a, z[0]] + np.log(np.exp(lp[a + 1, end]).sum())
    p_xy = 1 / (1 + np.exp(s_z - s_xy))
    assert res.slots["a"].probabilities["xy"] == pytest.approx(p_xy, abs=1e-4)


def test_score_errors(tiny):
    model, tok = tiny
    with pytest.raises(TemplateError, match="give options as"):
        score(model, tok, "x", ["a"], template="{{a}} {{b}}")
    with pytest.raises(TemplateError, match="fit one canvas"):
        score(model, tok, "x", ["a"], template="x" * 40 + "{{a}}")


def test_infill_and_json_in_fast_mode(tiny):
    """Fast mode runs its own loop over the same canvas states: pins hold, JSON still parses
    (option slots then take the option closest to the committed tokens)."""
    model, tok = tiny
    out = infill(model, tok, "x", "A{{a:3}}B{{b:..4}}C", seed=1, mode="fast", **FAST)
    assert out.text.startswith("A") and out.text.endswith("C") and out.result.mode == "fast"
    res = fill_json(model, tok, "A person as JSON.", SCHEMA, seed=1, mode="fast", **FAST)
    _matches(json.loads(res.text), SCHEMA)
