"""Benchmark presets and random-weight Hugging Face checkpoints for `scripts/bench.py`.

A preset is a DiffusionGemma text config at some width. `build_hf_checkpoint` writes it in the
Hugging Face layout (what `save_pretrained` of the reference writes, text part only): every text
weight under `model.decoder.*`, routed experts as bare `experts.gate_up_proj` `[E, 2I, D]` /
`experts.down_proj` `[E, D, I]`, the encoder's own `layer_scalar`s under
`model.encoder.language_model.layers.N`, the LM head tied to the embedding; bfloat16 tensors drawn
with numpy from a fixed seed and written straight to safetensors (no torch, no MLX), plus
`config.json` (the released checkpoint's legacy `global_head_dim` / `num_global_key_value_heads`
fields, which every runtime reads), `generation_config.json` and a character-level tokenizer
(`mlx_diffusiongemma.demo.build_tokenizer`; the preset's vocabulary may be larger than the
tokenizer's, which does not matter for timing ids).

Only the standard library and numpy are imported at module level, so the worker that drives the
other port can import `PRESETS` from its own environment.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_FORMAT = 3  # bump to invalidate cached checkpoints under bench-results/models

# Width of each preset. `layers` with the reference's 5 sliding : 1 full pattern (the last layer
# is always full); sliding layers have `kv_heads` x `head_dim`, full layers `global_kv_heads` x
# `global_head_dim` with K=V (no v_proj).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab=1024, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
        global_kv_heads=1, global_head_dim=64, dense=256, experts=8, top_k=2, expert_dim=64,
        window=64, canvas=32,
    ),
    "small": dict(
        vocab=4096, hidden=256, layers=6, heads=4, kv_heads=2, head_dim=64,
        global_kv_heads=1, global_head_dim=128, dense=512, experts=16, top_k=4, expert_dim=128,
        window=256, canvas=64,
    ),
    "medium": dict(
        vocab=8192, hidden=384, layers=6, heads=6, kv_heads=3, head_dim=64,
        global_kv_heads=1, global_head_dim=128, dense=768, experts=32, top_k=4, expert_dim=192,
        window=512, canvas=64,
    ),
    # The released 26B-A4B model's widths. Only used for the work accounting (building or
    # timing it needs a machine with ~50 GB of memory and, to be useful, a GPU).
    "26b-shape": dict(
        vocab=262144, hidden=2816, layers=30, heads=16, kv_heads=8, head_dim=256,
        global_kv_heads=2, global_head_dim=512, dense=2112, experts=128, top_k=8, expert_dim=704,
        window=1024, canvas=256,
    ),
}

# Sampler defaults of the released generation_config.json.
GENERATION_DEFAULTS = {
    "max_denoising_steps": 48,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "pad_token_id": 0,
}


def layer_types(n: int) -> list[str]:
    types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


def text_config(preset: str | dict[str, Any]) -> dict[str, Any]:
    """The preset as a `text_config` dict in the released config.json's (legacy) style."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return {
        "model_type": "diffusion_gemma_text",
        "vocab_size": p["vocab"],
        "hidden_size": p["hidden"],
        "intermediate_size": p["dense"],
        "moe_intermediate_size": p["expert_dim"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "head_dim": p["head_dim"],
        "global_head_dim": p["global_head_dim"],
        "num_global_key_value_heads": p["global_kv_heads"],
        "num_experts": p["experts"],
        "top_k_experts": p["top_k"],
        "sliding_window": p["window"],
        "layer_types": layer_types(p["layers"]),
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "use_bidirectional_attention": "vision",
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": "bfloat16",
    }


# A minimal Gemma 4 vision tower. Nothing here reads images, and our runtime drops the vision
# tensors, but the other port always builds a vision tower and refuses a checkpoint without its
# weights, so every preset carries this tiny one (about 20k parameters).
VISION_CONFIG = dict(
    model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=16, position_embedding_size=64,
    patch_size=4,
)


def vision_tensor_shapes(text_hidden: int) -> dict[str, tuple[int, ...]]:
    """The Hugging Face names and shapes of `VISION_CONFIG`'s tower (as transformers 5.23 has them)."""
    v = VISION_CONFIG
    h, i, hd = v["hidden_size"], v["intermediate_size"], v["head_dim"]
    q, kv = v["num_attention_heads"] * hd, v["num_key_value_heads"] * hd
    pre = "model.encoder.vision_tower."
    out: dict[str, tuple[int, ...]] = {
        pre + "patch_embedder.position_embedding_table": (2, v["position_embedding_size"], h),
        pre + "patch_embedder.input_proj.weight": (h, 3 * v["patch_size"] ** 2),
    }
    for n in range(v["num_hidden_layers"]):
        lp = f"{pre}encoder.layers.{n}."
        out.update({
            lp + "self_attn.q_proj.linear.weight": (q, h), lp + "self_attn.k_proj.linear.weight": (kv, h),
            lp + "self_attn.v_proj.linear.weight": (kv, h), lp + "self_attn.o_proj.linear.weight": (h, q),
            lp + "self_attn.q_norm.weight": (hd,), lp + "self_attn.k_norm.weight": (hd,),
            lp + "mlp.gate_proj.linear.weight": (i, h), lp + "mlp.up_proj.linear.weight": (i, h),
            lp + "mlp.down_proj.linear.weight": (h, i),
        })
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            out[lp + norm + ".weight"] = (h,)
    out["model.encoder.embed_vision.embedding_projection.weight"] = (text_hidden, h)
    return out


def model_config(preset: str) -> dict[str, Any]:
    p = PRESETS[preset]
    return {
        "model_type": "diffusion_gemma",
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": p["canvas"],
        "text_config": text_config(preset),
        "vision_config": dict(VISION_CONFIG),
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
        "eos_token_id": [1, 6],
        "pad_token_id": 0,
        "bos_token_id": 2,
    }


def hf_tensor_shapes(preset: str | dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face checkpoint (text part), name -> shape."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    d, v, i, e, ie = p["hidden"], p["vocab"], p["dense"], p["experts"], p["expert_dim"]
    out: dict[str, tuple[int, ...]] = {"model.decoder.embed_tokens.weight": (v, d), "model.decoder.norm.weight": (d,)}
    sc = "model.decoder.self_conditioning."
    out.update({sc + "pre_norm.weight": (d,), sc + "gate_proj.weight": (i, d), sc + "up_proj.weight": (i, d),
                sc + "down_proj.weight": (d, i)})
    for n, kind in enumerate(layer_types(p["layers"])):
        sliding = kind == "sliding_attention"
        hd = p["head_dim"] if sliding else p["global_head_dim"]
        kv = p["kv_heads"] if sliding else p["global_kv_heads"]
        pre = f"model.decoder.layers.{n}."
        out[pre + "self_attn.q_proj.weight"] = (p["heads"] * hd, d)
        out[pre + "self_attn.k_proj.weight"] = (kv * hd, d)
        if sliding:
            out[pre + "self_attn.v_proj.weight"] = (kv * hd, d)
        out[pre + "self_attn.o_proj.weight"] = (d, p["heads"] * hd)
        out[pre + "self_attn.q_norm.weight"] = (hd,)
        out[pre + "self_attn.k_norm.weight"] = (hd,)
        out[pre + "mlp.gate_proj.weight"] = (i, d)
        out[pre + "mlp.up_proj.weight"] = (i, d)
        out[pre + "mlp.down_proj.weight"] = (d, i)
        out[pre + "router.proj.weight"] = (e, d)
        out[pre + "router.scale"] = (d,)
        out[pre + "router.per_expert_scale"] = (e,)
        out[pre + "experts.gate_up_proj"] = (e, 2 * ie, d)
        out[pre + "experts.down_proj"] = (e, d, ie)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
            out[pre + norm + ".weight"] = (d,)
        out[pre + "layer_scalar"] = (1,)
        out[f"model.encoder.language_model.layers.{n}.layer_scalar"] = (1,)
    return out


def parameter_count(preset: str | dict[str, Any]) -> int:
    return sum(int(np.prod(s)) for s in hf_tensor_shapes(preset).values())


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("layer_scalar") or name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("embed_tokens.weight"):
        return rng.standard_normal(shape, dtype=np.float32)
    # Matrices: unit-variance outputs for unit-variance inputs.
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)


def write_safetensors_bf16(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write uint16 bfloat16 bit patterns as a safetensors file (dtype BF16)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in tensors.items():
        n = arr.nbytes
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def build_hf_checkpoint(preset: str, folder: Path, *, seed: int = 0, shard_bytes: int = 2 * 2**30) -> Path:
    """Write the preset's random-weight checkpoint into `folder` (skipped if already complete)."""
    from mlx_diffusiongemma.demo.files import build_tokenizer

    folder = Path(folder)
    stamp = folder / "bench_checkpoint.json"
    want = {"preset": preset, "widths": PRESETS[preset], "seed": seed, "format": CHECKPOINT_FORMAT}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    shapes = dict(hf_tensor_shapes(preset), **vision_tensor_shapes(PRESETS[preset]["hidden"]))
    for name, shape in shapes.items():
        arr = _to_bf16_bits(_random_tensor(rng, name, shape))
        if shards[-1] and size + arr.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_bf16(folder / fname, tensors)
        weight_map.update({name: fname for name in tensors})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    build_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(model_config(preset), indent=2))
    gen = dict(GENERATION_DEFAULTS, eos_token_id=[1, 6])
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    stamp.write_text(json.dumps(want))
    return folder
