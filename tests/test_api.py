"""The public Python API (`stream_generate`, `generate`, `ChatSession`, events) on the demo checkpoint.

The demo checkpoint (random weights, canvas 32, char-level tokenizer with the Gemma 4 chat
template) is built once per module without network. Parity of the tokens with the reference
`generate` is covered by test_engine_parity.py; these tests check the API's contracts: event
stream consistency, laziness, seeding, length bounds, per-call options, errors, chat-session
cache reuse, cancellation, thinking and prompt forms. Everything runs with max_tokens <= 96 and
3-6 denoising steps so the file stays fast on a CPU.
"""

from __future__ import annotations

from dataclasses import replace

import importlib

import mlx.core as mx
import pytest

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.demo.files import SPECIAL_TOKENS
from mlx_diffusiongemma.demo.random import ensure_demo
from mlx_diffusiongemma.diffusion.events import BlockEvent, GenerationResult, StepEvent
from mlx_diffusiongemma.prompts.channels import split_thinking
from mlx_diffusiongemma.prompts.render import prompt_ids, render_messages

CANVAS = 32
NEVER = (10_000,)  # an EOS id outside the vocabulary: generation can only end by length
THINK_ID = SPECIAL_TOKENS.index("<|think|>")
# The submodule (the package's `generate` attribute is the function of that name).
generate_mod = importlib.import_module("mlx_diffusiongemma.api")


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = ensure_demo(tmp_path_factory.mktemp("demo") / "demo")
    model, tok = dg.load(folder)
    assert model.canvas_length == CANVAS
    return model, tok


@pytest.fixture
def eos(demo, monkeypatch):
    """Set the model's EOS ids for one test (restored afterwards)."""
    model, _ = demo

    def set_eos(ids):
        monkeypatch.setattr(model, "generation", replace(model.generation, eos_token_ids=tuple(ids)))

    return set_eos


class CountingTokenizer:
    """Forwards everything to the real tokenizer, counting `decode` calls."""

    def __init__(self, tok):
        self._tok = tok
        self.decode_calls = 0

    def decode(self, ids, *args, **kwargs):
        self.decode_calls += 1
        return self._tok.decode(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def count_calls(monkeypatch, obj, *names):
    """Wrap obj's methods `names` so their calls are counted; returns the counter list (its length)."""
    calls = []
    for name in names:
        original = getattr(obj, name)

        def wrapper(*args, original=original, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)
    return calls


def count_decoder_passes(monkeypatch, model):
    """Count the model's decoder passes of either path: the exact path's whole-canvas `denoise`,
    fast mode's `denoise_rows_batch` (which `denoise_rows` runs)."""
    return count_calls(monkeypatch, model, "denoise", "denoise_rows_batch")


def split(events):
    """(list of (step events, block event) per block, final result); checks the event order."""
    blocks, steps = [], []
    for i, e in enumerate(events):
        if isinstance(e, StepEvent):
            steps.append(e)
        elif isinstance(e, BlockEvent):
            blocks.append((steps, e))
            steps = []
        else:
            assert isinstance(e, GenerationResult) and i == len(events) - 1, "the result must come last"
    assert not steps, "step events after the last block event"
    assert isinstance(events[-1], GenerationResult)
    return blocks, events[-1]


def history_with(session, message):
    return list(session.messages) + [{"role": "user", "content": message}]


# ----------------------------------------------------------------------------------------------- event stream


# (70, checkpoint EOS): three blocks, the last cut by max_tokens; (96, (20,)): an EOS in the middle of
# the third canvas; (40, (40,)): the second canvas has an EOS after position 8, beyond the budget.
@pytest.mark.parametrize("max_tokens,eos_ids", [(70, None), (96, (20,)), (40, (40,))])
def test_event_stream_consistency(demo, eos, max_tokens, eos_ids):
    model, tok = demo
    if eos_ids is not None:
        eos(eos_ids)
    eos_set = set(model.generation.eos_token_ids)
    pad = model.generation.pad_token_id
    events = list(dg.stream_generate(model, tok, "Tell me a story.", seed=3, max_tokens=max_tokens,
                                     max_denoising_steps=5))
    blocks, result = split(events)
    assert blocks, "no block was committed"
    assert [b.block for _, b in blocks] == list(range(len(blocks)))
    for index, (steps, block) in enumerate(blocks):
        assert len(steps) == block.steps >= 1
        assert [s.step for s in steps] == list(range(1, block.steps + 1))
        assert all(s.block == index and s.max_steps == 5 for s in steps)
        for s in steps:
            assert s.argmax.shape == (CANVAS,) and s.canvas.shape == (CANVAS,) and s.accepted.shape == (CANVAS,)
            assert 1 <= s.accepted_count <= CANVAS  # the lowest-entropy token is always accepted
            assert s.mean_entropy >= 0
        # The committed block is the last step's argmax, cut after the first EOS (EOS kept).
        final = steps[-1].argmax.tolist()
        assert block.tokens == final[: len(block.tokens)]
        first_eos = next((i for i, t in enumerate(final) if t in eos_set), None)
        if first_eos is not None:
            assert block.stop_reason == "eos"
            assert len(block.tokens) <= first_eos + 1
        else:
            assert block.stop_reason == ("converged" if block.converged else "step_cap")
            if block is not blocks[-1][1]:
                assert len(block.tokens) == CANVAS
        if block.stop_reason == "step_cap":
            assert block.steps == 5
        assert not any(t in eos_set for t in block.tokens[:-1])
    assert result.tokens == [t for _, b in blocks for t in b.tokens]
    assert result.text == "".join(b.text for _, b in blocks)
    assert result.text == tok.decode([t for t in result.tokens if t not in eos_set])
    assert result.steps_per_block == [b.steps for _, b in blocks]
    total_steps = sum(result.steps_per_block)
    assert result.decoder_passes == total_steps
    assert result.tokens_per_forward == pytest.approx(sum(t != pad for t in result.tokens) / total_steps)
    assert result.generation_tokens == len(result.tokens) <= max_tokens
    assert result.prompt_tokens == result.encoded_tokens == len(prompt_ids(tok, "Tell me a story."))
    if result.finish_reason == "stop":
        assert result.tokens[-1] in eos_set
    else:
        assert result.finish_reason == "length" and len(result.tokens) == max_tokens


def test_step_events_are_plain_data(demo):
    """Events carry arrays and numbers, nothing to call back: the engine decodes no draft (a
    caller that shows one decodes `event.argmax` itself)."""
    from dataclasses import fields

    model, _ = demo
    tok = CountingTokenizer(demo[1])
    events = list(dg.stream_generate(model, tok, "Hi", seed=0, max_tokens=40, max_denoising_steps=3))
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert steps
    assert tok.decode_calls == 0, "the engine decoded drafts nobody asked for"
    for event in events:
        values = [getattr(event, f.name) for f in fields(event)]
        assert all(v is None or isinstance(v, (mx.array, int, float, str, list, tuple)) or hasattr(v, "__dataclass_fields__")
                   for v in values), event


# ----------------------------------------------------------------------------------------------- seeds


def _run(model, tok, prompt="Hi", **kw):
    kw.setdefault("max_tokens", 48)
    kw.setdefault("max_denoising_steps", 3)
    events = list(dg.stream_generate(model, tok, prompt, **kw))
    return [e.argmax.tolist() for e in events if isinstance(e, StepEvent)], events[-1]


def test_fast_mode_is_the_default_and_exact_gives_the_engine_reference_path(demo):
    """Without a mode, generate runs fast mode with its default techniques; mode="exact" gives the
    engine's reference path token for token (a hand-built Request, which names no technique); the
    canvas verbs run the exact path unless asked."""
    from mlx_diffusiongemma.diffusion.engine import Request, run
    from mlx_diffusiongemma.diffusion.options import FastOptions, SamplerOptions

    model, tok = demo
    ids = prompt_ids(tok, "Hello there")
    kw = dict(max_tokens=2 * CANVAS, seed=5, max_denoising_steps=6)
    default = dg.generate(model, tok, ids, **kw)
    exact = dg.generate(model, tok, ids, mode="exact", **kw)
    assert default.mode == "fast" and default.fast == FastOptions() and exact.mode == "exact"
    engine = list(run(model, Request(ids, max_tokens=2 * CANVAS, seed=5, sampler=SamplerOptions(max_denoising_steps=6))))
    assert exact.tokens == engine[-1].tokens and exact.steps_per_block == engine[-1].steps_per_block
    assert dg.generate(model, tok, ids, mode="fast", **kw).tokens == default.tokens
    assert dg.ChatSession(model, tok, **kw).send("Hello there").mode == "fast"
    assert dg.infill(model, tok, "Hello there", "A {{x:4}} B", seed=5).result.mode == "exact"
    assert dg.infill(model, tok, "Hello there", "A {{x:4}} B", seed=5, mode="fast").result.mode == "fast"


def test_same_seed_same_output(demo, eos):
    model, tok = demo
    eos(NEVER)
    argmax_a, a = _run(model, tok, seed=11)
    argmax_b, b = _run(model, tok, seed=11)
    assert a.tokens == b.tokens and a.text == b.text
    assert argmax_a == argmax_b
    assert a.seed == 11
    _, c = _run(model, tok, seed=12)
    assert c.tokens != a.tokens


def test_seed_none_is_random_and_recorded(demo, eos):
    model, tok = demo
    eos(NEVER)
    _, a = _run(model, tok, seed=None)
    _, b = _run(model, tok, seed=None)
    assert isinstance(a.seed, int) and isinstance(b.seed, int)
    assert len(a.tokens) == 48
    _, replay = _run(model, tok, seed=a.seed)
    assert replay.tokens == a.tokens  # the recorded seed reproduces the run


# ----------------------------------------------------------------------------------------------- length


@pytest.mark.parametrize("max_tokens", [1, 5, 33, 64])
def test_max_tokens_bound(demo, eos, max_tokens):
    model, tok = demo
    eos(NEVER)
    blocks, result = split(list(dg.stream_generate(model, tok, "Hi", seed=1, max_tokens=max_tokens,
                                                   max_denoising_steps=3)))
    assert len(result.tokens) == max_tokens
    assert result.finish_reason == "length"
    assert len(blocks) == -(-max_tokens // CANVAS)
    assert [len(b.tokens) for _, b in blocks[:-1]] == [CANVAS] * (len(blocks) - 1)


@pytest.mark.parametrize("max_tokens", [1, 5, 33, 64])
def test_max_tokens_bound_with_real_eos(demo, max_tokens):
    model, tok = demo
    for seed in range(3):
        result = dg.generate(model, tok, "Hi", seed=seed, max_tokens=max_tokens, max_denoising_steps=3)
        assert 1 <= len(result.tokens) <= max_tokens
        if result.finish_reason == "length":
            assert len(result.tokens) == max_tokens
        else:
            assert result.finish_reason == "stop"
            assert result.tokens[-1] in model.generation.eos_token_ids


def test_likely_eos_stops(demo, eos):
    model, tok = demo
    eos(range(0, 60))
    for seed in range(3):
        blocks, result = split(list(dg.stream_generate(model, tok, "Hi", seed=seed, max_tokens=64,
                                                       max_denoising_steps=3)))
        assert result.finish_reason == "stop"
        assert result.tokens[-1] < 60
        assert all(t >= 60 for t in result.tokens[:-1]), "tokens after the first EOS were kept"
        assert blocks[-1][1].stop_reason == "eos"
        assert result.text == tok.decode(result.tokens[:-1])


def test_max_tokens_cuts_before_eos_is_length(demo, eos):
    """An EOS beyond the max_tokens budget does not count: finish_reason is "length"."""
    model, tok = demo
    eos(range(0, 60))
    full = dg.generate(model, tok, "Hi", seed=0, max_tokens=32, max_denoising_steps=3)
    assert full.finish_reason == "stop"
    if len(full.tokens) > 1:  # the EOS is not the first token: cut just before it
        cut = dg.generate(model, tok, "Hi", seed=0, max_tokens=len(full.tokens) - 1, max_denoising_steps=3)
        assert cut.tokens == full.tokens[:-1]
        assert cut.finish_reason == "length"


# ----------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("cap", [3, 6])
def test_max_denoising_steps_override(demo, eos, cap):
    model, tok = demo
    eos(NEVER)
    blocks, result = split(list(dg.stream_generate(model, tok, "Hi", seed=2, max_tokens=64,
                                                   max_denoising_steps=cap)))
    assert result.sampler.max_denoising_steps == cap
    # Random weights are never confident, so every block runs to the cap.
    assert result.steps_per_block == [cap, cap]
    assert all(s.max_steps == cap for steps, _ in blocks for s in steps)
    assert all(b.stop_reason == "step_cap" and not b.converged for _, b in blocks)


def test_checkpoint_defaults_apply_without_overrides(demo, eos):
    model, tok = demo
    eos(NEVER)
    result = dg.generate(model, tok, "Hi", seed=2, max_tokens=1)
    assert result.sampler == dg.SamplerOptions(
        max_denoising_steps=16, entropy_bound=0.1, t_min=0.4, t_max=0.8, stability_threshold=1,
        confidence_threshold=0.005,
    )


def test_huge_entropy_bound_accepts_everything_at_step_one(demo, eos):
    model, tok = demo
    eos(NEVER)
    blocks, _ = split(list(dg.stream_generate(model, tok, "Hi", seed=4, max_tokens=64, max_denoising_steps=4,
                                              entropy_bound=1e9)))
    for steps, _ in blocks:
        assert steps[0].accepted_count == CANVAS
        assert bool(mx.all(steps[0].accepted))
    # The default bound accepts only part of a random model's canvas.
    blocks, _ = split(list(dg.stream_generate(model, tok, "Hi", seed=4, max_tokens=32, max_denoising_steps=4)))
    assert blocks[0][0][0].accepted_count < CANVAS


def test_trivial_stop_criteria_stop_after_one_step(demo, eos):
    model, tok = demo
    eos(NEVER)
    blocks, result = split(list(dg.stream_generate(model, tok, "Hi", seed=5, max_tokens=64, max_denoising_steps=6,
                                                   stability_threshold=0, confidence_threshold=1e9)))
    assert result.steps_per_block == [1, 1]
    assert all(b.converged and b.stop_reason == "converged" for _, b in blocks)
    assert result.tokens_per_forward == pytest.approx(sum(t != 0 for t in result.tokens) / 2)


@pytest.mark.parametrize("bad", [
    {"max_denoising_steps": 0},
    {"entropy_bound": 0.0},
    {"entropy_bound": -1.0},
    {"stability_threshold": -1},
    {"t_min": 0.8},  # == t_max: the reference refuses t_max <= t_min (t_min = 0 is accepted there)
    {"t_min": -0.5},
    {"max_tokens": 0},
])
def test_invalid_values_raise_value_error(demo, bad):
    model, tok = demo
    calls = []
    gen = dg.stream_generate(model, tok, "Hi", seed=0, **{"max_tokens": 8, **bad})
    with pytest.raises(ValueError):
        for e in gen:
            calls.append(e)
    assert not calls


@pytest.mark.parametrize("bad", [{"t_max": 0.0}, {"t_max": -1.0}, {"t_min": -1.0, "t_max": -1.0}])
def test_nonpositive_t_max_raises_value_error(demo, bad):
    model, tok = demo
    with pytest.raises(ValueError):
        next(dg.stream_generate(model, tok, "Hi", seed=0, max_tokens=8, max_denoising_steps=3, **bad))


def test_unknown_option_raises_type_error(demo):
    model, tok = demo
    with pytest.raises(TypeError, match="temperature"):
        dg.generate(model, tok, "Hi", max_tokens=8, temperature=0.5)
    session = dg.ChatSession(model, tok, max_tokens=8)
    with pytest.raises(TypeError, match="bogus"):
        session.send("Hi", bogus=1)
    assert session.messages == [] and session.cache is None


def test_empty_prompt_raises_value_error(demo):
    model, tok = demo
    with pytest.raises(ValueError):
        dg.generate(model, tok, [], max_tokens=8)


# ----------------------------------------------------------------------------------------------- context


def test_context_length_error_before_any_work(demo, monkeypatch):
    model, tok = demo
    monkeypatch.setattr(model.text, "max_position_embeddings", 64)
    n_prompt = len(prompt_ids(tok, "Hi"))
    assert n_prompt + CANVAS <= 64 < n_prompt + 2 * CANVAS
    denoise = count_decoder_passes(monkeypatch, model)
    extend = count_calls(monkeypatch, model, "extend")
    gen = dg.stream_generate(model, tok, "Hi", seed=0, max_tokens=CANVAS + 1, max_denoising_steps=3)
    with pytest.raises(dg.ContextLengthError, match="context is 64"):
        next(gen)  # raised on the very first next(): no StepEvent was produced
    assert not denoise and not extend
    assert isinstance(dg.ContextLengthError("x"), dg.DiffusionGemmaError)
    # What fits still runs.
    result = dg.generate(model, tok, "Hi", seed=0, max_tokens=CANVAS, max_denoising_steps=3)
    assert isinstance(result, GenerationResult) and denoise


def test_context_length_error_in_a_chat_session_keeps_the_session(demo, monkeypatch, eos):
    model, tok = demo
    eos(NEVER)
    monkeypatch.setattr(model.text, "max_position_embeddings", 64)
    session = dg.ChatSession(model, tok, seed=7, max_tokens=CANVAS, max_denoising_steps=3)
    session.send("Hi")
    before = (list(session.messages), list(session.cached_ids), session.cache)
    with pytest.raises(dg.ContextLengthError):
        session.send("Again")
    assert (session.messages, session.cached_ids, session.cache) == before


# ----------------------------------------------------------------------------------------------- chat session


def test_chat_session_reuses_the_cache(demo):
    model, tok = demo
    session = dg.ChatSession(model, tok, seed=7, max_tokens=64, max_denoising_steps=4)
    first = session.send("Hello there")
    assert first is session.last_result
    assert session.messages == [{"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": first.text}]
    n_first_prompt = len(render_messages(tok, [{"role": "user", "content": "Hello there"}]))
    assert first.encoded_tokens == n_first_prompt
    assert len(first.encoded_canvases) >= 1, "the first reply must span two blocks for this test"
    assert session.cache.length == len(session.cached_ids)
    cached = len(session.cached_ids)
    assert cached == n_first_prompt + CANVAS * len(first.encoded_canvases)

    messages = history_with(session, "And then?")
    full = render_messages(tok, messages)
    assert full[:cached] == session.cached_ids
    second = session.send("And then?")
    assert second.encoded_tokens == len(full) - cached < len(full)
    assert second.prompt_tokens == len(full)
    assert session.cache.length == len(session.cached_ids)
    assert len(session.messages) == 4 and session.messages[-1] == {"role": "assistant", "content": second.text}

    fresh = dg.generate(model, tok, messages, seed=7, max_tokens=64, max_denoising_steps=4)
    assert fresh.encoded_tokens == len(full)
    assert second.tokens == fresh.tokens
    assert second.text == fresh.text


def test_chat_session_reset(demo):
    model, tok = demo
    session = dg.ChatSession(model, tok, system="Be brief.", seed=1, max_tokens=8, max_denoising_steps=3)
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    session.send("Hi")
    assert session.cache is not None and session.cached_ids and len(session.messages) == 3
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.cache is None and session.cached_ids == [] and session.last_result is None
    again = session.send("Hi")
    assert again.encoded_tokens == len(render_messages(tok, session.messages[:2]))


def test_chat_session_per_turn_overrides(demo, eos):
    model, tok = demo
    eos(NEVER)
    session = dg.ChatSession(model, tok, seed=2, max_tokens=64, max_denoising_steps=4)
    result = session.send("Hi", max_tokens=5, max_denoising_steps=3)
    assert len(result.tokens) == 5 and result.steps_per_block == [3]
    assert session.options.max_tokens == 64 and session.options.sampler == dg.SamplerOptions(max_denoising_steps=4)


# ----------------------------------------------------------------------------------------------- cancellation


def test_closing_the_stream_stops_the_work(demo, monkeypatch):
    model, tok = demo
    denoise = count_decoder_passes(monkeypatch, model)
    gen = dg.stream_generate(model, tok, "Hi", seed=0, max_tokens=96, max_denoising_steps=6)
    first = next(gen)
    assert isinstance(first, StepEvent) and first.step == 1
    assert len(denoise) == 1
    gen.close()
    assert gen.gi_frame is None  # the generator (and the engine under it) finished
    assert list(gen) == []
    gen.close()  # closing twice is harmless
    assert len(denoise) == 1, "work continued after the stream was closed"


def test_cancelled_chat_turn_leaves_the_session_unchanged(demo):
    model, tok = demo
    session = dg.ChatSession(model, tok, seed=7, max_tokens=64, max_denoising_steps=4)
    session.send("Hello there")
    messages, cached_ids, cache = list(session.messages), list(session.cached_ids), session.cache
    cache_length = cache.length
    last = session.last_result

    stream = session.stream("Interrupted question")
    assert isinstance(next(stream), StepEvent)
    stream.close()
    assert session.messages == messages and session.cached_ids == cached_ids
    assert session.cache is cache and cache.length == cache_length and session.last_result is last

    # The next turn still reuses the (unmodified) cache and matches a fresh run over the history.
    history = history_with(session, "And then?")
    second = session.send("And then?")
    assert second.encoded_tokens == len(render_messages(tok, history)) - len(cached_ids)
    fresh = dg.generate(model, tok, history, seed=7, max_tokens=64, max_denoising_steps=4)
    assert second.tokens == fresh.tokens


def test_chat_turn_complete_once_the_result_is_yielded(demo):
    model, tok = demo
    session = dg.ChatSession(model, tok, seed=3, max_tokens=8, max_denoising_steps=3)
    result = next(e for e in session.stream("Hi") if isinstance(e, GenerationResult))
    assert session.last_result is result
    assert session.messages[-1] == {"role": "assistant", "content": result.text}


# ----------------------------------------------------------------------------------------------- thinking


def test_thinking_renders_the_think_token(demo, monkeypatch):
    model, tok = demo
    assert tok.convert_tokens_to_ids("<|think|>") == THINK_ID
    seen = []
    real_run = generate_mod.run

    def spy(model_, request, **kw):
        seen.append(list(request.prompt_ids))
        return real_run(model_, request, **kw)

    monkeypatch.setattr(generate_mod, "run", spy)
    on = dg.generate(model, tok, "Hi", thinking=True, seed=0, max_tokens=4, max_denoising_steps=3)
    off = dg.generate(model, tok, "Hi", seed=0, max_tokens=4, max_denoising_steps=3)
    assert THINK_ID in seen[0] and THINK_ID not in seen[1]
    assert seen[0] == prompt_ids(tok, "Hi", thinking=True)
    assert on.prompt_tokens == len(seen[0]) > off.prompt_tokens == len(seen[1])


def test_split_thinking():
    assert split_thinking("<|channel>thought\nabc<channel|>answer") == ("abc", "answer")
    assert split_thinking("plain answer") == (None, "plain answer")
    assert split_thinking("<|channel>thought\nstill going") == ("still going", "")
    assert split_thinking("<|channel>thought\nabc<channel|>\nanswer") == ("abc", "answer")


def test_result_thinking_and_answer_properties():
    def result(text):
        return GenerationResult(text=text, tokens=[1, 2], finish_reason="stop", prompt_tokens=3,
                                prefill_time=0.0, prefill_tps=0.0, steps_per_block=[1],
                                tokens_per_forward=2.0, generation_time=0.0, generation_tps=0.0,
                                peak_memory_gb=0.0)

    r = result("<|channel>thought\nabc<channel|>answer")
    assert r.thinking == "abc" and r.answer == "answer" and r.generation_tokens == 2
    r = result("just this")
    assert r.thinking is None and r.answer == "just this"


# ----------------------------------------------------------------------------------------------- prompt forms


def test_prompt_forms_agree(demo, eos):
    model, tok = demo
    eos(NEVER)
    ids = render_messages(tok, [{"role": "user", "content": "Hi"}])
    assert ids == prompt_ids(tok, "Hi")
    kw = dict(seed=9, max_tokens=8, max_denoising_steps=3)
    results = [
        dg.generate(model, tok, "Hi", **kw),
        dg.generate(model, tok, [{"role": "user", "content": "Hi"}], **kw),
        dg.generate(model, tok, ids, **kw),
        dg.generate(model, tok, tuple(ids), **kw),
        dg.generate(model, tok, mx.array(ids), **kw),
        dg.generate(model, tok, mx.array([ids]), **kw),  # a [1, n] batch of one
    ]
    for r in results:
        assert r.tokens == results[0].tokens and r.text == results[0].text
        assert r.prompt_tokens == len(ids)
    raw = dg.generate(model, tok, [5, 40, 41], **kw)  # ids are used as given, without a template
    assert raw.prompt_tokens == 3


# ----------------------------------------------------------------------------------------------- no printing


def test_library_code_does_not_print(demo, capfd):
    model, tok = demo
    capfd.readouterr()
    dg.generate(model, tok, "Hi", seed=0, max_tokens=40, max_denoising_steps=3)
    list(dg.stream_generate(model, tok, [{"role": "user", "content": "Hi"}], seed=1, max_tokens=8,
                            max_denoising_steps=3, thinking=True))
    session = dg.ChatSession(model, tok, seed=0, max_tokens=40, max_denoising_steps=3)
    session.send("Hi")
    session.send("Again")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
