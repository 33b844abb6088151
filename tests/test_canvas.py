"""Canvas position states in the engine: pins, warm starts, hooks, allowed tokens.

The no-pin path and the warm start are checked against the reference `generate` under shared
randomness (the harness of test_engine_parity); pins, which the reference does not have, by
properties over random pins, blocks and seeds.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from conftest import build_reference, save_checkpoint, sharpen, tiny_text_config
from test_engine_parity import RecordingNoise, run_reference
from mlx_diffusiongemma.diffusion import canvas as cs
from mlx_diffusiongemma.diffusion import sampler
from mlx_diffusiongemma.diffusion.canvas import CanvasState, StepView
from mlx_diffusiongemma.checkpoint.config import load_generation_defaults
from mlx_diffusiongemma.diffusion.engine import Request, run
from mlx_diffusiongemma.diffusion.options import SamplerOptions
from mlx_diffusiongemma.diffusion.events import BlockEvent, GenerationResult, StepEvent
from mlx_diffusiongemma.checkpoint.loading import load_model

C = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = build_reference(tiny_text_config(), canvas_length=C, seed=11)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("canvas") / "ckpt")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = load_model(folder, dtype=mx.float32)
    ours.generation = replace(load_generation_defaults(folder), eos_token_ids=(3,))
    return ref, ours


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A checkpoint on which the adaptive stop fires (so stop tests see pinned positions)."""
    built = build_reference(tiny_text_config(), canvas_length=C, seed=4)
    sharpen(built)
    folder = save_checkpoint(built, tmp_path_factory.mktemp("canvas_sharp") / "ckpt")
    ours, _ = load_model(folder, dtype=mx.float32)
    ours.generation = replace(load_generation_defaults(folder), eos_token_ids=(3,))
    return ours


def _events(model, request, seed):
    noise = RecordingNoise(seed)
    return list(run(model, request, noise=noise)), noise.log


def _noop_hook(view: StepView):
    return None


@pytest.mark.parametrize("seed", [1, 7])
def test_no_pins_is_the_reference_path(tiny, monkeypatch, seed):
    """An all-LIVE state on every block plus a hook that changes nothing: the same tokens, steps and
    tokens_per_forward as the reference generate under the same random stream, and the same
    events as a request without any state."""
    ref, ours = tiny
    prompt = [2, 5, 17, 30, 44, 9]
    sampler = dict(max_denoising_steps=5)
    plain, _ = _events(ours, Request(prompt, max_tokens=24, sampler=SamplerOptions(**sampler)), seed)
    request = Request(prompt, max_tokens=24, sampler=SamplerOptions(**sampler),
                      canvases=[cs.live_state(C)] * 3, hooks=(_noop_hook,))
    events, log = _events(ours, request, seed)
    result = events[-1]
    new, tpf, ref_steps = run_reference(ref, prompt, log, monkeypatch, max_new_tokens=24, eos_token_id=[3], **sampler)
    assert ref_steps == result.steps_per_block
    assert new[: len(result.tokens)] == result.tokens
    assert tpf == pytest.approx(result.tokens_per_forward, abs=1e-6)
    steps = [e for e in events if isinstance(e, StepEvent)]
    plain_steps = [e for e in plain if isinstance(e, StepEvent)]
    assert len(steps) == len(plain_steps)
    for a, b in zip(steps, plain_steps):
        assert a.argmax.tolist() == b.argmax.tolist() and a.canvas.tolist() == b.canvas.tolist()
        assert a.accepted.tolist() == b.accepted.tolist() and a.mean_entropy == b.mean_entropy
    assert plain[-1].tokens == result.tokens


def test_no_pins_stop_test_is_the_reference(sharp):
    """Where the adaptive stop fires, an all-LIVE state stops at the very same steps."""
    prompt = [2, 11, 12, 13]
    opts = SamplerOptions(max_denoising_steps=12)
    plain, _ = _events(sharp, Request(prompt, max_tokens=24, sampler=opts), 0)
    with_state, _ = _events(sharp, Request(prompt, max_tokens=24, sampler=opts, canvases=[cs.live_state(C)] * 3), 0)
    assert plain[-1].steps_per_block == with_state[-1].steps_per_block
    assert any(s < 12 for s in plain[-1].steps_per_block), "the stop never fired: the test checks nothing"
    assert plain[-1].tokens == with_state[-1].tokens


def test_warm_start_follows_the_reference_initial_canvas(tiny, monkeypatch):
    """A warm start of block 0 is the reference's `decoder_input_ids` (the starting canvas of the
    first denoising loop; the reference still draws its random canvas, and so do we)."""
    ref, ours = tiny
    prompt = [2, 7, 7, 19, 60]
    warm = [40, 41, 42, 43, 44, 45, 46, 47]
    sampler = dict(max_denoising_steps=4)
    request = Request(prompt, max_tokens=16, sampler=SamplerOptions(**sampler),
                      canvases={0: CanvasState.from_lists(C, warm=warm)})
    events, log = _events(ours, request, 3)
    result = events[-1]
    first = next(e for e in events if isinstance(e, StepEvent))
    new, tpf, ref_steps = run_reference(ref, prompt, log, monkeypatch, max_new_tokens=16, eos_token_id=[3],
                                        decoder_input_ids=torch.tensor([warm]), **sampler)
    assert ref_steps == result.steps_per_block
    assert new[: len(result.tokens)] == result.tokens
    # and the warm start matters: from noise the first draft differs
    cold = next(e for e in _events(ours, replace(request, canvases=None), 3)[0] if isinstance(e, StepEvent))
    assert cold.argmax.tolist() != first.argmax.tolist()


def _random_pins(rng, n_blocks, vocab):
    states = []
    for _ in range(n_blocks):
        k = int(rng.integers(0, C + 1))
        positions = rng.choice(C, size=k, replace=False)
        states.append(CanvasState.from_lists(C, {int(p): int(rng.integers(0, vocab)) for p in positions}))
    return states


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_pinned_positions_never_change(tiny, sharp, seed):
    """Random pins on random blocks (0..C pinned per block), random seeds, both checkpoints: at
    every step a pinned position holds its token in the canvas and the draft, is accepted, and is
    committed as given."""
    rng = np.random.default_rng(seed)
    model = (tiny[1], sharp)[seed % 2]
    n_blocks = int(rng.integers(1, 4))
    states = _random_pins(rng, n_blocks, model.vocab_size)
    steps_seen = []

    def check(view: StepView):
        steps_seen.append(view.step)
        return None

    request = Request([2, 9, 4], max_tokens=n_blocks * C, sampler=SamplerOptions(max_denoising_steps=6),
                      canvases=states, hooks=(check,), stop_at_eos=False, seed=seed)
    events = list(run(model, request))
    for e in events:
        if isinstance(e, StepEvent):
            st = states[e.block]
            pinned = np.array(st.pinned.tolist())
            ids = np.array(st.ids.tolist())
            assert e.pinned.tolist() == pinned.tolist()
            assert (np.array(e.canvas.tolist())[pinned] == ids[pinned]).all()
            assert (np.array(e.argmax.tolist())[pinned] == ids[pinned]).all()
            assert np.array(e.accepted.tolist())[pinned].all()
    result = events[-1]
    assert isinstance(result, GenerationResult) and len(result.tokens) == n_blocks * C
    for b, st in enumerate(states):
        block = np.array(result.tokens[b * C:(b + 1) * C])
        pinned = np.array(st.pinned.tolist())
        assert (block[pinned] == np.array(st.ids.tolist())[pinned]).all()
    assert steps_seen and steps_seen[0] == 1


def test_every_position_pinned_stops_at_once(tiny):
    """A fully pinned canvas is certain: stable after one step, confident, so it stops at step 2."""
    _, model = tiny
    ids = list(range(20, 20 + C))
    state = CanvasState.from_lists(C, dict(enumerate(ids)))
    events = list(run(model, Request([2, 5], max_tokens=C, canvases=[state], stop_at_eos=False, seed=0)))
    assert events[-1].tokens == ids
    assert events[-1].steps_per_block == [2]
    assert all(e.mean_entropy == 0.0 for e in events if isinstance(e, StepEvent))


def test_a_live_position_is_always_accepted_among_pins():
    """Pinned entropies count 0 in the budget, so the lowest-entropy live position is accepted even
    when its entropy alone exceeds the bound (as the reference's first position always is)."""
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(1, C, 50)).astype(np.float32))  # high entropy everywhere
    pinned = mx.array([[True, False, True, True, False, True, False, False]])
    ids = mx.array([[1, 0, 2, 3, 0, 4, 0, 0]], dtype=mx.int32)
    canvas = mx.zeros((1, C), dtype=mx.int32)
    u = mx.array(rng.random((1, C)).astype(np.float32))
    r = mx.array(rng.integers(0, 50, (1, C)).astype(np.int32))
    res = sampler.step(logits, canvas, 1.0, u, r, 0.01, pinned=pinned, ids=ids)
    accepted = np.array(res.accepted.tolist())[0]
    live = ~np.array(pinned.tolist())[0]
    assert accepted[~live].all()
    assert accepted[live].sum() == 1
    e = np.array(sampler.entropy(logits).tolist())[0]
    assert accepted[live][np.argmin(e[live])]
    # and with nothing pinned the step without pins is reproduced bit for bit
    plain = sampler.step(logits, canvas, 1.0, u, r, 0.01)
    none = sampler.step(logits, canvas, 1.0, u, r, 0.01, pinned=mx.zeros((1, C), dtype=mx.bool_), ids=ids)
    for a, b in zip(plain, none):
        assert np.array_equal(np.array(a.tolist()), np.array(b.tolist()))


def test_hook_freezes_positions_from_the_next_step_on(tiny):
    """A hook that freezes the first half of the canvas at step 2 (at that step's argmax): from step
    3 on those positions never change, they are reported as pinned, and flagged frozen."""
    _, model = tiny
    states_after = []

    def freezer(view: StepView):
        if view.step == 2:
            mask = mx.arange(C) < C // 2
            new = cs.freeze(view.state, mask, view.argmax)
            states_after.append(new)
            return new
        return None

    events = list(run(model, Request([2, 5, 6], max_tokens=2 * C, sampler=SamplerOptions(max_denoising_steps=6),
                                     hooks=(freezer,), seed=3, stop_at_eos=False)))
    for block in range(2):
        steps = [e for e in events if isinstance(e, StepEvent) and e.block == block]
        frozen_at = steps[1].argmax.tolist()[: C // 2]
        for e in steps[1:]:
            assert e.argmax.tolist()[: C // 2] == frozen_at
            assert e.canvas.tolist()[: C // 2] == frozen_at
        for e in steps[2:]:  # the state a step ran with: the hook's from step 3 on
            assert e.pinned.tolist() == [True] * (C // 2) + [False] * (C - C // 2)
        assert events[-1].tokens[block * C: block * C + C // 2] == frozen_at
    assert all(s.frozen.tolist()[: C // 2] == [True] * (C // 2) for s in states_after)


def test_allowed_tokens_constrain_the_draft(tiny):
    _, model = tiny
    v = model.vocab_size
    allowed = np.zeros((C, v), dtype=bool)
    allowed[:, :] = True
    allowed[2:5, :] = False
    allowed[2:5, [40, 41, 42]] = True
    state = CanvasState.from_lists(C, {0: 7}, allowed=mx.array(allowed))
    events = list(run(model, Request([2, 5], max_tokens=C, canvases=[state], seed=1, stop_at_eos=False,
                                     sampler=SamplerOptions(max_denoising_steps=5))))
    for e in events:
        if isinstance(e, StepEvent):
            assert set(e.argmax.tolist()[2:5]) <= {40, 41, 42}
    assert set(events[-1].tokens[2:5]) <= {40, 41, 42}


def test_bad_states_fail_before_any_work(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="canvas state has 4 positions"):
        next(run(model, Request([2, 5], max_tokens=C, canvases=[cs.live_state(4)])))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        next(run(model, Request([2, 5], max_tokens=C, canvases=[CanvasState.from_lists(C, {1: 10**6})])))
    with pytest.raises(ValueError, match="outside the canvas"):
        CanvasState.from_lists(C, {C: 1})


def test_stop_at_eos_false_keeps_whole_canvases(tiny):
    """An EOS pinned in the middle of block 0 ends a normal request there, but not a template's."""
    _, model = tiny
    state = CanvasState.from_lists(C, {3: 3})
    normal = list(run(model, Request([2, 5], max_tokens=2 * C, canvases=[state], seed=0)))[-1]
    whole = list(run(model, Request([2, 5], max_tokens=2 * C, canvases=[state], seed=0, stop_at_eos=False)))[-1]
    assert normal.tokens[-1] == 3 and len(normal.tokens) == 4 and normal.finish_reason == "stop"
    assert len(whole.tokens) == 2 * C and whole.tokens[:C] == normal.tokens[:4] + whole.tokens[4:C]
    assert whole.finish_reason == "length"
    assert [e.block for e in list(run(model, Request([2, 5], max_tokens=2 * C, canvases=[state], seed=0,
                                                     stop_at_eos=False))) if isinstance(e, BlockEvent)] == [0, 1]


def test_pins_with_deferred_stop_checks_give_the_same_tokens(sharp):
    """stop_check_interval > 1 freezes a stopped block on the device; with pins it must still give
    the tokens and steps of the every-step check."""
    states = _random_pins(np.random.default_rng(9), 3, sharp.vocab_size)
    base = Request([2, 11, 12, 13], max_tokens=3 * C, sampler=SamplerOptions(max_denoising_steps=12),
                   canvases=states, seed=2, stop_at_eos=False)
    one = list(run(sharp, base))[-1]
    three = list(run(sharp, replace(base, stop_check_interval=3)))[-1]
    assert one.tokens == three.tokens and one.steps_per_block == three.steps_per_block
    assert any(s < 12 for s in one.steps_per_block)
