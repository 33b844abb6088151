"""Export an MLX DiffusionGemma folder (e.g. the demo model) in the Hugging Face layout.

    python scripts/export_hf.py mlx_diffusiongemma/demo/model -o demo-hf/

The output is what `save_pretrained` of the reference `transformers` class writes (config.json,
model.safetensors, generation_config.json) plus the tokenizer files, so the reference `generate`
and other runtimes (mlx-vlm) can run the same model: a shared yardstick. The weights go through
the reference class itself (built from the config, filled strictly, saved by `save_pretrained`),
so every name and shape is the reference's. Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 64}


def hf_name(name: str) -> str:
    """Our parameter path -> the reference's state-dict key (experts carry no `.weight`)."""
    for suffix in (".experts.gate_up_proj.weight", ".experts.down_proj.weight"):
        if name.endswith(suffix):
            return name[: -len(".weight")]
    return name


def export(src: Path, dst: Path) -> Path:
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx.utils import tree_flatten
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from mlx_diffusiongemma.checkpoint.loading import load_model

    if dst.exists():
        raise SystemExit(f"error: {dst} exists; remove it or choose another folder")
    model, config = load_model(src, dtype=mx.float32)
    if model.args.quantization:
        raise SystemExit("error: export needs an unquantized folder")
    cfg = {k: v for k, v in config.items() if not k.startswith("mlx_diffusiongemma")}
    cfg.pop("quantization", None)
    if model.has_vision:
        vision = None  # the checkpoint's own tower and its config
    else:
        # The reference class always builds a vision tower (its default is the 26B's, ~0.5 GB):
        # a text-only model gets a tiny one, seeded, that text prompts never run.
        vision = cfg.setdefault("vision_config", TINY_VISION)
        torch.manual_seed(0)
    hf_config = DiffusionGemmaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    ref = DiffusionGemmaForBlockDiffusion(hf_config).eval()
    ours = {hf_name(k): torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in tree_flatten(model.parameters())}
    state = ref.state_dict()
    # The encoder's text weights are the decoder's (tied in the reference: one storage) and
    # lm_head is the embedding: each storage must get exactly one of our tensors.
    groups: dict[int, list[str]] = {}
    for k, v in state.items():
        if not (vision is not None and k.startswith(VISION_PREFIXES)):
            groups.setdefault(v.data_ptr(), []).append(k)
    missing = [names[0] for names in groups.values() if sum(n in ours for n in names) != 1]
    extra = sorted(set(ours) - set(state))
    if missing or extra:
        raise SystemExit(f"error: names differ: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for k, v in ours.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise SystemExit(f"error: {k}: shape {tuple(v.shape)} vs reference {tuple(state[k].shape)}")
            state[k].copy_(v)
    dtype = torch.bfloat16 if any(v.dtype == mx.bfloat16 for _, v in tree_flatten(
        mx.load(str(next(src.glob("*.safetensors")))))) else torch.float32
    ref.to(dtype).save_pretrained(dst)
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    out = export(args.src, args.output)
    print(json.dumps({"exported": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
