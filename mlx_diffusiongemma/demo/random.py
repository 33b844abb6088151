"""The random demo model (`--model demo-random`): a tiny random-weight DiffusionGemma with a
character-level tokenizer, built on first use into the user's cache directory (fixed seed)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .files import TURN_END, build_tokenizer, generation_config, tokenizer_vocab_size

DEMO_VERSION = 1


def demo_text_config() -> dict:
    """Small widths (fast on a CPU), every architectural feature present."""
    return {
        "model_type": "diffusion_gemma_text",
        "vocab_size": tokenizer_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "per_layer_config": {"3": {"head_dim": 64, "num_key_value_heads": 1}},
        "num_experts": 8,
        "top_k_experts": 2,
        "sliding_window": 64,
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }


def demo_dir() -> Path:
    base = os.environ.get("MLX_DIFFUSIONGEMMA_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx-diffusiongemma"
    )
    return Path(base) / f"demo-v{DEMO_VERSION}"


def ensure_demo(folder: Path | None = None, seed: int = 0) -> Path:
    """Create the demo checkpoint if it is not there yet (atomically, and safely when several
    processes start at once: one builds it under a lock, the others wait and use it); return
    its folder."""
    folder = Path(folder) if folder else demo_dir()
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _creation_lock(folder):
        # Another process may have created it while this one waited for the lock.
        if (folder / "config.json").exists():
            return folder
        _create(folder, seed)
    return folder


@contextmanager
def _creation_lock(folder: Path):
    """One creator at a time, across processes (several first-time `--model demo` at once)."""
    with open(folder.with_name(folder.name + ".lock"), "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: the rename below still never removes a finished folder
            pass
        yield


def _create(folder: Path, seed: int) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from ..model.args import parse_model_args
    from ..model.model import Model

    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        specials = build_tokenizer(tmp)
        config = {
            "model_type": "diffusion_gemma",
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "canvas_length": 32,
            "text_config": demo_text_config(),
            "tie_word_embeddings": True,
            "mlx_diffusiongemma_demo": True,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = generation_config([specials["<eos>"], specials[TURN_END]], max_denoising_steps=16)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        model = Model(parse_model_args(config))
        rng = np.random.default_rng(seed)
        weights = {}
        for name, p in tree_flatten(model.parameters()):
            if name.endswith("layer_scalar") or "norm" in name or name.endswith("scale"):
                value = 1.0 + 0.1 * rng.standard_normal(p.shape)
            else:
                value = 0.08 * rng.standard_normal(p.shape)
            weights[name] = mx.array(value.astype(np.float32)).astype(mx.bfloat16)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        if folder.exists() and not (folder / "config.json").exists():
            shutil.rmtree(folder)  # an unfinished folder of an older version
        try:
            os.rename(tmp, folder)
        except OSError:
            # Use the folder that won: a finished demo folder is never removed, since another
            # process may be loading it.
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
