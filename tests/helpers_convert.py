"""Tiny DiffusionGemma checkpoints for the converter tests.

`build_hf_checkpoint` saves the reference implementation (transformers) with `save_pretrained`,
so the layout is the real Hugging Face one; `build_synthetic_checkpoint` writes random bfloat16
tensors under the same key names straight to safetensors (no torch), for checkpoints big enough
to measure the converter's memory use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TINY_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


def tiny_text_config(**overrides: Any) -> dict[str, Any]:
    cfg = dict(
        vocab_size=256,
        hidden_size=64,
        # 96 is not a multiple of the group size: the dense MLP's and self-conditioning's
        # down_proj stay unquantized, so the converted config carries `false` overrides.
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=8,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=64,
        layer_types=list(TINY_LAYER_TYPES),
    )
    cfg.update(overrides)
    return cfg


def tiny_vision_config() -> dict[str, Any]:
    # The default vision config is the real (large) tower: always pass a tiny one.
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16)


AUX_FILES = {
    "tokenizer_config.json": '{"model_max_length": 1024}\n',
    "special_tokens_map.json": "{}\n",
    "chat_template.jinja": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}\n",
}


def build_hf_checkpoint(folder: Path, *, seed: int = 0, max_shard_size: str | int = "200KB",
                        text_overrides: dict[str, Any] | None = None, embed_std: float = 0.5,
                        weight_gain: float = 1.0, dtype: str = "bfloat16") -> Path:
    """A tiny checkpoint saved by the reference classes, with a vision tower, in `dtype`
    (bfloat16 like the released checkpoint, or float32).

    Norm weights, router scales and both sets of layer scalars (decoder and encoder) are
    randomised so that a mix-up shows in the logits; the embedding is widened so that logits are
    peaked enough for top-1 comparisons to mean something.
    """
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(
        text_config=tiny_text_config(**(text_overrides or {})), vision_config=tiny_vision_config()
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "router.per_expert_scale")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(embed_std * torch.randn_like(p))
            elif p.ndim >= 2 and not name.startswith("model.encoder.vision"):
                p.copy_(weight_gain * torch.randn_like(p) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    model = model.to(getattr(torch, dtype))
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    for name, text in AUX_FILES.items():
        (folder / name).write_text(text)
    return folder


def build_synthetic_checkpoint(folder: Path, text_config: dict[str, Any], *, file_size: int,
                               seed: int = 0) -> int:
    """Random bfloat16 tensors under the Hugging Face key names, in files of about `file_size`
    bytes plus an index; returns the total tensor bytes. Built from the runtime's own parameter
    list (lazily, nothing is allocated for it; the vision tower included), mapped back to the
    on-disk names."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_diffusiongemma.model.args import parse_model_args
    from mlx_diffusiongemma.model.model import Model

    config = {
        "model_type": "diffusion_gemma",
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "text_config": dict(text_config, model_type="diffusion_gemma_text"),
        "vision_config": tiny_vision_config(),
        "tie_word_embeddings": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(Model(parse_model_args(config)).parameters())}

    mx.random.seed(seed)
    files: list[dict[str, mx.array]] = [{}]
    size = 0
    total = 0
    for name, shape in shapes.items():
        key = name[: -len(".weight")] if name.endswith((".experts.gate_up_proj.weight",
                                                          ".experts.down_proj.weight")) else name
        n = math.prod(shape) * 2
        if files[-1] and size + n > file_size:
            files.append({})
            size = 0
        files[-1][key] = (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
        size += n
        total += n
    weight_map = {}
    for i, tensors in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        mx.save_safetensors(str(folder / fname), tensors, metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total
