"""The step's vocabulary-sized work in row chunks (`sampler.chunked_step`): a small budget forced on
tiny models gives the one-chunk run's bits, tokens and arrays alike."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import build_reference, save_checkpoint, tiny_text_config
from mlx_diffusiongemma.checkpoint.loading import load_model
from mlx_diffusiongemma.diffusion import sampler
from mlx_diffusiongemma.diffusion.canvas import CanvasState
from mlx_diffusiongemma.diffusion.engine import Request, run
from mlx_diffusiongemma.diffusion.events import StepEvent
from mlx_diffusiongemma.diffusion.options import FastOptions, SamplerOptions
from mlx_diffusiongemma.model import args

ROWS = 3  # rows per chunk when forced: a canvas of 16 runs as 6 chunks, the last one short


@pytest.fixture(scope="module", params=["float32", "4bit"])
def model(request, tmp_path_factory):
    ref = build_reference(tiny_text_config(), canvas_length=16, seed=2)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("chunk") / "ckpt")
    if request.param == "float32":
        return load_model(folder, dtype=mx.float32)[0]
    return load_model(folder, quantize="mixed-4bit")[0]


def _force(monkeypatch, vocab: int) -> None:
    monkeypatch.setattr(args, "STEP_CHUNK_BYTES", ROWS * 4 * vocab)
    assert args.step_chunk_rows(vocab) == ROWS


def _generate(model, hooked=True, **kw):
    """Every step's arrays and the processed logits a hook sees, for one two-block request."""
    seen = []

    def hook(view):
        if view.processed_logits is not None:
            seen.append(np.array(view.processed_logits))

    req = Request([2, 5, 17, 30], max_tokens=2 * model.canvas_length, seed=7, hooks=(hook,) if hooked else (),
                  sampler=SamplerOptions(max_denoising_steps=6, confidence_threshold=-1.0), **kw)
    events = list(run(model, req))
    steps = [(e.canvas.tolist(), e.argmax.tolist(), e.accepted.tolist(), e.mean_entropy)
             for e in events if isinstance(e, StepEvent)]
    return events[-1].tokens, steps, seen


@pytest.mark.parametrize("mode", [
    dict(hooked=False),  # the exact path, the reference's step
    dict(),  # the exact path, with a hook reading the processed logits
    dict(canvases={0: CanvasState.from_lists(16, pins={0: 5, 4: 9})}),  # pins
    dict(fast=FastOptions()),  # fast mode: its first pass computes every row
    dict(fast=FastOptions(top_k=8, confidence_commit=0.9)),  # top-k statistics, kept top probabilities
])
def test_chunked_rows_give_the_one_chunk_bits(model, mode, monkeypatch):
    one = _generate(model, **mode)
    assert args.step_chunk_rows(model.vocab_size) >= model.canvas_length  # the default: one chunk
    _force(monkeypatch, model.vocab_size)
    chunked = _generate(model, **mode)
    assert chunked[0] == one[0] and chunked[1] == one[1]  # tokens, every step's canvases and mean entropy
    assert len(chunked[2]) == len(one[2]) and (len(one[2]) > 0) == (mode.get("hooked", True) and "fast" not in mode)
    for a, b in zip(chunked[2], one[2]):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("top_k", [None, 4])
def test_chunked_step_equals_the_compiled_step(top_k, monkeypatch):
    """Every output of the step, and what a denoiser keeps of the processed logits, bit for bit,
    with pins, padding rows and allowed tokens."""
    b, c, v = 1, 10, 64
    key = mx.random.key(0)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    logits = 5 * mx.random.normal((b, c, v), key=k1)
    canvas = mx.random.randint(0, v, (b, c), key=k2)
    u = mx.random.uniform(shape=(b, c), key=k3)
    noise = mx.random.randint(0, v, (b, c), key=k4)
    pinned = mx.array([[True] + [False] * (c - 1)])
    ids = mx.full((b, c), 3, dtype=mx.int32)
    valid = mx.array([[True] * (c - 2) + [False] * 2])
    allowed = mx.arange(v)[None, None, :] % 3 != 1
    kw = dict(pinned=pinned, ids=ids, valid=valid, allowed=allowed, top_k=top_k, with_gap=True)
    t = mx.array(0.7)
    full = sampler.compiled_step(logits, canvas, t, u, noise, 0.5, **kw)
    _force(monkeypatch, v)
    res, kept = sampler.chunked_step(logits, canvas, t, u, noise, 0.5, keep=lambda p, i: [p, i], **kw)
    assert len(kept) == 4
    for name in ("next_canvas", "argmax", "accepted", "token_entropy", "gap"):
        assert np.array(getattr(res, name)).tobytes() == np.array(getattr(full, name)).tobytes(), name
    for j, name in enumerate(("processed_logits", "top_k_ids") if top_k else ("processed_logits",)):
        joined = mx.concatenate([k[j] for k in kept], axis=1)
        assert np.array(joined).tobytes() == np.array(getattr(full, name)).tobytes(), name
