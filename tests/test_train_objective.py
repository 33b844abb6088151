"""The training objective against the reference: for fixed noise, our loss equals cross-entropy
computed from the `transformers` model's logits on the same inputs (float32); the dense expert
form equals the gather form; a left-padded batch equals its examples one by one; a CI-sized run
lowers the loss."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch

from conftest import build_reference, save_checkpoint, tiny_text_config
from mlx_diffusiongemma.checkpoint.loading import load_model
from mlx_diffusiongemma.train.objective import (
    CanvasItem, Example, canvas_items, canvas_logits, corrupt, cross_entropy, diffusion_loss,
    encode_context, make_batch,
)
from mlx_diffusiongemma.train.loop import evaluate, train

CANVAS = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import DiffusionGemmaForBlockDiffusion

    built = build_reference(tiny_text_config(), canvas_length=CANVAS, seed=3)
    folder = save_checkpoint(built, tmp_path_factory.mktemp("objective") / "ckpt")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = load_model(folder, dtype=mx.float32)
    return ref, ours


def _items(vocab: int, lengths=(11, 5, 16)) -> list[CanvasItem]:
    rng = np.random.default_rng(0)
    return [CanvasItem(tuple(rng.integers(0, vocab, n).tolist()), tuple(rng.integers(0, vocab, CANVAS).tolist()))
            for n in lengths]


def _reference_loss(ref, batch, corruption) -> float:
    ctx = torch.tensor(np.array(batch.context), dtype=torch.long)
    valid = torch.tensor(np.array(batch.context_valid), dtype=torch.long)
    noisy = torch.tensor(np.array(corruption.noisy), dtype=torch.long)
    sc_mask = torch.tensor(np.array(corruption.self_condition))
    temp = torch.tensor(np.array(corruption.temperature))
    target = torch.tensor(np.array(batch.target), dtype=torch.long)
    dec_mask = torch.cat([valid, torch.ones_like(noisy)], dim=1)
    with torch.no_grad():
        first = ref(input_ids=ctx, attention_mask=valid, decoder_input_ids=noisy,
                    decoder_attention_mask=dec_mask).logits
        logits = ref(input_ids=ctx, attention_mask=valid, decoder_input_ids=noisy,
                     decoder_attention_mask=dec_mask, self_conditioning_logits=first / temp[:, None, None],
                     self_conditioning_mask=sc_mask).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)))


@pytest.mark.parametrize("lengths", [(13,), (11, 5, 16)])
def test_loss_equals_reference_cross_entropy(pair, lengths):
    ref, ours = pair
    vocab = ours.vocab_size
    batch = make_batch(_items(vocab, lengths), multiple=1)
    for seed in range(3):
        corruption = corrupt(mx.random.key(seed), batch.target, vocab)
        if seed == 0:  # make sure both self-conditioned and plain examples occur
            n = batch.size
            corruption.self_condition = mx.array([i % 2 == 0 for i in range(n)]) if n > 1 else mx.array([True])
        ours_loss = cross_entropy(canvas_logits(ours, encode_context(ours, batch), corruption), batch.target).item()
        assert abs(ours_loss - _reference_loss(ref, batch, corruption)) < 1e-5


def test_diffusion_loss_is_the_same_computation(pair):
    _, ours = pair
    batch = make_batch(_items(ours.vocab_size), multiple=1)
    key = mx.random.key(7)
    loss, n = diffusion_loss(ours, batch, key)
    corruption = corrupt(key, batch.target, ours.vocab_size)
    direct = cross_entropy(canvas_logits(ours, encode_context(ours, batch), corruption), batch.target)
    assert n.item() == batch.target.size
    assert abs(loss.item() - direct.item()) < 1e-6


def test_padded_batch_equals_examples_one_by_one(pair):
    _, ours = pair
    items = _items(ours.vocab_size)
    batch = make_batch(items, multiple=8)
    assert batch.context.shape[1] == 16
    corruption = corrupt(mx.random.key(1), batch.target, ours.vocab_size)
    together = canvas_logits(ours, encode_context(ours, batch), corruption)
    for i, item in enumerate(items):
        single = make_batch([item], multiple=1)
        sub = type(corruption)(corruption.noisy[i : i + 1], corruption.self_condition[i : i + 1],
                               corruption.temperature[i : i + 1])
        alone = canvas_logits(ours, encode_context(ours, single), sub)
        assert np.abs(np.array(together[i]) - np.array(alone[0])).max() < 1e-4


def test_dense_experts_equal_gather_experts(pair):
    _, ours = pair
    batch = make_batch(_items(ours.vocab_size), multiple=1)
    corruption = corrupt(mx.random.key(2), batch.target, ours.vocab_size)
    gather = canvas_logits(ours, encode_context(ours, batch), corruption)
    for layer in ours.layers:
        layer.experts.dense = True
    try:
        dense = canvas_logits(ours, encode_context(ours, batch), corruption)
    finally:
        for layer in ours.layers:
            layer.experts.dense = False
    assert np.abs(np.array(gather) - np.array(dense)).max() < 1e-4


def test_canvas_items_split_answers_and_pad_with_eos():
    ex = Example((5, 6, 7), tuple(range(10, 21)))  # 11 answer tokens, canvas 4 -> 3 canvases
    items = canvas_items(ex, 4, eos_id=1)
    assert [it.target for it in items] == [(10, 11, 12, 13), (14, 15, 16, 17), (18, 19, 20, 1)]
    assert items[0].context == (5, 6, 7)
    assert items[2].context == (5, 6, 7) + tuple(range(10, 18))
    assert len(canvas_items(Example((1,), (9, 9, 9, 9)), 4, eos_id=1)) == 1
    with pytest.raises(ValueError):
        canvas_items(Example((), (1,)), 4, eos_id=1)


def test_pinned_positions_stay_clean_under_corruption():
    """A template's fixed text is given at inference, so training never corrupts it; the rest of
    the canvas gets the same draws as without pins, and the EOS padding after the answer is live."""
    ex = Example((5, 6), tuple(range(10, 16)), answer_pinned=(True, False, True, True, False, False))
    items = canvas_items(ex, 4, eos_id=1)
    assert [it.pinned for it in items] == [(True, False, True, True), (False, False, False, False)]
    with pytest.raises(ValueError):
        canvas_items(Example((5,), (10, 11), answer_pinned=(True,)), 4, eos_id=1)
    batch = make_batch(items + [CanvasItem((2,), (7, 7, 7, 7))])
    assert batch.pinned is not None and batch.pinned.shape == (3, 4)
    assert make_batch([CanvasItem((2,), (7, 7, 7, 7))]).pinned is None
    target = mx.array(np.random.default_rng(0).integers(2, 50, (64, 16)), dtype=mx.int32)
    pins = mx.array(np.random.default_rng(1).random((64, 16)) < 0.4)
    key = mx.random.key(3)
    free = corrupt(key, target, 1000)
    kept = corrupt(key, target, 1000, pinned=pins)
    p, t, a, b = (np.array(x) for x in (pins, target, free.noisy, kept.noisy))
    assert (b[p] == t[p]).all()
    assert (b[~p] == a[~p]).all()
    assert (a[p] != t[p]).any()  # the pins did protect something
    assert (np.array(free.self_condition) == np.array(kept.self_condition)).all()


def test_a_short_run_lowers_the_loss(tmp_path):
    """CI-sized: a tiny random model learns to answer with a fixed canvas for a fixed prompt."""
    from mlx_diffusiongemma.model.args import parse_model_args
    from mlx_diffusiongemma.model.model import Model

    cfg = {"model_type": "diffusion_gemma", "canvas_length": CANVAS,
           "text_config": tiny_text_config(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                           num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])}
    mx.random.seed(0)
    model = Model(parse_model_args(cfg))
    for layer in model.layers:
        layer.experts.dense = True
    items = [CanvasItem((2, 5, 6), (40, 41, 42, 43, 44, 1, 1, 1)), CanvasItem((2, 7), (50, 51, 1, 1, 1, 1, 1, 1))]
    batch = make_batch(items)
    before = evaluate(model, [batch])
    for report in train(model, optim.Adam(learning_rate=3e-3), iter(lambda: batch, None), iters=60, report_every=20):
        assert np.isfinite(report.loss)
    after = evaluate(model, [batch])
    assert after < 0.5 * before


def test_fast_activations_match_mlx_values_and_gradients():
    from mlx_diffusiongemma.model import activations as fastmath

    x = mx.concatenate([mx.linspace(-12, 12, 2001), mx.random.normal((4000,)) * 3])
    assert np.abs(np.array(fastmath.tanh(x)) - np.array(mx.tanh(x))).max() < 1e-6
    assert np.abs(np.array(fastmath.gelu_tanh(x)) - np.array(nn.gelu_approx(x))).max() < 1e-5
    for fast, ref in ((fastmath.tanh, mx.tanh), (fastmath.gelu_tanh, nn.gelu_approx)):
        g_fast = mx.grad(lambda v: (fast(v) * v).sum())(x)
        g_ref = mx.grad(lambda v: (ref(v) * v).sum())(x)
        assert np.abs(np.array(g_fast) - np.array(g_ref)).max() < 1e-4


def test_training_kernels_give_the_same_loss(pair):
    _, ours = pair
    batch = make_batch(_items(ours.vocab_size), multiple=1)
    key = mx.random.key(11)
    exact = diffusion_loss(ours, batch, key)[0].item()
    ours.set_training_kernels(dense_experts=True, fast_activations=True)
    try:
        fast = diffusion_loss(ours, batch, key)[0].item()
    finally:
        ours.set_training_kernels(dense_experts=False, fast_activations=False)
    assert abs(exact - fast) < 1e-4
    assert diffusion_loss(ours, batch, key)[0].item() == exact
