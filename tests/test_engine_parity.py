"""Our engine against the reference `generate`, sharing every random draw.

Ours runs first with a recording NoiseSource; the reference then runs with `torch.randint` and
`torch.multinomial` patched to replay the same stream (canvas init; per step: the draw's
uniforms by inverse CDF, then the renoise ids). Tokens, steps per block and tokens_per_forward
must be identical.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from conftest import build_reference, save_checkpoint, sharpen, tiny_text_config
from mlx_diffusiongemma.diffusion.engine import Request, run
from mlx_diffusiongemma.diffusion.noise import NoiseSource
from mlx_diffusiongemma.diffusion.options import SamplerOptions
from mlx_diffusiongemma.diffusion.events import BlockEvent, GenerationResult
from mlx_diffusiongemma.checkpoint.loading import load_model
from mlx_diffusiongemma.checkpoint.config import load_generation_defaults


class RecordingNoise(NoiseSource):
    """Records every draw in the order the engine consumes it."""

    def __init__(self, seed):
        super().__init__(seed)
        self.log: list[tuple[str, np.ndarray]] = []

    def canvas(self, block, batch, length, vocab):
        out = super().canvas(block, batch, length, vocab)
        self.log.append(("randint", np.array(out)))
        return out

    def step(self, block, step, batch, length, vocab):
        u, r = super().step(block, step, batch, length, vocab)
        self.log += [("uniform", np.array(u)), ("randint", np.array(r))]
        return u, r


def run_reference(ref, prompt, stream, monkeypatch, **gen_kwargs):
    """Reference generate fed from `stream`; returns (new tokens, tokens_per_forward, steps per block).

    A randint right after a multinomial is that step's renoise; any other randint starts a canvas.
    """
    queue = list(stream)
    steps: list[int] = []
    after_draw = [False]

    def fake_randint(low, high=None, size=None, *args, **kwargs):
        kind, value = queue.pop(0)
        assert kind == "randint", "the reference drew noise ids where we drew uniforms (step counts differ)"
        assert tuple(size) == value.shape and high == ref.config.text_config.vocab_size
        if not after_draw[0]:
            steps.append(0)
        after_draw[0] = False
        return torch.tensor(value, dtype=torch.long)

    def fake_multinomial(probs, num_samples=1, *args, **kwargs):
        kind, u = queue.pop(0)
        assert kind == "uniform", "the reference drew a sample where we started a canvas (step counts differ)"
        steps[-1] += 1
        after_draw[0] = True
        # The same inverse-CDF rule as sampler.draw_tokens, on the reference's probabilities.
        cdf = probs.float().cumsum(-1)
        total = cdf[:, -1:]
        target = torch.tensor(u.reshape(-1, 1)) * total
        first = (cdf <= target).sum(-1)
        last = (cdf < total).sum(-1)
        return torch.minimum(first, last).reshape(-1, 1)

    monkeypatch.setattr(torch, "randint", fake_randint)
    monkeypatch.setattr(torch, "multinomial", fake_multinomial)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), **gen_kwargs)
    assert not queue, f"the reference used {len(stream) - len(queue)} of our {len(stream)} draws"
    new = out.sequences[0, len(prompt):].tolist()
    return new, float(out.tokens_per_forward[0]), steps


def run_ours(model, prompt, seed, max_tokens, **sampler_kwargs):
    noise = RecordingNoise(seed)
    events = list(run(model, Request(prompt, max_tokens=max_tokens, sampler=SamplerOptions(**sampler_kwargs)),
                      noise=noise))
    return events, noise.log


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = build_reference(tiny_text_config(), canvas_length=8, seed=11)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("engine") / "ckpt")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = load_model(folder, dtype=mx.float32)
    ours.generation = load_generation_defaults(folder)
    return ref, ours, folder


def _compare(ref, ours, prompt, seed, max_tokens, monkeypatch, eos=None, **sampler_kwargs):
    if eos is not None:
        ours.generation = replace(ours.generation, eos_token_ids=tuple(eos))
    events, log = run_ours(ours, prompt, seed, max_tokens, **sampler_kwargs)
    result = events[-1]
    assert isinstance(result, GenerationResult)
    gen = dict(max_new_tokens=max_tokens, **sampler_kwargs)
    if eos is not None:
        gen["eos_token_id"] = list(eos)
    new, tpf, ref_steps = run_reference(ref, prompt, log, monkeypatch, **gen)
    ours_steps = result.steps_per_block
    assert ref_steps == ours_steps
    n = len(result.tokens)
    assert new[:n] == result.tokens
    assert all(t == 0 for t in new[n:]), "the reference kept tokens we dropped"
    assert tpf == pytest.approx(result.tokens_per_forward, abs=1e-6)
    print(f"\nsteps per block {ours_steps}, tokens {n}, tokens_per_forward {result.tokens_per_forward:.4f}, "
          f"finish {result.finish_reason}")
    return result, events


def test_step_cap_two_blocks(tiny, monkeypatch):
    ref, ours, _ = tiny
    result, events = _compare(ref, ours, [2, 5, 17, 30, 44, 9], seed=1, max_tokens=24, monkeypatch=monkeypatch,
                              eos=[3], max_denoising_steps=5)
    assert len(result.steps_per_block) == 3 and all(s == 5 for s in result.steps_per_block)
    assert result.finish_reason == "length"
    assert [e.stop_reason for e in events if isinstance(e, BlockEvent)] == ["step_cap"] * 3


def test_eos_in_the_middle_of_a_canvas(tiny, monkeypatch):
    ref, ours, _ = tiny
    prompt = [2, 7, 7, 19, 60]
    ours.generation = replace(ours.generation, eos_token_ids=(3,))
    first, _ = run_ours(ours, prompt, 5, 16, max_denoising_steps=4)
    second_block = first[-1].tokens[8:]
    # An id whose first occurrence in block 2 is in the middle, and absent from block 1.
    pick = next(t for i, t in enumerate(second_block) if 2 <= i <= 6 and t not in first[-1].tokens[:8 + i])
    result, events = _compare(ref, ours, prompt, seed=5, max_tokens=24, monkeypatch=monkeypatch,
                              eos=[pick, 3], max_denoising_steps=4)
    assert result.finish_reason == "stop" and result.tokens[-1] == pick
    assert 8 < len(result.tokens) < 16
    assert [e.stop_reason for e in events if isinstance(e, BlockEvent)][-1] == "eos"


def test_adaptive_stop_fires(tmp_path, monkeypatch):
    """A sharpened checkpoint (conftest.sharpen) where the stable-and-confident stop fires
    (measured: after 5-8 steps)."""
    built = build_reference(tiny_text_config(), canvas_length=8, seed=4)
    sharpen(built)
    folder = save_checkpoint(built, tmp_path / "sharp")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = load_model(folder, dtype=mx.float32)
    ours.generation = load_generation_defaults(folder)
    result, events = _compare(ref, ours, [2, 11, 12, 13], seed=0, max_tokens=24, monkeypatch=monkeypatch,
                              eos=[3], max_denoising_steps=12)
    assert len(result.steps_per_block) >= 2
    assert all(2 < s < 12 for s in result.steps_per_block), "the adaptive stop did not fire in every block"
    assert all(e.converged for e in events if isinstance(e, BlockEvent))
