"""The lean denoising step: deferred stop checks, host synchronisations, top-k self-conditioning."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import load
from mlx_diffusiongemma.demo.random import ensure_demo
from mlx_diffusiongemma.diffusion.engine import Request, run
from mlx_diffusiongemma.diffusion.options import SamplerOptions
from mlx_diffusiongemma.diffusion.events import GenerationResult, StepEvent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load(ensure_demo(tmp_path_factory.mktemp("lean") / "demo"))


def _run(model, interval, **sampler):
    req = Request([2, 5, 17, 30, 44, 9, 60], max_tokens=80, seed=4, stop_check_interval=interval,
                  sampler=SamplerOptions(**sampler))
    events = list(run(model, req))
    return events[-1], [e for e in events if isinstance(e, StepEvent)]


@pytest.mark.parametrize("sampler", [
    dict(max_denoising_steps=5),  # runs to the cap
    dict(max_denoising_steps=6, stability_threshold=0, confidence_threshold=1e9),  # stops at step 1
    dict(max_denoising_steps=8, stability_threshold=1, confidence_threshold=1e9),  # stops when the argmax repeats
])
def test_deferred_stop_check_gives_identical_tokens(demo, sampler):
    model, _ = demo
    base, base_steps = _run(model, 1, **sampler)
    assert base.host_syncs == sum(base.steps_per_block)  # one per step
    for interval in (3, 4):
        result, steps = _run(model, interval, **sampler)
        assert result.tokens == base.tokens
        assert result.steps_per_block == base.steps_per_block
        assert result.tokens_per_forward == base.tokens_per_forward
        assert [e.argmax.tolist() for e in steps] == [e.argmax.tolist() for e in base_steps]
        bound = sum(math.ceil(s / interval) for s in base.steps_per_block)
        assert result.host_syncs <= bound
        print(f"\n{sampler}: interval {interval}: {result.host_syncs} syncs for "
              f"{sum(result.steps_per_block)} steps (interval 1: {base.host_syncs})")


def test_deferred_stop_check_when_the_stop_fires_mid_batch(tmp_path):
    """A sharpened checkpoint stops after 5-8 steps, inside a batch of 3 or 4 deferred checks:
    the steps computed after the stop are discarded and the state was frozen on the device."""
    from conftest import build_reference, save_checkpoint, sharpen, tiny_text_config

    built = build_reference(tiny_text_config(), canvas_length=8, seed=4)
    sharpen(built)
    model, _ = load(save_checkpoint(built, tmp_path / "sharp"), dtype=mx.float32)
    base, _ = _run(model, 1, max_denoising_steps=12)
    assert all(2 < s < 12 for s in base.steps_per_block)
    for interval in (3, 4, 5):
        result, _ = _run(model, interval, max_denoising_steps=12)
        assert result.tokens == base.tokens and result.steps_per_block == base.steps_per_block
        assert result.host_syncs < base.host_syncs
        print(f"\nsharpened: interval {interval}: steps {result.steps_per_block}, "
              f"{result.host_syncs} syncs (interval 1: {base.host_syncs})")


def test_top_k_self_conditioning_error_is_bounded(demo):
    model, _ = demo
    rng = np.random.default_rng(0)
    # Peaked processed logits, like a denoiser part-way through a block.
    logits = mx.array(rng.standard_normal((1, 32, model.vocab_size)).astype(np.float32) * 4.0)
    exact = model.soft_embeddings(logits)
    weight = model.model.decoder.embed_tokens.weight.astype(mx.float32)
    max_row = float(mx.sqrt((weight * weight).sum(-1)).max()) * model.embed_scale
    probs = mx.softmax(logits, axis=-1)
    errors = []
    for k in (4, 16, 64):
        approx = model.soft_embeddings(logits, top_k=k)
        captured = mx.sort(probs, axis=-1)[..., -k:].sum(-1)  # [1, C]
        err = mx.sqrt(((approx.astype(mx.float32) - exact.astype(mx.float32)) ** 2).sum(-1))
        bound = (1 - captured) * max_row
        # bf16 embeddings: allow the rounding of two bf16 sums on top of the bound.
        assert bool(mx.all(err <= bound * 1.02 + 0.05 * max_row / 8))
        errors.append(float(err.mean()))
        print(f"\ntop-{k}: mean |error| {errors[-1]:.4f} (|soft| ~ {float(mx.sqrt((exact.astype(mx.float32) ** 2).sum(-1)).mean()):.3f}), "
              f"captured mass {float(captured.mean()):.3f}")
    assert errors[0] > errors[1] > errors[2]
    full = model.soft_embeddings(logits, top_k=model.vocab_size)
    np.testing.assert_allclose(np.array(full.astype(mx.float32)), np.array(exact.astype(mx.float32)))


def test_top_k_option_reaches_the_decoder(demo):
    model, _ = demo
    exact = list(run(model, Request([2, 5, 9], max_tokens=32, seed=1, sampler=SamplerOptions(max_denoising_steps=4))))
    topk = list(run(model, Request([2, 5, 9], max_tokens=32, seed=1, self_conditioning_top_k=1,
                                   sampler=SamplerOptions(max_denoising_steps=4))))
    first_exact = [e for e in exact if isinstance(e, StepEvent)]
    first_topk = [e for e in topk if isinstance(e, StepEvent)]
    # Step 1 has no self-conditioning, so it is identical; later steps see a different signal.
    assert first_exact[0].argmax.tolist() == first_topk[0].argmax.tolist()
    assert any(a.argmax.tolist() != b.argmax.tolist() for a, b in zip(first_exact[1:], first_topk[1:]))
    assert isinstance(topk[-1], GenerationResult)


def test_prefill_chunks_bound_memory_and_agree(demo):
    """Chunked prefill gives the same decoder logits as one pass, holds only window - 1 rows in
    sliding layers, and keeps their buffers bounded even after an unchunked prompt."""
    model, _ = demo
    ids = mx.array(np.random.default_rng(1).integers(0, model.vocab_size, (1, 700)))
    canvas = mx.arange(model.canvas_length)[None] % model.vocab_size
    keep = model.text.sliding_window - 1
    outs = []
    for chunk in (64, 700):
        mx.reset_peak_memory()
        cache = model.prefill(ids, chunk_size=chunk)
        mx.eval(cache.state())
        peak = mx.get_peak_memory()
        for i, layer in enumerate(cache.layers):
            if model.text.is_sliding(i):
                assert layer.rows == keep and layer.keys.shape[2] <= 2 * (keep + 256)
            else:
                assert layer.rows == 700
        outs.append(model.denoise(canvas, cache))
        print(f"\nchunk {chunk}: prefill peak {peak / 1e6:.1f} MB, cache {cache.nbytes / 1e6:.2f} MB")
    np.testing.assert_allclose(np.array(outs[0]), np.array(outs[1]), atol=1e-3)
