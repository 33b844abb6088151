"""The other MLX port's conversions (mlx-vlm, as in the mlx-community repos) load unmodified.

tests/fixtures/mlxvlm_tiny holds a tiny DiffusionGemma checkpoint (`hf/`) and what mlx-vlm
0.7.10's own converter made of it (`mlxvlm-4bit/`: its mixed 4/8-bit recipe with per-module
overrides in config.json; `mlxvlm-bf16/`: unquantized), plus mlx-vlm's own decoder logits for a
fixed prompt and canvas. See its README.md and scripts/make_mlxvlm_fixture.py.

Checked here:
- our loader reads the 4-bit folder as is, and the quantized tensors are bit-identical to our
  own in-memory `mixed-4bit` recipe applied to the Hugging Face weights;
- run in float32, our logits equal mlx-vlm's on the same files (so we read the layout the way
  the other port does), for a plain step, a self-conditioned step and a short prompt;
- the 4-bit model stays close to the float32 Hugging Face checkpoint (measured, printed).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma.api import load
from mlx_diffusiongemma.checkpoint.loading import load_model

FIXTURE = Path(__file__).parent / "fixtures" / "mlxvlm_tiny"
HF = FIXTURE / "hf"
VLM_4BIT = FIXTURE / "mlxvlm-4bit"
VLM_BF16 = FIXTURE / "mlxvlm-bf16"
SHORT_PROMPT = 5  # as in scripts/make_mlxvlm_fixture.py

# mlx-vlm and we compute the same float32 function with different op orders; a layout mistake
# (wrong expert order, gate/up swapped, a scale not applied) moves logits by O(1).
F32_ATOL = 2e-3


def _reference(folder: Path) -> dict[str, mx.array]:
    return mx.load(str(folder / "reference_logits.safetensors"))


def _passes(model, prompt: mx.array, canvas: mx.array) -> dict[str, np.ndarray]:
    """The three decoder passes stored in the reference file, as float32 numpy arrays."""
    cache = model.prefill(prompt)
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, self_conditioning=first)  # temperature 1
    third = model.denoise(canvas, model.prefill(prompt[:, :SHORT_PROMPT]))
    mx.eval(first, second, third)
    return {
        "logits": np.array(first),
        "logits_selfcond": np.array(second),
        "logits_short": np.array(third),
    }


def _stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {
        "max_abs": float(np.abs(a - b).max()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "corr": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
    }


def _show(label: str, s: dict[str, float]) -> None:
    print(f"{label:48s} max|diff| {s['max_abs']:.3e}  top-1 {s['top1']:.3f}  corr {s['corr']:.4f}")


def _quant_layout(model) -> dict[str, tuple]:
    """Module path -> (class, bits, group_size, mode) for every quantized module."""
    out = {}
    for path, module in model.named_modules():
        if hasattr(module, "bits"):
            out[path] = (type(module).__name__, module.bits, module.group_size, getattr(module, "mode", "affine"))
    return out


@pytest.fixture(scope="module")
def inputs():
    ref = _reference(VLM_4BIT)
    return ref["prompt_ids"], ref["canvas_ids"]


@pytest.fixture(scope="module")
def vlm_4bit():
    model, config = load_model(VLM_4BIT)
    return model, config


@pytest.fixture(scope="module")
def ours_4bit():
    model, _ = load_model(HF, quantize="mixed-4bit")
    return model


@pytest.fixture(scope="module")
def hf_f32():
    model, _ = load_model(HF, dtype=mx.float32)
    return model


def test_fixture_is_mlxvlm_output():
    config = (VLM_4BIT / "config.json").read_text()
    assert '"quantization"' in config and "mlx-vlm 0.7.10" in (FIXTURE / "README.md").read_text()
    header = mx.load(str(VLM_4BIT / "model.safetensors"), return_metadata=True)[1]
    assert header.get("format") == "mlx"


def test_4bit_loads_with_mlxvlm_recipe(vlm_4bit):
    model, config = vlm_4bit
    layout = _quant_layout(model)
    quant = config["quantization"]
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (4, 64, "affine")
    n_layers = model.args.text.num_hidden_layers
    for i in range(n_layers):
        p = f"model.decoder.layers.{i}"
        assert layout[f"{p}.experts.gate_up_proj"] == ("QuantizedSwitchLinear", 4, 64, "affine")
        assert layout[f"{p}.experts.down_proj"] == ("QuantizedSwitchLinear", 4, 64, "affine")
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj", "router.proj"):
            assert layout[f"{p}.{name}"][1:3] == (8, 64), name
    assert layout["model.decoder.embed_tokens"] == ("QuantizedEmbedding", 8, 64, "affine")
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert layout[f"model.decoder.self_conditioning.{name}"][1:3] == (4, 64)
    # Every per-module override mlx-vlm wrote is what we built.
    for path, params in quant.items():
        if isinstance(params, dict):
            assert layout[path][1:3] == (params["bits"], params["group_size"]), path
    # The encoder's own layer scalars were read (not left at their initial ones).
    scalars = [float(l.layer_scalar[0]) for l in model.model.encoder.language_model.layers]
    assert all(s != 1.0 for s in scalars)


def test_4bit_tensors_identical_to_our_recipe(vlm_4bit, ours_4bit):
    theirs = dict(tree_flatten(vlm_4bit[0].parameters()))
    ours = dict(tree_flatten(ours_4bit.parameters()))
    assert sorted(theirs) == sorted(ours)
    differ = [
        k for k in theirs
        if theirs[k].dtype != ours[k].dtype
        or theirs[k].shape != ours[k].shape
        or not mx.array_equal(theirs[k], ours[k]).item()
    ]
    print(f"{len(theirs)} tensors compared, {len(differ)} differ: {differ}")
    assert differ == []
    assert _quant_layout(vlm_4bit[0]) == _quant_layout(ours_4bit)


def test_4bit_logits_equal_our_recipe(vlm_4bit, ours_4bit, inputs):
    a = _passes(vlm_4bit[0], *inputs)
    b = _passes(ours_4bit, *inputs)
    for key in a:
        s = _stats(a[key], b[key])
        _show(f"{key}: mlxvlm-4bit vs hf + our mixed-4bit", s)
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)


def test_4bit_float32_matches_mlxvlm_reference(inputs):
    """Same files, float32 activations on both sides (mlx-vlm: `model.set_dtype(mx.float32)`)."""
    model, _ = load_model(VLM_4BIT)
    model.set_dtype(mx.float32)  # scales/biases too: bf16 -> f32 is exact
    ref = _reference(VLM_4BIT)
    ours = _passes(model, *inputs)
    for key, value in ours.items():
        expected = np.array(ref[key])
        s = _stats(value, expected)
        _show(f"{key}: ours vs mlx-vlm (4-bit, f32 activations)", s)
        np.testing.assert_allclose(value, expected, rtol=0, atol=F32_ATOL)


def test_4bit_native_vs_mlxvlm_reference(vlm_4bit, inputs):
    """bfloat16 activations as converted: the two ports round differently (mlx-vlm picks experts
    from bfloat16 router scores and uses fused SDPA), and in this tiny random MoE the rounding
    alone moves logits by as much as switching either port from float32 to bfloat16 does. Only
    reported, plus a loose sanity bound."""
    ref = _reference(VLM_4BIT)
    ours = _passes(vlm_4bit[0], *inputs)
    for key, value in ours.items():
        s = _stats(value, np.array(ref[key + "_native"]))
        _show(f"{key}: ours vs mlx-vlm (4-bit, bf16 activations)", s)
        s_vlm = _stats(np.array(ref[key + "_native"]), np.array(ref[key]))
        _show(f"{key}:   (mlx-vlm bf16 vs its own f32)", s_vlm)
        assert np.isfinite(value).all()
    assert _stats(ours["logits"], np.array(ref["logits_native"]))["corr"] > 0.95


@pytest.mark.skipif(not VLM_BF16.exists(), reason="fixture made with --no-bf16")
def test_bf16_conversion_matches_hf_and_mlxvlm(hf_f32, inputs):
    model, _ = load_model(VLM_BF16, dtype=mx.float32)
    theirs = dict(tree_flatten(model.parameters()))
    ours = dict(tree_flatten(hf_f32.parameters()))
    assert sorted(theirs) == sorted(ours)
    assert all(mx.array_equal(theirs[k], ours[k]).item() for k in theirs)
    ref = _reference(VLM_BF16)
    got = _passes(model, *inputs)
    for key, value in got.items():
        s = _stats(value, np.array(ref[key]))
        _show(f"{key}: ours vs mlx-vlm (bf16 conversion, f32)", s)
        np.testing.assert_allclose(value, np.array(ref[key]), rtol=0, atol=F32_ATOL)


def test_4bit_close_to_float32_hf(vlm_4bit, hf_f32, inputs):
    """4-bit experts on random N(0, 0.1) weights are a coarse approximation: measured
    corr 0.957 / top-1 0.625 / max|diff| 1.07 for the first step (logits within about +-3.5)."""
    q = _passes(vlm_4bit[0], *inputs)
    f = _passes(hf_f32, *inputs)
    for key in q:
        _show(f"{key}: mlxvlm-4bit (bf16) vs hf float32", _stats(q[key], f[key]))
    for key in ("logits", "logits_short"):
        s = _stats(q[key], f[key])
        assert s["corr"] > 0.85 and s["max_abs"] < 4.0, (key, s)


def test_full_load_with_tokenizer():
    """`load` (model + mlx_lm tokenizer) on the converter's folder, tokenizer files included."""
    model, tokenizer = load(VLM_4BIT)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    assert ids[0] == tokenizer.bos_token_id and max(ids) < model.vocab_size
    assert model.canvas_length == 8


# ---------------------------------------------------------------------------------------------
# the vision tower, as mlx-vlm's converter stored it (bfloat16, Hugging Face names)


@pytest.mark.parametrize("folder", [VLM_BF16, VLM_4BIT], ids=["bf16", "4bit"])
def test_vision_tower_matches_mlxvlm(folder):
    """Our tower + projection on mlx-vlm's fixed patches gives mlx-vlm's own features: in float32
    to float32 rounding, and as converted (bfloat16) within a bfloat16 step of the values."""
    ref = mx.load(str(folder / "vision_reference.safetensors"))
    f32, _ = load_model(folder, dtype=mx.float32)
    native, _ = load_model(folder)
    assert native.model.encoder.vision_tower.patch_embedder.position_embedding_table.dtype == mx.bfloat16
    for name in ("wide", "tall"):
        grid = tuple(ref[f"{name}_grid"].tolist())
        args = (ref[f"{name}_pixel_values"], ref[f"{name}_position_ids"], grid)
        got = np.array(f32.encode_image(*args))
        want = np.array(ref[f"{name}_features"])
        got_native = np.array(native.encode_image(*args).astype(mx.float32))
        want_native = np.array(ref[f"{name}_features_native"])
        scale = float(np.abs(want).max())
        print(f"\n{folder.name} {name} {grid}: float32 max|diff| {np.abs(got - want).max():.2e}, "
              f"bf16 {np.abs(got_native - want_native).max():.2e} (|features| <= {scale:.2f})")
        assert got.shape == want.shape and scale > 0.5
        assert np.abs(got - want).max() <= 1e-5
        assert np.abs(got_native - want_native).max() <= 2 * 2.0 ** -7 * scale  # two bf16 steps
