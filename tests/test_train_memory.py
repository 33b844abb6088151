"""The fine-tuning memory accounting counts what mlx_lm.tuner actually creates on our model."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.demo.random import ensure_demo
from mlx_diffusiongemma.checkpoint import adapters as A
from mlx_diffusiongemma.train import lora as L
from mlx_diffusiongemma.train.memory import finetune_memory


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return ensure_demo(tmp_path_factory.mktemp("memory") / "demo")


@pytest.mark.parametrize("kind, layers, rank", [("lora", 3, 4), ("lora", -1, 8), ("full", 2, 8)])
def test_trained_parameters_match_the_model(demo_folder, kind, layers, rank):
    model, _ = dg.load(demo_folder)
    L.setup_finetune(model, kind, layers, A.lora_parameters(rank=rank))
    actual = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    m = finetune_memory(model.text, canvas_length=model.canvas_length, context_length=16,
                        fine_tune_type=kind, num_layers=layers, rank=rank, recipe="bf16")
    assert m["trained_parameters"] == actual
    if kind == "lora":
        assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.trainable_parameters()))
        assert m["trained_state"] == 16 * actual  # float32 value, gradient, two Adam moments


def test_weights_and_totals_add_up(demo_folder):
    model, _ = dg.load(demo_folder)
    stored = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    m = finetune_memory(model.text, canvas_length=model.canvas_length, context_length=16, recipe="bf16")
    assert m["weights"] == stored  # the bf16 demo as loaded
    assert m["total"] == sum(v for k, v in m.items() if k not in ("total", "trained_parameters"))
    ckpt = finetune_memory(model.text, canvas_length=model.canvas_length, context_length=16, recipe="bf16",
                           grad_checkpoint=True)
    assert ckpt["activations_decoder"] < m["activations_decoder"]
