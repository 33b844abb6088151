"""The demo models, both offline.

- `--model demo`: the trained demo model that ships inside the package (`demo_model/`): a
  2.9M-parameter DiffusionGemma (routed experts, sliding and full layers, self-conditioning,
  canvas 64) trained by `scripts/train_demo.py` on the toy tasks of `demo_tasks` (sorting,
  arithmetic, reversing, 4x4 sudoku, ...). It answers those tasks; it knows nothing else.
- `--model demo-random`: a tiny random-weight model with a character-level tokenizer, built on
  first use into the user's cache directory (fixed seed). Its output is noise; tests and
  mechanics checks use it because it is smaller still and every character is one token.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

DEMO_NAME = "demo"  # the trained demo model (package data)
RANDOM_DEMO_NAME = "demo-random"  # the random one, built on first use
DEMO_VERSION = 1


def shipped_demo_dir() -> Path:
    """The trained demo model's folder inside the installed package."""
    return Path(__file__).resolve().parent / "demo_model"


def is_trained_demo(config: dict) -> bool:
    """Whether a checkpoint's config.json is the trained demo model's (its chat lists its tasks)."""
    return config.get("mlx_diffusiongemma_demo") == "trained"

# Special tokens of the Gemma 4 chat format, at fixed ids (pad 0, eos 1, bos 2 as in Gemma).
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|think|>",
]
TURN_END = "<turn|>"

# Jinja chat template in the Gemma 4 format: <bos><|turn>user\n...<turn|>\n<|turn>model\n.
# Thinking is switched on by `enable_thinking`, which puts <|think|> in a system turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% set think = enable_thinking is defined and enable_thinking %}"
    "{% if think or sys is not none %}"
    "{{ '<|turn>system\\n' }}{% if think %}{{ '<|think|>' }}{% endif %}"
    "{{ sys if sys is not none else '' }}{{ '<turn|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] + '<turn|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)


# Character-level vocabulary: every token decodes to whole characters, so a decoded reply
# re-encodes to the same ids (chat sessions can then reuse their cache across turns).
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + list("éèàüöäçñ–—…’“”•€£°")
# Gemma 4's image tokens (begin, soft token, end): optional, after the characters so that no other
# id moves (the demo model and the text-only test models keep their vocabulary).
IMAGE_TOKENS = ["<|image>", "<|image|>", "<image|>"]


def build_tokenizer(folder: Path, image_tokens: bool = False) -> dict[str, int]:
    """Write a character-level tokenizer (specials + characters, BPE without merges) and its
    config, with the Gemma 4 chat template; `image_tokens` adds Gemma 4's three image tokens at
    the end (ids in `image_token_ids()`). Returns the special-token ids."""
    from tokenizers import Tokenizer, decoders, models

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = SPECIAL_TOKENS + (IMAGE_TOKENS if image_tokens else [])
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS + (IMAGE_TOKENS if image_tokens else []))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {t: vocab[t] for t in specials}


def tokenizer_vocab_size(image_tokens: bool = False) -> int:
    return len(SPECIAL_TOKENS) + len(CHARACTERS) + (len(IMAGE_TOKENS) if image_tokens else 0)


def image_token_ids() -> dict[str, int]:
    """config.json's boi / image / eoi token ids for `build_tokenizer(..., image_tokens=True)`."""
    base = len(SPECIAL_TOKENS) + len(CHARACTERS)
    return {"boi_token_id": base, "image_token_id": base + 1, "eoi_token_id": base + 2}


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

    from .config import parse_model_args
    from .model import Model

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
        generation = {
            "max_denoising_steps": 16,
            "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
            "t_min": 0.4,
            "t_max": 0.8,
            "stability_threshold": 1,
            "confidence_threshold": 0.005,
            "eos_token_id": [specials["<eos>"], specials[TURN_END]],
            "pad_token_id": 0,
        }
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
