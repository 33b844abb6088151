"""config.json + generation_config.json -> dataclasses.

The text config is read the way the released `transformers` 5.23 code resolves it:
`per_layer_config` first (keys may be ints or zero-padded strings), then the legacy
`global_head_dim` / `num_global_key_value_heads`, then defaults. Full-attention layers always
use K=V (no `v_proj`), whatever the config says about `attention_k_eq_v`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MODEL_TYPE = "diffusion_gemma"
TEXT_MODEL_TYPE = "diffusion_gemma_text"

# Reference defaults (DiffusionGemmaGenerationConfig._get_default_generation_params).
DEFAULT_GENERATION = {
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}

_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass
class TextArgs:
    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_experts: int = 128
    top_k_experts: int = 8
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    final_logit_softcapping: float = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    pad_token_id: int | None = 0
    layer_types: list[str] = field(default_factory=list)
    # Resolved per layer: head dim and number of KV heads.
    head_dims: list[int] = field(default_factory=list)
    kv_heads: list[int] = field(default_factory=list)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(_DEFAULT_ROPE))

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"


@dataclass
class VisionArgs:
    """The Gemma 4 vision tower (`vision_config`, model type `gemma4_vision`), with the reference
    class defaults (`Gemma4VisionConfig`) for absent fields."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_theta: float = 100.0


@dataclass
class ModelArgs:
    text: TextArgs
    canvas_length: int = 256
    model_type: str = MODEL_TYPE
    # Module paths -> {"bits", "group_size"} or False, plus top-level "bits"/"group_size".
    quantization: dict[str, Any] | None = None
    has_vision: bool = False
    # The vision tower, when config.json has a vision_config (None: a text-only model).
    vision: VisionArgs | None = None
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    # "vision": each run of image tokens attends bidirectionally in the encoder pass (the
    # released config); None: plain causal; "all" is not a DiffusionGemma setting we support.
    bidirectional: str | None = None


@dataclass
class GenerationDefaults:
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0


def _layer_overrides(text: dict[str, Any]) -> dict[int, dict[str, Any]]:
    raw = text.get("per_layer_config")
    if not raw:
        return {}
    if isinstance(raw, list):  # a list indexed by layer is the other way it could be written
        return {i: dict(v or {}) for i, v in enumerate(raw)}
    out: dict[int, dict[str, Any]] = {}
    for key, value in raw.items():
        try:
            idx = int(key)  # "5", "05" and 5 are the same layer
        except (TypeError, ValueError):
            raise CheckpointError(f"config.json: per_layer_config key {key!r} is not a layer index") from None
        out[idx] = dict(value or {})
    return out


def parse_text_args(text: dict[str, Any]) -> TextArgs:
    """Resolve the text sub-config of a DiffusionGemma config.json into `TextArgs`.

    Absent fields take the reference class defaults (`DiffusionGemmaTextConfig`), not the
    released model's values, so a hand-written config means what it means to transformers."""
    n_layers = int(text.get("num_hidden_layers", 30))
    layer_types = list(text.get("layer_types") or [])
    if not layer_types:
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise CheckpointError(
            f"config.json: layer_types has {len(layer_types)} entries for {n_layers} layers"
        )
    # The reference forces the last layer to full attention.
    layer_types[-1] = "full_attention"

    head_dim = int(text.get("head_dim", 256))
    kv_heads = int(text.get("num_key_value_heads", 4))
    overrides = _layer_overrides(text)
    if "per_layer_config" in text:
        pass  # present, even empty: the legacy fields are ignored (as in transformers 5.23)
    else:
        # Legacy fields of the released config.json (no per_layer_config).
        full_overrides = {"head_dim": int(text.get("global_head_dim", 512) or 512)}
        if text.get("num_global_key_value_heads") is not None:
            full_overrides["num_key_value_heads"] = int(text["num_global_key_value_heads"])
        overrides = {i: full_overrides for i, t in enumerate(layer_types) if t == "full_attention"}

    head_dims, kv = [], []
    for i in range(n_layers):
        o = overrides.get(i, {})
        head_dims.append(int(o.get("head_dim", head_dim)))
        kv.append(int(o.get("num_key_value_heads", kv_heads)))

    rope = dict(_DEFAULT_ROPE)
    rope.update(text.get("rope_parameters") or {})

    args = TextArgs(
        vocab_size=int(text.get("vocab_size", 262_144)),
        hidden_size=int(text.get("hidden_size", 2304)),
        intermediate_size=int(text.get("intermediate_size", 9216)),
        moe_intermediate_size=int(text.get("moe_intermediate_size") or 704),
        num_hidden_layers=n_layers,
        num_attention_heads=int(text.get("num_attention_heads", 8)),
        num_experts=int(text.get("num_experts") or 128),
        top_k_experts=int(text.get("top_k_experts") or 8),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        sliding_window=int(text.get("sliding_window", 512)),
        final_logit_softcapping=float(text.get("final_logit_softcapping") or 30.0),
        hidden_activation=str(text.get("hidden_activation", "gelu_pytorch_tanh")),
        max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
        pad_token_id=text.get("pad_token_id", 0),
        layer_types=layer_types,
        head_dims=head_dims,
        kv_heads=kv,
        rope_parameters=rope,
    )
    _validate(args)
    return args


def _validate(a: TextArgs) -> None:
    if a.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_approx"):
        raise CheckpointError(f"config.json: unsupported hidden_activation {a.hidden_activation!r}")
    if a.top_k_experts > a.num_experts:
        raise CheckpointError(
            f"config.json: top_k_experts ({a.top_k_experts}) > num_experts ({a.num_experts})"
        )
    for i, kv in enumerate(a.kv_heads):
        if kv <= 0 or a.num_attention_heads % kv:
            raise CheckpointError(
                f"config.json: layer {i} has {kv} KV heads for {a.num_attention_heads} query heads"
            )


def parse_model_args(config: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """Validate a DiffusionGemma config.json (already parsed) and resolve it."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{source} is for model type {model_type!r}, not DiffusionGemma ({MODEL_TYPE!r})"
        )
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{source} has no text_config")
    text_type = text.get("model_type", TEXT_MODEL_TYPE)
    if text_type != TEXT_MODEL_TYPE:
        raise CheckpointError(f"{source}: text_config is for {text_type!r}, not {TEXT_MODEL_TYPE!r}")
    vision = config.get("vision_config")
    if vision is not None and not isinstance(vision, dict):
        raise CheckpointError(f"{source}: vision_config is not an object")
    bidirectional = text.get("use_bidirectional_attention")
    if bidirectional not in (None, "vision"):
        raise CheckpointError(
            f"{source}: use_bidirectional_attention {bidirectional!r} is not supported (None or 'vision')"
        )
    return ModelArgs(
        text=parse_text_args(text),
        canvas_length=int(config.get("canvas_length") or 256),
        quantization=config.get("quantization") or config.get("quantization_config"),
        has_vision=vision is not None,
        vision=parse_vision_args(vision, source) if vision is not None else None,
        image_token_id=int(_pick(config.get("image_token_id"), 258_880)),
        boi_token_id=int(_pick(config.get("boi_token_id"), 255_999)),
        eoi_token_id=int(_pick(config.get("eoi_token_id"), 258_882)),
        bidirectional=bidirectional,
    )


def parse_vision_args(vision: dict[str, Any], source: str = "config.json") -> VisionArgs:
    """Resolve a `gemma4_vision` sub-config into `VisionArgs` (reference defaults when absent)."""
    kind = vision.get("model_type", "gemma4_vision")
    if kind != "gemma4_vision":
        raise CheckpointError(f"{source}: vision_config is for {kind!r}, not 'gemma4_vision'")
    d = VisionArgs()
    rope = vision.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise CheckpointError(f"{source}: vision rope_type {rope.get('rope_type')!r} is not 'axial'")
    hidden = int(_pick(vision.get("hidden_size"), d.hidden_size))
    heads = int(_pick(vision.get("num_attention_heads"), d.num_attention_heads))
    args = VisionArgs(
        hidden_size=hidden,
        intermediate_size=int(_pick(vision.get("intermediate_size"), d.intermediate_size)),
        num_hidden_layers=int(_pick(vision.get("num_hidden_layers"), d.num_hidden_layers)),
        num_attention_heads=heads,
        num_key_value_heads=int(_pick(vision.get("num_key_value_heads"), d.num_key_value_heads)),
        head_dim=int(_pick(vision.get("head_dim"), hidden // heads)),
        rms_norm_eps=float(_pick(vision.get("rms_norm_eps"), d.rms_norm_eps)),
        hidden_activation=str(_pick(vision.get("hidden_activation"), d.hidden_activation)),
        pooling_kernel_size=int(_pick(vision.get("pooling_kernel_size"), d.pooling_kernel_size)),
        patch_size=int(_pick(vision.get("patch_size"), d.patch_size)),
        position_embedding_size=int(_pick(vision.get("position_embedding_size"), d.position_embedding_size)),
        use_clipped_linears=bool(vision.get("use_clipped_linears", False)),
        standardize=bool(vision.get("standardize", False)),
        rope_theta=float(_pick(rope.get("rope_theta"), d.rope_theta)),
    )
    if args.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_approx"):
        raise CheckpointError(f"{source}: unsupported vision hidden_activation {args.hidden_activation!r}")
    if args.num_key_value_heads <= 0 or args.num_attention_heads % args.num_key_value_heads:
        raise CheckpointError(f"{source}: vision_config has {args.num_key_value_heads} KV heads "
                              f"for {args.num_attention_heads} query heads")
    if args.head_dim % 4:
        raise CheckpointError(f"{source}: vision head_dim {args.head_dim} is not a multiple of 4 (2D RoPE)")
    return args


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def load_model_args(folder: Path) -> ModelArgs:
    return parse_model_args(read_json(Path(folder) / "config.json"), source=str(Path(folder) / "config.json"))


def _pick(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def load_generation_defaults(folder: Path, config: dict[str, Any] | None = None) -> GenerationDefaults:
    """Sampler defaults from generation_config.json, falling back to the reference defaults."""
    path = Path(folder) / "generation_config.json"
    gen = read_json(path) if path.exists() else {}
    config = config or {}
    text = config.get("text_config") or {}
    sampler = gen.get("sampler_config") or {}
    d = DEFAULT_GENERATION
    eos = _pick(gen.get("eos_token_id"), config.get("eos_token_id"), text.get("eos_token_id"), 1)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return GenerationDefaults(
        max_denoising_steps=int(_pick(gen.get("max_denoising_steps"), d["max_denoising_steps"])),
        entropy_bound=float(_pick(sampler.get("entropy_bound"), d["entropy_bound"])),
        t_min=float(_pick(gen.get("t_min"), d["t_min"])),
        t_max=float(_pick(gen.get("t_max"), d["t_max"])),
        stability_threshold=int(_pick(gen.get("stability_threshold"), d["stability_threshold"])),
        confidence_threshold=float(_pick(gen.get("confidence_threshold"), d["confidence_threshold"])),
        eos_token_ids=eos_ids,
        pad_token_id=_pick(gen.get("pad_token_id"), text.get("pad_token_id"), 0),
    )
