"""LoRA and full fine-tuning through mlx_lm.tuner on our model: gradients on bf16 and 4-bit bases,
adapters saved in mlx-lm's format and loaded back, fused weights equal model + adapters, the
dense expert path equals the gather path with LoRA experts, and bad adapter folders fail clearly.
Everything runs on the demo checkpoint (hidden 128, 4 layers, 8 experts, canvas 32)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.demo.random import ensure_demo
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.model.layers import ExpertLinear
from mlx_diffusiongemma.checkpoint import adapters as A
from mlx_diffusiongemma.train import lora as L
from mlx_diffusiongemma.train.fuse import fuse_adapters, save_model
from mlx_diffusiongemma.train.objective import Example, canvas_items, diffusion_loss, make_batch


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return ensure_demo(tmp_path_factory.mktemp("lora") / "demo")


def batch_for(model):
    examples = [Example((2, 5, 40 + i, 41, 6), tuple(range(50, 50 + 10 + 3 * i))) for i in range(3)]
    items = [it for ex in examples for it in canvas_items(ex, model.canvas_length, eos_id=1)]
    return make_batch(items)


def perturb_adapters(model, seed=0, amplitude=0.02):
    """Nonzero LoRA B matrices (they start at zero, which would hide a wrong load or fuse)."""
    key = mx.random.key(seed)
    updates = []
    for name, p in tree_flatten(model.trainable_parameters()):
        key, sub = mx.random.split(key)
        updates.append((name, amplitude * mx.random.normal(p.shape, key=sub).astype(p.dtype)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def canvas_logits(model, seed=1):
    ids = mx.random.randint(0, model.vocab_size, (1, 12), key=mx.random.key(seed))
    canvas = mx.random.randint(0, model.vocab_size, (1, model.canvas_length), key=mx.random.key(seed + 1))
    cache = model.prefill(ids)
    first = model.denoise(canvas, cache)
    return model.denoise(canvas, cache, first / 0.5)


@pytest.mark.parametrize("base, kind", [("bf16", "lora"), ("bf16", "full"), ("4bit", "lora")])
def test_gradients_finite(demo_folder, base, kind):
    model, _ = dg.load(demo_folder, quantize="mixed-4bit" if base == "4bit" else None)
    if base == "4bit":
        assert isinstance(model.layers[0].experts.gate_up_proj, QuantizedSwitchLinear)
    L.setup_finetune(model, kind, 2, A.lora_parameters(rank=4))
    if kind == "lora":
        perturb_adapters(model)  # so lora_a gets a gradient too
        assert isinstance(model.layers[-1].experts.gate_up_proj, LoRASwitchLinear)
        assert isinstance(model.layers[-1].self_attn.q_proj, LoRALinear)
        assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)  # only the last 2 layers
    model.train()
    batch = batch_for(model)

    def loss_fn(m):
        return diffusion_loss(m, batch, mx.random.key(0))[0]

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    flat = tree_flatten(grads)
    mx.eval(loss, flat)
    assert flat and {n for n, _ in flat} == {n for n, _ in tree_flatten(model.trainable_parameters())}
    assert all(bool(mx.isfinite(g).all()) for _, g in flat)
    assert float(loss) > 0
    # Every trained matrix gets a signal, the routed experts' included.
    dead = [n for n, g in flat if n.endswith(("lora_a", "lora_b", "proj.weight")) and float(mx.abs(g).max()) == 0]
    assert not dead, dead
    if kind == "full":
        assert any("experts.gate_up_proj.weight" in n for n, _ in flat)


def test_full_finetune_refuses_a_quantized_base(demo_folder):
    model, _ = dg.load(demo_folder, quantize="mixed-4bit")
    with pytest.raises(CheckpointError, match="full fine-tuning needs unquantized weights"):
        L.setup_finetune(model, "full", 2)
    with pytest.raises(CheckpointError, match="num_layers 9 is not in 1..4"):
        L.setup_finetune(model, "lora", 9)


@pytest.mark.parametrize("base", ["bf16", "4bit"])
def test_adapters_save_load_and_change_outputs(demo_folder, tmp_path, base):
    quantize = "mixed-4bit" if base == "4bit" else None
    model, _ = dg.load(demo_folder, quantize=quantize)
    plain = canvas_logits(model)
    params = A.lora_parameters(rank=4, scale=10.0)
    L.setup_finetune(model, "lora", 3, params)
    perturb_adapters(model)
    model.eval()
    tuned = canvas_logits(model)
    assert float(mx.abs(tuned - plain).max()) > 1e-2  # the adapters change the outputs
    L.write_adapter_config(tmp_path, {"fine_tune_type": "lora", "num_layers": 3, "lora_parameters": params})
    L.save_adapters(model, tmp_path / A.ADAPTER_WEIGHTS)
    saved = mx.load(str(tmp_path / A.ADAPTER_WEIGHTS))
    assert set(saved) == set(dict(tree_flatten(model.trainable_parameters())))
    assert all(k.endswith(("lora_a", "lora_b")) for k in saved)

    # load(..., adapter_path=...) and mlx-lm's own loader read the same folder.
    again, _ = dg.load(demo_folder, quantize=quantize, adapter_path=tmp_path)
    assert mx.array_equal(canvas_logits(again), tuned)
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load

    third, _ = dg.load(demo_folder, quantize=quantize)
    mlx_lm_load(third, str(tmp_path))
    third.eval()
    assert mx.array_equal(canvas_logits(third), tuned)


# The float32 comparisons below run on the reference-built tiny checkpoint (conftest): the demo's
# random weights are so ill-conditioned that a 1e-7 relative jitter of its weights moves its
# logits by ~5e-4, above the tolerance; this one moves by ~2e-5. The adapters are sized to move
# the logits by ~2 (a real change), not to blow the weights up.
SMALL = 0.002


@pytest.fixture(scope="module")
def tiny_folder(tiny_checkpoint):
    return tiny_checkpoint[1]


def test_dense_experts_equal_gather_with_lora(tiny_folder):
    model, _ = dg.load(tiny_folder, dtype=mx.float32)
    plain = canvas_logits(model)
    L.setup_finetune(model, "lora", 4, A.lora_parameters(rank=4))
    perturb_adapters(model, seed=3, amplitude=SMALL)
    model.eval()
    gather = canvas_logits(model)
    assert float(mx.abs(gather - plain).max()) > 0.1
    for layer in model.layers:
        layer.experts.dense = True
    dense = canvas_logits(model)
    assert float(mx.abs(dense - gather).max()) < 1e-4


@pytest.mark.parametrize("base", ["f32", "4bit"])
def test_fused_equals_model_plus_adapters(tiny_folder, tmp_path, base):
    quantize = "mixed-4bit" if base == "4bit" else None
    model, _ = dg.load(tiny_folder, dtype=mx.float32, quantize=quantize)
    if base == "4bit":
        assert isinstance(model.layers[0].experts.gate_up_proj, QuantizedSwitchLinear)
    plain = canvas_logits(model)
    L.setup_finetune(model, "lora", 4, A.lora_parameters(rank=4))
    perturb_adapters(model, seed=5, amplitude=SMALL)
    model.eval()
    expected = canvas_logits(model)
    assert float(mx.abs(expected - plain).max()) > 0.1
    # On a quantized base, merged weights are exact only unquantized (re-quantizing rounds).
    count = fuse_adapters(model, dequantize=base == "4bit")
    # q, k, v, o, 3 MLP, router, 2 experts on the 2 sliding layers; full layers have no v_proj.
    assert count == 2 * 10 + 2 * 9
    assert not any(isinstance(m, (LoRALinear, LoRASwitchLinear)) for _, m in model.named_modules())
    assert isinstance(model.layers[0].experts.gate_up_proj, ExpertLinear)
    folder = save_model(model, tiny_folder, tmp_path / "fused")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization" not in config
    fused, _ = dg.load(folder, dtype=mx.float32)
    assert float(mx.abs(canvas_logits(fused) - expected).max()) < 1e-4
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(model, tiny_folder, folder)


def test_fuse_keeps_a_quantized_base_quantized(demo_folder, tmp_path):
    model, _ = dg.load(demo_folder, quantize="mixed-4bit")
    L.setup_finetune(model, "lora", 2, A.lora_parameters(rank=4))
    perturb_adapters(model)
    fuse_adapters(model)
    folder = save_model(model, demo_folder, tmp_path / "fused-4bit")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] in (4, 8)
    fused, _ = dg.load(folder)
    assert isinstance(fused.layers[-1].experts.gate_up_proj, QuantizedSwitchLinear)
    assert fused.layers[-1].experts.gate_up_proj.bits == 4
    assert mx.array_equal(canvas_logits(fused), canvas_logits(model))


def test_bad_adapter_folders(demo_folder, tmp_path):
    model, _ = dg.load(demo_folder)
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        A.load_adapters(model, tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        A.load_adapters(model, tmp_path / "a")
    (tmp_path / "a" / A.ADAPTER_CONFIG).write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        A.load_adapters(model, tmp_path / "a")
    (tmp_path / "a" / A.ADAPTER_CONFIG).write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 0, "scale": 1.0}}))
    with pytest.raises(CheckpointError, match="rank must be an integer"):
        A.load_adapters(model, tmp_path / "a")
    (tmp_path / "a" / A.ADAPTER_CONFIG).write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 1.0, "dropout": 0.0}}))
    with pytest.raises(CheckpointError, match="no adapters.safetensors"):
        A.load_adapters(model, tmp_path / "a")
    # Weights written for rank 8 do not fit a config that says rank 4.
    other, _ = dg.load(demo_folder)
    L.setup_finetune(other, "lora", 2, A.lora_parameters(rank=8))
    L.save_adapters(other, tmp_path / "a" / A.ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        A.load_adapters(model, tmp_path / "a")


def test_grad_checkpoint_gives_the_same_gradients(tiny_folder):
    """--grad-checkpoint recomputes each feed-forward block in the backward pass: same loss and
    gradients (the encoder's share included, which whole-layer checkpointing would drop)."""
    from mlx_diffusiongemma.train.finetune import checkpoint_feed_forward

    results = []
    for checkpoint in (False, True):
        model, _ = dg.load(tiny_folder, dtype=mx.float32)
        L.setup_finetune(model, "lora", 2, A.lora_parameters(rank=4))
        perturb_adapters(model, seed=7, amplitude=SMALL)
        if checkpoint:
            checkpoint_feed_forward(model)
        model.train()
        batch = batch_for(model)
        loss, grads = nn.value_and_grad(model, lambda m: diffusion_loss(m, batch, mx.random.key(4))[0])(model)
        mx.eval(loss, grads)
        results.append((float(loss), dict(tree_flatten(grads))))
    (loss0, g0), (loss1, g1) = results
    assert abs(loss0 - loss1) < 1e-5
    assert set(g0) == set(g1)
    for name in g0:
        scale = float(mx.abs(g0[name]).max()) + 1e-6
        assert float(mx.abs(g0[name] - g1[name]).max()) < 1e-4 * scale + 1e-7, name
