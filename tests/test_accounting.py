"""The work accounting of a denoising step (`mlx_diffusiongemma.accounting`) against what one
`model.denoise` call actually multiplies, and the zero-copy claim of the decoder path.

The FLOPs are counted from the shapes of every matrix product of one decoder pass on the demo
checkpoint (float32, no quantization): `nn.Linear` calls, the experts' `mx.gather_mm`, the
attention products inside `split_attention`, the tied LM head (`Embedding.as_linear`) and the
self-conditioning `softmax @ E`; then compared, category by category, with `step_work`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_diffusiongemma.perf import accounting as A
from mlx_diffusiongemma import load
from mlx_diffusiongemma.model import model as model_mod
from mlx_diffusiongemma.model.args import parse_text_args
from mlx_diffusiongemma.demo.random import ensure_demo

PROMPT = 100  # longer than the demo's canvas (32) and sliding window (64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = ensure_demo(tmp_path_factory.mktemp("acct") / "demo")
    model, _ = load(folder, dtype=mx.float32)
    ids = mx.array(np.random.default_rng(0).integers(12, model.vocab_size, PROMPT), dtype=mx.int32)
    cache = model.prefill(ids)
    mx.eval(cache.state())
    canvas = mx.array(np.random.default_rng(1).integers(0, model.vocab_size, model.canvas_length), dtype=mx.int32)
    first = model.denoise(canvas, cache, None)
    sc = (first / 0.7).astype(model.embed_dtype)
    mx.eval(sc)
    return model, cache, canvas, sc


def _category(path: str) -> str:
    if ".self_attn." in path:
        return "attention_projections"
    if ".mlp." in path:
        return "dense_mlp"
    if "router.proj" in path:
        return "router"
    if "self_conditioning." in path:
        return "self_conditioning_mlp"
    raise AssertionError(f"unexpected linear layer {path}")


def _count_denoise(model, cache, canvas, sc, monkeypatch):
    """FLOPs per category and the prefix rows each attention call saw, from one denoise call."""
    names = {id(m): path for path, m in model.named_modules()}
    counted: dict[str, int] = {}
    prefix_rows: list[int] = []

    def add(key, n):
        counted[key] = counted.get(key, 0) + int(n)

    orig_linear = nn.Linear.__call__

    def linear(self, x):
        out_dim, in_dim = self.weight.shape
        add(_category(names[id(self)]), 2 * math.prod(x.shape[:-1]) * in_dim * out_dim)
        return orig_linear(self, x)

    orig_gather = mx.gather_mm

    def gather_mm(a, b, *args, rhs_indices=None, **kwargs):
        pairs = math.prod(np.broadcast_shapes(a.shape[:-2], rhs_indices.shape))
        add("experts", 2 * pairs * a.shape[-2] * b.shape[-2] * b.shape[-1])
        return orig_gather(a, b, *args, rhs_indices=rhs_indices, **kwargs)

    orig_split = model_mod.split_attention

    def split_attention(q, parts):
        b, hq, n, d = q.shape
        for k, v, _ in parts:
            add("attention_scores_values", 2 * b * hq * n * d * k.shape[2] + 2 * b * hq * n * k.shape[2] * v.shape[-1])
        if len(parts) == 2:
            prefix_rows.append(parts[0][0].shape[2])
        else:
            prefix_rows.append(0)
        return orig_split(q, parts)

    orig_as_linear = nn.Embedding.as_linear

    def as_linear(self, x):
        v, d = self.weight.shape
        add("lm_head", 2 * math.prod(x.shape[:-1]) * d * v)
        return orig_as_linear(self, x)

    orig_soft = model_mod.Model.soft_embeddings

    def soft_embeddings(self, logits, *args, **kwargs):
        v, d = self.model.decoder.embed_tokens.weight.shape
        add("self_conditioning_soft_embedding", 2 * math.prod(logits.shape[:-1]) * v * d)  # probs @ E
        return orig_soft(self, logits, *args, **kwargs)

    monkeypatch.setattr(nn.Linear, "__call__", linear)
    monkeypatch.setattr(mx, "gather_mm", gather_mm)
    monkeypatch.setattr(model_mod, "split_attention", split_attention)
    monkeypatch.setattr(nn.Embedding, "as_linear", as_linear)
    monkeypatch.setattr(model_mod.Model, "soft_embeddings", soft_embeddings)
    mx.eval(model.denoise(canvas, cache, sc))
    monkeypatch.undo()
    return counted, prefix_rows


def test_flops_match_the_matrix_products_of_one_denoise_call(demo, monkeypatch):
    model, cache, canvas, sc = demo
    counted, prefix_rows = _count_denoise(model, cache, canvas, sc, monkeypatch)
    work = A.step_work(model.text, model.canvas_length, cache.length)
    f = work["flops"]
    for key in ("attention_projections", "attention_scores_values", "dense_mlp", "router", "experts",
                "lm_head", "self_conditioning_soft_embedding", "self_conditioning_mlp"):
        assert counted.get(key) == f[key], (key, counted.get(key), f[key])
    assert f["decoder_total"] == sum(counted.values())
    # Sliding layers saw window - 1 prefix rows, full layers the whole prompt.
    t = model.text
    expected = [A.visible_prefix_rows(t, i, cache.length) for i in range(t.num_hidden_layers)]
    assert prefix_rows == expected
    assert expected[0] == t.sliding_window - 1 < PROMPT and expected[-1] == PROMPT


def test_hand_computed_numbers():
    """One small config worked out by hand."""
    t = parse_text_args({
        "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16, "moe_intermediate_size": 4,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 5,
        "per_layer_config": {"1": {"head_dim": 8, "num_key_value_heads": 1}},
        "num_experts": 4, "top_k_experts": 2,
    })
    c, n = 3, 10  # canvas 3, 10 cached tokens
    sliding = A.layer_flops(t, 0, c, n)
    # q: 2*3*8*(2*4)=384, o: 384, k: 2*3*8*4=192, v: 192
    assert sliding["attention_projections"] == 384 + 384 + 192 + 192
    # keys = min(10, 5 - 1) + 3 = 7: scores 2*3*2*4*7 = 336, values the same
    assert sliding["attention_scores_values"] == 2 * 336
    full = A.layer_flops(t, 1, c, n)
    # q 2*3*8*16=768, o 768, k 2*3*8*8=384, no v; keys 10 + 3 = 13: 2 * (2*3*2*8*13)
    assert full["attention_projections"] == 768 + 768 + 384
    assert full["attention_scores_values"] == 2 * (2 * 3 * 2 * 8 * 13)
    assert sliding["dense_mlp"] == 3 * 2 * 3 * 8 * 16
    assert sliding["router"] == 2 * 3 * 8 * 4
    assert sliding["experts"] == 3 * 2 * (2 * 8 * 8 + 2 * 4 * 8)  # C*k pairs, gate_up [8->8], down [4->8]
    w = A.step_work(t, c, n)
    assert w["flops"]["lm_head"] == 2 * 3 * 8 * 100
    assert w["flops"]["self_conditioning_soft_embedding"] == 2 * 3 * 100 * 8
    assert A.step_work(t, c, n, top_k_self_conditioning=5)["flops"]["self_conditioning_soft_embedding"] == 2 * 3 * 5 * 8
    # K and V of the visible prefix, 2 bytes each: layer 0 4 rows x 1 head x 4, layer 1 10 rows x 1 x 8
    assert w["kv_copy_bytes"] == {"ours": 0, "concatenating": 2 * 2 * (4 * 4 + 10 * 8)}
    assert w["visible_prefix_rows"] == {"sliding": 4, "full": 10}
    # 3 x 2 = 6 (token, expert) pairs >= 4 experts: every expert is read.
    assert w["distinct_experts_per_layer_bound"] == 4
    wb = w["weight_bytes"]["bf16"]
    assert wb["experts"] == 2 * 2 * 4 * (2 * 4 * 8 + 8 * 4)
    assert wb["lm_head"] == 2 * 100 * 8 and wb["canvas_embedding"] == 2 * 3 * 8
    assert A.step_work(t, 1, n)["distinct_experts_per_layer_bound"] == 2  # one token, top-2


def test_weight_bytes_follow_the_quantization_recipe():
    t = parse_text_args({
        "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "layer_types": ["sliding_attention", "full_attention"], "num_experts": 8, "top_k_experts": 2,
    })
    bf16 = A.weight_bytes_per_step(t, 32, "bf16")
    q = A.weight_bytes_per_step(t, 32, "mixed-4bit")
    four, eight = 0.5 + 4 / 64, 1 + 4 / 64  # packed bits + bf16 scale and bias per group of 64
    assert q["experts"] == round(bf16["experts"] / 2 * four)
    assert q["attention"] == round(bf16["attention"] / 2 * eight)
    assert q["lm_head"] == round(bf16["lm_head"] / 2 * eight)
    assert bf16["total"] / 2.5 < q["total"] < bf16["total"] / 2  # mostly 8-bit here


def test_26b_shape():
    """The released model's step at 8K: numbers the docs quote."""
    t = parse_text_args({
        "vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112, "moe_intermediate_size": 704,
        "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "global_head_dim": 512, "num_global_key_value_heads": 2, "num_experts": 128, "top_k_experts": 8,
        "sliding_window": 1024,
    })
    w = A.step_work(t, 256, 8192)
    assert w["distinct_experts_per_layer_bound"] == 128
    # 25 sliding layers x 1023 rows x 8 x 256 + 5 full layers x 8192 x 2 x 512, K and V, bf16
    assert w["kv_copy_bytes"]["concatenating"] == 2 * 2 * (25 * 1023 * 8 * 256 + 5 * 8192 * 2 * 512)
    assert w["flops"]["lm_head"] == w["flops"]["self_conditioning_soft_embedding"] == 2 * 256 * 262144 * 2816
    assert 2.7e12 < w["flops"]["decoder_total"] < 2.9e12


def test_denoise_copies_no_cached_prefix(demo, monkeypatch):
    """No array the decoder concatenates is as long as the cached prefix, and it writes nothing."""
    model, cache, canvas, sc = demo
    assert cache.length == PROMPT > model.canvas_length
    calls: dict[str, list] = {"concatenate": [], "slice_update": []}
    for name in calls:
        orig = getattr(mx, name)

        def wrapper(*args, _orig=orig, _name=name, **kwargs):
            out = _orig(*args, **kwargs)
            calls[_name].append(tuple(out.shape))
            return out

        monkeypatch.setattr(mx, name, wrapper)
    before = [(layer.keys, layer.values, layer.start, layer.end) for layer in cache.layers]

    # Positive control: the patched functions are the ones the runtime calls (the encoder
    # writes the cache with mx.slice_update).
    fork = cache.copy()
    model.extend(fork, [5, 6, 7])
    assert calls["slice_update"], "the cache's writes did not go through the patched mx.slice_update"
    calls["slice_update"].clear()
    calls["concatenate"].clear()

    mx.eval(model.denoise(canvas, cache, sc))
    mx.eval(model.denoise(canvas, cache, None))
    monkeypatch.undo()
    big = [s for s in calls["concatenate"] if any(d >= PROMPT for d in s)]
    assert not big, f"denoise concatenated prefix-sized arrays: {big}"
    assert not calls["slice_update"], "denoise wrote into the cache"
    after = [(layer.keys, layer.values, layer.start, layer.end) for layer in cache.layers]
    assert all(a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(before, after))
    assert A.step_work(model.text, model.canvas_length, cache.length)["kv_copy_bytes"]["ours"] == 0


def test_one_host_sync_per_step(demo, tmp_path):
    """The accounting's "ours: 1 host synchronisation per step" is what the engine reports."""
    from mlx_diffusiongemma import generate

    model, _, _, _ = demo
    tok = load(ensure_demo(tmp_path / "d"))[1]
    r = generate(model, tok, [2, 20, 21, 22], max_tokens=2 * model.canvas_length, seed=0,
                 max_denoising_steps=3, confidence_threshold=-1.0)
    assert r.decoder_passes == sum(r.steps_per_block) == 6
    assert r.host_syncs == r.decoder_passes
