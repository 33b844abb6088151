"""config.json and generation_config.json of a checkpoint folder -> the model's arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..model.args import (
    LIMITS,
    SAMPLER_DEFAULTS,
    GenerationDefaults,
    ModelArgs,
    config_float,
    config_int,
    first_given,
    parse_model_args,
)
from ..prompts.processor import DEFAULT_SOFT_TOKENS, SUPPORTED_SOFT_TOKENS
from .files import read_json


def load_model_args(folder: Path, config: dict[str, Any] | None = None) -> ModelArgs:
    """The model's arguments from `folder/config.json` (`config`: its contents, already read) and
    the image budget from the processor config."""
    path = Path(folder) / "config.json"
    args = parse_model_args(read_json(path) if config is None else config, source=str(path))
    args.image_soft_tokens = image_soft_tokens(folder)
    return args


def image_soft_tokens(folder: Path) -> int:
    """The soft-token budget per image: `max_soft_tokens` of processor_config.json or
    preprocessor_config.json (a supported value), else the reference default 280."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(folder) / name
        if path.is_file():
            data = read_json(path)
            data = data.get("image_processor", data)
            if isinstance(data, dict) and data.get("max_soft_tokens") in SUPPORTED_SOFT_TOKENS:
                return int(data["max_soft_tokens"])
    return DEFAULT_SOFT_TOKENS


def load_generation_defaults(folder: Path, config: dict[str, Any] | None = None) -> GenerationDefaults:
    """Sampler defaults from generation_config.json, falling back to the reference defaults.

    Without generation_config.json, the `generation_config` block that mlx-vlm conversions embed
    in config.json is read instead (its nulls, like the file's, fall back to the defaults)."""
    path = Path(folder) / "generation_config.json"
    config = config or {}
    source = str(path)
    if path.exists() or path.is_symlink():
        gen = read_json(path)
    else:
        gen = config.get("generation_config") or {}
        source = f"{Path(folder) / 'config.json'} (generation_config)"
        if not isinstance(gen, dict):
            raise CheckpointError(f"{source} is not an object")
    text = config.get("text_config") or {}
    sampler = gen.get("sampler_config") or {}
    if not isinstance(sampler, dict):
        raise CheckpointError(f"{source}: sampler_config must be an object")
    d = SAMPLER_DEFAULTS
    eos = first_given(gen.get("eos_token_id"), config.get("eos_token_id"), text.get("eos_token_id"), 1)
    try:
        eos_ids = tuple(config_int(e, "eos_token_id", low=0, high=LIMITS["vocab_size"])
                        for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = first_given(gen.get("pad_token_id"), text.get("pad_token_id"), 0)
        out = GenerationDefaults(
            max_denoising_steps=config_int(first_given(gen.get("max_denoising_steps"), d["max_denoising_steps"]),
                                           "max_denoising_steps", high=1 << 20),
            entropy_bound=config_float(first_given(sampler.get("entropy_bound"), d["entropy_bound"]),
                                       "entropy_bound"),
            t_min=config_float(first_given(gen.get("t_min"), d["t_min"]), "t_min", positive=False),
            t_max=config_float(first_given(gen.get("t_max"), d["t_max"]), "t_max"),
            stability_threshold=config_int(first_given(gen.get("stability_threshold"), d["stability_threshold"]),
                                           "stability_threshold", low=0, high=1 << 20),
            confidence_threshold=config_float(
                first_given(gen.get("confidence_threshold"), d["confidence_threshold"]), "confidence_threshold",
                positive=False),
            eos_token_ids=eos_ids,
            pad_token_id=None if pad is None else config_int(pad, "pad_token_id", low=0, high=LIMITS["vocab_size"]),
            max_new_tokens=config_int(first_given(gen.get("max_new_tokens"), 256), "max_new_tokens", high=1 << 24),
        )
    except CheckpointError as e:
        # config_int/config_float name config.json; say which file the value came from.
        raise CheckpointError(str(e).replace("config.json:", f"{source}:", 1)) from None
    return out
