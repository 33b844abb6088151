"""The training loop: batches -> loss and gradients -> optimizer update, yielding reports.

One loop serves `dgemma finetune` (LoRA or full) and the demo model's training script. It is a
generator of small `TrainReport` objects (as `stream_generate` yields events), so callers render
progress, evaluate, save or stop as they like; closing the generator stops training.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten

from ..errors import NumericalError
from .objective import Batch, diffusion_loss


@dataclass
class TrainReport:
    step: int  # optimizer steps done (1-based)
    loss: float  # mean training loss since the previous report
    learning_rate: float
    it_per_s: float
    tokens_per_s: float
    trained_tokens: int  # context + canvas tokens processed so far
    peak_memory_gb: float
    val_loss: float | None = None  # set on the steps where validation ran


def step_key(seed: int, step: int) -> mx.array:
    """The corruption key of one step: a function of (seed, step) only."""
    return mx.random.key((seed * 1_000_003 + step) % 2**63)


def _trainable(model: nn.Module) -> list:
    return tree_flatten(model.trainable_parameters())


def evaluate(model, batches: Iterable[Batch], seed: int = 0, **loss_options) -> float:
    """Mean diffusion loss over `batches` with fixed corruption keys (comparable across calls)."""
    total = count = 0.0
    for i, batch in enumerate(batches):
        loss, n = diffusion_loss(model, batch, step_key(seed, i), **loss_options)
        mx.eval(loss)
        total += loss.item() * n.item()
        count += n.item()
    return total / max(count, 1.0)


def train(
    model: nn.Module,
    optimizer,
    batches: Iterable[Batch],
    *,
    iters: int,
    seed: int = 0,
    report_every: int = 10,
    validate: Callable[[], float] | None = None,
    steps_per_eval: int = 200,
    grad_clip: float | None = 1.0,
    start_step: int = 0,
    **loss_options,
) -> Iterator[TrainReport]:
    """Train `model`'s trainable parameters for `iters` optimizer steps.

    `batches` yields `Batch`es (it is read `iters` times). `validate()` (optional) returns a
    validation loss; it runs every `steps_per_eval` steps and at the last step. Reports come every
    `report_every` steps and whenever validation ran. `loss_options` go to `diffusion_loss`
    (`t_min`, `t_max`, `self_cond_prob`). The corruption key of step s is `step_key(seed, s)`,
    so a resumed run (`start_step`) continues the same noise stream.
    """
    if iters < 1:
        raise ValueError("iters must be at least 1")
    if not _trainable(model):
        raise ValueError("the model has no trainable parameters")
    model.train()

    def loss_fn(m, batch, key):
        loss, _ = diffusion_loss(m, batch, key, **loss_options)
        return loss

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    mx.reset_peak_memory()
    it = iter(batches)
    window_loss = 0.0
    window_steps = window_tokens = total_tokens = 0
    t0 = time.perf_counter()
    for step in range(start_step + 1, start_step + iters + 1):
        batch = next(it)
        loss, grads = loss_and_grad(model, batch, step_key(seed, step))
        if grad_clip is not None:
            grads, _ = clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        value = loss.item()
        if not math.isfinite(value):  # the weights are NaN/inf from here on: stop, save nothing
            raise NumericalError(f"the training loss is {value} at step {step}: training diverged (lower the "
                                 "learning rate, or check the data); the diverged weights were not saved")
        window_loss += value
        window_steps += 1
        tokens = batch.tokens
        window_tokens += tokens
        total_tokens += tokens
        last = step == start_step + iters
        val = None
        if validate is not None and (step % steps_per_eval == 0 or last):
            model.eval()
            val = validate()
            model.train()
        if step % report_every == 0 or last or val is not None:
            dt = time.perf_counter() - t0
            lr = optimizer.learning_rate
            yield TrainReport(
                step=step,
                loss=window_loss / window_steps,
                learning_rate=float(lr.item() if isinstance(lr, mx.array) else lr),
                it_per_s=window_steps / dt if dt > 0 else 0.0,
                tokens_per_s=window_tokens / dt if dt > 0 else 0.0,
                trained_tokens=total_tokens,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                val_loss=val,
            )
            window_loss, window_steps, window_tokens = 0.0, 0, 0
            t0 = time.perf_counter()
    model.eval()
