"""The quantized prefix KV cache (`kv_bits`, mlx-lm's `--kv-bits`): off by default (the float
cache, the exact path); on, the cache holds `mx.quantize`d K/V that the attention reads in place
(equal to a float cache holding the same values dequantized), the logits stay within a measured
bound of the float cache's, the decoder never writes the cache, the memory plan counts the
quantized bytes, bad values are refused in one line."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.checkpoint import loading
from mlx_diffusiongemma.checkpoint.memory import kv_bytes
from mlx_diffusiongemma.model import cache as kvcache
from mlx_diffusiongemma.server.prompt_cache import PromptCacheStore

from conftest import build_reference, error_line, invoke, save_checkpoint, tiny_text_config

# Measured on this fixture and inputs (random weights, float32, group 32; logits up to 2.6 in
# magnitude), first / second denoising step: 8-bit max |logit error| 0.49 / 0.58, KL 0.0059 /
# 0.0078 per position; 4-bit 2.07 / 2.50, KL 0.10 / 0.13. Random models amplify any rounding
# (bf16 weights alone: KL 0.28 on scripts/recipe_cost.py's tiny preset); the trained demo model's
# 8-bit KL is 3e-6 (scripts/kv_bits_cost.py). The bounds keep a 2x margin.
KV8_MAX_ABS = 1.2
KV8_KL = 0.016


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random checkpoint whose head dims (32, 64) take mx.quantize's group size 32."""
    model = build_reference(tiny_text_config(head_dim=32, global_head_dim=64))
    return save_checkpoint(model, tmp_path_factory.mktemp("kv") / "ckpt")


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    prompt = mx.array([rng.integers(3, tiny_text_config()["vocab_size"], 40).tolist()])
    return prompt, rng


def _kl(p: mx.array, q: mx.array) -> float:
    lp, lq = p - mx.logsumexp(p, -1, keepdims=True), q - mx.logsumexp(q, -1, keepdims=True)
    return float(mx.mean(mx.sum(mx.exp(lp) * (lp - lq), -1)))


def _logits(model, prompt, canvas):
    cache = model.prefill(prompt, chunk_size=16)  # several chunks: the encoder reads quantized rows too
    first = model.denoise(canvas, cache)
    return cache, first, model.denoise(canvas, cache, self_conditioning=first)


def test_off_by_default_and_none_is_the_float_cache(folder, inputs):
    prompt, _ = inputs
    model, _ = loading.load_model(folder, dtype=mx.float32)
    assert model.kv_bits is None and model.memory_plan.kv_bits is None
    cache = model.prefill(prompt, chunk_size=16)
    assert all(type(layer.keys) is type(layer.values) is mx.array for layer in cache.layers)
    assert cache.nbytes == sum(a.nbytes for a in cache.state())
    model.set_kv_bits(8)
    model.set_kv_bits(None)  # back to the float cache
    assert all(type(layer.keys) is mx.array for layer in model.prefill(prompt).layers)
    off, _ = loading.load_model(folder, dtype=mx.float32, kv_bits=None)
    assert off.kv_bits is None and off.memory_plan.kv == model.memory_plan.kv


def test_kv8_reads_quantized_rows_in_place_within_a_measured_bound(folder, inputs, monkeypatch):
    prompt, rng = inputs
    model, _ = loading.load_model(folder, dtype=mx.float32)
    canvas = mx.array(rng.integers(0, model.vocab_size, (1, model.canvas_length)))
    _, ref1, ref2 = _logits(model, prompt, canvas)
    model.set_kv_bits(8)
    assert model.kv_group_size == 32  # 64 does not divide the 32-wide heads
    cache, q1, q2 = _logits(model, prompt, canvas)
    for layer in cache.layers:
        assert isinstance(layer.keys, kvcache.QuantizedRows) and layer.keys.data.dtype == mx.uint32
        assert layer.keys.bits == 8 and layer.values.group_size == 32
    # The decoder only reads: it rebinds no buffer of the cache and the visible rows keep their
    # values (numpy copies taken before, compared after the pass is evaluated).
    buffers = cache.state()
    visible = [np.array(part) for layer in cache.layers for q in layer.view() for part in q.arrays()]
    mx.eval(model.denoise(canvas, cache, self_conditioning=q1))
    assert all(a is b for a, b in zip(buffers, cache.state()))
    after = [np.array(part) for layer in cache.layers for q in layer.view() for part in q.arrays()]
    changed = [i for i, (a, b) in enumerate(zip(visible, after)) if not np.array_equal(a, b)]
    assert not changed, f"visible cache arrays {changed} changed (NaN before: {[bool(np.isnan(visible[i]).any()) for i in changed]})"
    err = max(float(mx.abs(q - r).max()) for q, r in ((q1, ref1), (q2, ref2)))
    kl = max(_kl(r, q) for q, r in ((q1, ref1), (q2, ref2)))
    assert 0 < err < KV8_MAX_ABS and kl < KV8_KL, (err, kl)
    model.set_kv_bits(4)  # fewer bits, further off: the measure can tell them apart
    _, f1, f2 = _logits(model, prompt, canvas)
    assert max(_kl(r, q) for q, r in ((f1, ref1), (f2, ref2))) > kl

    # Oracle: a float cache holding the dequantized rows gives the same logits (to float32
    # rounding), so the in-place quantized_matmul read adds nothing beyond the rounding of K/V.
    model.set_kv_bits(None)
    append = kvcache.LayerKV.append

    def dequantized_append(self, k, v):
        k, v = (kvcache.quantize_rows(x, 32, 8).dequantized() for x in (k, v))
        return append(self, k, v)

    # The batched decoder pass (the server's) and a fork (the prompt-cache store's) read the same rows.
    other = cache.copy()
    rows = model.denoise_batch([canvas, canvas[:, ::-1]], [cache, other], [None, None], [None, None])
    assert float(mx.abs(rows[:1] - q1).max()) < 1e-4
    assert other.nbytes == cache.nbytes == sum(a.nbytes for a in cache.state())
    store = PromptCacheStore()
    store.insert(list(range(cache.length)), cache)
    store.insert(list(range(1, cache.length + 1)), other)
    assert store.nbytes == cache.nbytes  # shared buffers counted once

    monkeypatch.setattr(kvcache.LayerKV, "append", dequantized_append)
    _, d1, d2 = _logits(model, prompt, canvas)
    assert max(float(mx.abs(q - d).max()) for q, d in ((q1, d1), (q2, d2))) < 1e-4


def test_generation_and_the_plan_with_kv_bits(folder):
    model, tok = dg.load(str(folder), kv_bits=8, dtype="bfloat16")
    assert model.memory_plan.kv_bits == 8 and model.kv_bits == 8
    out = dg.generate(model, tok, "hello", max_tokens=8, seed=0)
    assert out.tokens
    # The plan's quantized bytes are what the cache holds: bf16 K/V, 8-bit codes plus a bf16
    # scale and bias per group of 32: (d + 2 * d / 32 * 2) / (2 * d) = 0.5625 of the float cache.
    model.set_kv_bits(None)
    ids = mx.array([[3 + i % (model.vocab_size - 3) for i in range(297)]])
    float_cache = model.prefill(ids)
    model.set_kv_bits(8)
    quantized = model.prefill(ids)
    assert quantized.nbytes / float_cache.nbytes == pytest.approx(0.5625)
    t = model.text
    assert kv_bytes(t, 2000, kv_bits=8, kv_group_size=32) / kv_bytes(t, 2000) == pytest.approx(0.5625)
    assert kv_bytes(t, 2000, kv_bits=4, kv_group_size=32) / kv_bytes(t, 2000) == pytest.approx(0.3125)
    plan = loading.plan(folder, context=2000, kv_bits=4)
    assert plan.kv == kv_bytes(t, 2000, kv_bits=4, kv_group_size=32) < loading.plan(folder, context=2000).kv
    assert "(4-bit)" in plan.summary()


def test_bad_kv_bits_are_refused_in_one_line(folder, runner):
    with pytest.raises(ValueError, match="kv_bits must be one of 4, 8"):
        loading.load_model(folder, kv_bits=3)
    with pytest.raises(ValueError, match="kv_group_size 64 does not divide"):
        loading.plan(folder, kv_bits=8, kv_group_size=64)
    with pytest.raises(ValueError, match="kv_group_size must be one of"):
        loading.plan(folder, kv_bits=8, kv_group_size=48)
    result = invoke(runner, ["generate", "--model", str(folder), "--prompt", "hi", "--kv-bits", "2"])
    assert result.exit_code == 2 and "must be one of 4, 8" in result.output
    result = invoke(runner, ["generate", "--model", str(folder), "--prompt", "hi", "--kv-bits", "8", "--kv-group-size", "128"])
    assert result.exit_code == 1 and "does not divide" in error_line(result, last=True)
    result = invoke(runner, ["info", str(folder), "--kv-bits", "8", "--context", "2000"])
    assert result.exit_code == 0 and "8-bit KV cache" in result.output, result.output
