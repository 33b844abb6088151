"""The model's arguments: what config.json and generation_config.json say, as dataclasses.

Parsed from already-read dicts (the files are read by `checkpoint.config`); nothing here does IO.
The text config is resolved the way the released `transformers` 5.23 code resolves it:
`per_layer_config` first (keys may be ints or zero-padded strings), then the legacy
`global_head_dim` / `num_global_key_value_heads`, then defaults. Full-attention layers always
use K=V (no `v_proj`), whatever the config says about `attention_k_eq_v`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError

MODEL_TYPE = "diffusion_gemma"
TEXT_MODEL_TYPE = "diffusion_gemma_text"

# The reference sampler's defaults (DiffusionGemmaGenerationConfig._get_default_generation_params),
# written once: `GenerationDefaults`, the checkpoint reader and the demo models' generation_config.json
# take them from here.
SAMPLER_DEFAULTS = {
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}

# Rows of prompt encoded per encoder call (`Model.prefill`, `extend`): bounds the score/mask memory of
# long prompts to chunk x (window or prefix) instead of N x N.
PREFILL_CHUNK = 512

# Bytes of one float32 `[rows, vocab]` array a denoising step computes at once: the step's
# vocabulary-sized work goes through the canvas rows in chunks of `step_chunk_rows(vocab)`, each
# evaluated before the next (`diffusion.sampler.chunked_step`; the memory plan counts one chunk).
# 64 MiB: 64 rows of the released model's 262144-token vocabulary (4 chunks for its canvas of 256);
# the small models (vocabularies of 32K and less, canvases of 64 and less) run as one chunk.
STEP_CHUNK_BYTES = 64 * 2**20


def step_chunk_rows(vocab: int) -> int:
    """Canvas rows per chunk of a denoising step's vocabulary-sized work."""
    return max(1, STEP_CHUNK_BYTES // (4 * vocab))


# Upper bounds on config.json values, far above any real DiffusionGemma (the released model has
# 30 layers, hidden 2816, vocab 262144, 128 experts, canvas 256): a hostile or corrupt config must
# not make the loader build a model that exhausts memory before a single weight is checked.
LIMITS = {
    "num_hidden_layers": 512,
    "hidden_size": 65_536,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "vocab_size": 1 << 24,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "num_experts": 4096,
    "top_k_experts": 4096,
    "sliding_window": 1 << 24,
    "max_position_embeddings": 1 << 26,
    "canvas_length": 1 << 16,
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
    attention_bias: bool = False
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
    # Soft tokens per image (the image processor's budget: processor_config.json's
    # `max_soft_tokens`, set by the loader; the reference default).
    image_soft_tokens: int = 280


@dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's generation settings (generation_config.json): the sampler's defaults, the
    end-of-sequence ids and the default reply length."""

    max_denoising_steps: int = SAMPLER_DEFAULTS["max_denoising_steps"]
    entropy_bound: float = SAMPLER_DEFAULTS["entropy_bound"]
    t_min: float = SAMPLER_DEFAULTS["t_min"]
    t_max: float = SAMPLER_DEFAULTS["t_max"]
    stability_threshold: int = SAMPLER_DEFAULTS["stability_threshold"]
    confidence_threshold: float = SAMPLER_DEFAULTS["confidence_threshold"]
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0
    # The API's default reply length (`max_new_tokens` of generation_config.json; the reference
    # default is 256).
    max_new_tokens: int = 256


def config_int(value: Any, name: str, *, low: int = 1, high: int | None = None) -> int:
    """A config.json integer in [low, high], or a CheckpointError naming the field."""
    high = LIMITS.get(name.rsplit(".", 1)[-1], high) if high is None else high
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CheckpointError(f"config.json: {name} must be an integer, got {value!r}")
    try:
        number = float(value)
        ok = math.isfinite(number) and number == int(number)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"config.json: {name} must be an integer, got {value!r}")
    number = int(number)
    if number < low or (high is not None and number > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise CheckpointError(f"config.json: {name} is {number}; it must be {bound}")
    return number


def config_float(value: Any, name: str, *, positive: bool = True) -> float:
    """A config.json number (finite; > 0 unless `positive` is False), or a CheckpointError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json: {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or (positive and number <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise CheckpointError(f"config.json: {name} must be {need}, got {value!r}")
    return number


def _layer_overrides(text: dict[str, Any]) -> dict[int, dict[str, Any]]:
    raw = text.get("per_layer_config")
    if not raw:
        return {}
    if isinstance(raw, list):  # a list indexed by layer is the other way it could be written
        if not all(isinstance(v, (dict, type(None))) for v in raw):
            raise CheckpointError("config.json: per_layer_config entries must be objects")
        return {i: dict(v or {}) for i, v in enumerate(raw)}
    if not isinstance(raw, dict):
        raise CheckpointError("config.json: per_layer_config must be an object keyed by layer index")
    out: dict[int, dict[str, Any]] = {}
    for key, value in raw.items():
        try:
            idx = int(key)  # "5", "05" and 5 are the same layer
        except (TypeError, ValueError):
            raise CheckpointError(f"config.json: per_layer_config key {key!r} is not a layer index") from None
        if not isinstance(value, (dict, type(None))):
            raise CheckpointError(f"config.json: per_layer_config[{key!r}] is not an object")
        out[idx] = dict(value or {})
    return out


def parse_text_args(text: dict[str, Any]) -> TextArgs:
    """Resolve the text sub-config of a DiffusionGemma config.json into `TextArgs`.

    Absent fields take the reference class defaults (`DiffusionGemmaTextConfig`), not the
    released model's values, so a hand-written config means what it means to transformers."""
    n_layers = config_int(text.get("num_hidden_layers", 30), "num_hidden_layers")
    layer_types = text.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise CheckpointError("config.json: layer_types must be a list")
    layer_types = list(layer_types)
    if not layer_types:
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise CheckpointError(
            f"config.json: layer_types has {len(layer_types)} entries for {n_layers} layers"
        )
    unknown = sorted({str(t) for t in layer_types} - {"sliding_attention", "full_attention"})
    if unknown:
        raise CheckpointError(f"config.json: unknown layer type {unknown[0]!r} in layer_types")
    # The reference forces the last layer to full attention.
    layer_types[-1] = "full_attention"
    _check_reference_switches(text)

    head_dim = config_int(text.get("head_dim", 256), "head_dim")
    kv_heads = config_int(text.get("num_key_value_heads", 4), "num_key_value_heads")
    overrides = _layer_overrides(text)
    if "per_layer_config" in text:
        pass  # present, even empty: the legacy fields are ignored (as in transformers 5.23)
    else:
        # Legacy fields of the released config.json (no per_layer_config).
        full_overrides = {"head_dim": config_int(text.get("global_head_dim", 512) or 512, "global_head_dim",
                                           high=LIMITS["head_dim"])}
        if text.get("num_global_key_value_heads") is not None:
            full_overrides["num_key_value_heads"] = config_int(
                text["num_global_key_value_heads"], "num_global_key_value_heads", high=LIMITS["num_key_value_heads"])
        overrides = {i: full_overrides for i, t in enumerate(layer_types) if t == "full_attention"}

    head_dims, kv = [], []
    for i in range(n_layers):
        o = overrides.get(i, {})
        head_dims.append(config_int(o.get("head_dim", head_dim), f"layer {i} head_dim", high=LIMITS["head_dim"]))
        kv.append(config_int(o.get("num_key_value_heads", kv_heads), f"layer {i} num_key_value_heads",
                       high=LIMITS["num_key_value_heads"]))

    rope = dict(_DEFAULT_ROPE)
    rope_config = text.get("rope_parameters") or {}
    if not isinstance(rope_config, dict):
        raise CheckpointError("config.json: rope_parameters must be an object")
    rope.update(rope_config)

    softcap = text.get("final_logit_softcapping", 30.0)
    if softcap is None:
        # The reference divides the logits by it unconditionally (a null fails there too).
        raise CheckpointError(
            "config.json: final_logit_softcapping is null; DiffusionGemma needs a number "
            "(the released model uses 30.0), as the transformers implementation does"
        )
    attention_bias = text.get("attention_bias", False)
    if not isinstance(attention_bias, bool):
        raise CheckpointError(f"config.json: attention_bias must be true or false, got {attention_bias!r}")
    pad = text.get("pad_token_id", 0)
    if pad is not None:
        pad = config_int(pad, "pad_token_id", low=0, high=LIMITS["vocab_size"])

    args = TextArgs(
        vocab_size=config_int(text.get("vocab_size", 262_144), "vocab_size"),
        hidden_size=config_int(text.get("hidden_size", 2304), "hidden_size"),
        intermediate_size=config_int(text.get("intermediate_size", 9216), "intermediate_size"),
        moe_intermediate_size=config_int(text.get("moe_intermediate_size") or 704, "moe_intermediate_size"),
        num_hidden_layers=n_layers,
        num_attention_heads=config_int(text.get("num_attention_heads", 8), "num_attention_heads"),
        num_experts=config_int(text.get("num_experts") or 128, "num_experts"),
        top_k_experts=config_int(text.get("top_k_experts") or 8, "top_k_experts"),
        rms_norm_eps=config_float(text.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        sliding_window=config_int(text.get("sliding_window", 512), "sliding_window"),
        final_logit_softcapping=config_float(softcap, "final_logit_softcapping"),
        attention_bias=attention_bias,
        hidden_activation=str(text.get("hidden_activation", "gelu_pytorch_tanh")),
        max_position_embeddings=config_int(text.get("max_position_embeddings", 131_072), "max_position_embeddings"),
        pad_token_id=pad,
        layer_types=layer_types,
        head_dims=head_dims,
        kv_heads=kv,
        rope_parameters=rope,
    )
    _validate(args)
    return args


def _check_reference_switches(text: dict[str, Any]) -> None:
    """Refuse the reference's switches this runtime does not implement, instead of running a
    different model silently."""
    mode = text.get("use_bidirectional_attention")
    if mode == "all":
        # The reference then makes the ENCODER non-causal and halves the sliding window
        # (DiffusionGemmaTextConfig.__post_init__): a different model from the released one.
        raise CheckpointError(
            "config.json: use_bidirectional_attention is 'all' (a non-causal encoder with a halved "
            "sliding window); this runtime implements the released model's causal encoder only "
            "(null or 'vision')"
        )
    if mode not in (None, "vision"):
        raise CheckpointError(
            f"config.json: use_bidirectional_attention must be null, 'vision' or 'all', got {mode!r}"
        )


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
    for i, d in enumerate(a.head_dims):
        if d % 2:
            raise CheckpointError(f"config.json: layer {i} has head_dim {d}; RoPE needs an even head_dim")


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
    _check_reference_switches(text)  # "all" and unknown values, with the reason
    bidirectional = text.get("use_bidirectional_attention")
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        raise CheckpointError(f"{source}: quantization must be an object")
    canvas = config.get("canvas_length", 256)
    return ModelArgs(
        text=parse_text_args(text),
        canvas_length=config_int(256 if canvas is None else canvas, "canvas_length"),
        quantization=quantization,
        has_vision=vision is not None,
        vision=parse_vision_args(vision, source) if vision is not None else None,
        image_token_id=int(first_given(config.get("image_token_id"), 258_880)),
        boi_token_id=int(first_given(config.get("boi_token_id"), 255_999)),
        eoi_token_id=int(first_given(config.get("eoi_token_id"), 258_882)),
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
    hidden = int(first_given(vision.get("hidden_size"), d.hidden_size))
    heads = int(first_given(vision.get("num_attention_heads"), d.num_attention_heads))
    args = VisionArgs(
        hidden_size=hidden,
        intermediate_size=int(first_given(vision.get("intermediate_size"), d.intermediate_size)),
        num_hidden_layers=int(first_given(vision.get("num_hidden_layers"), d.num_hidden_layers)),
        num_attention_heads=heads,
        num_key_value_heads=int(first_given(vision.get("num_key_value_heads"), d.num_key_value_heads)),
        head_dim=int(first_given(vision.get("head_dim"), hidden // heads)),
        rms_norm_eps=float(first_given(vision.get("rms_norm_eps"), d.rms_norm_eps)),
        hidden_activation=str(first_given(vision.get("hidden_activation"), d.hidden_activation)),
        pooling_kernel_size=int(first_given(vision.get("pooling_kernel_size"), d.pooling_kernel_size)),
        patch_size=int(first_given(vision.get("patch_size"), d.patch_size)),
        position_embedding_size=int(first_given(vision.get("position_embedding_size"), d.position_embedding_size)),
        use_clipped_linears=bool(vision.get("use_clipped_linears", False)),
        standardize=bool(vision.get("standardize", False)),
        rope_theta=float(first_given(rope.get("rope_theta"), d.rope_theta)),
    )
    if args.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_approx"):
        raise CheckpointError(f"{source}: unsupported vision hidden_activation {args.hidden_activation!r}")
    if args.num_key_value_heads <= 0 or args.num_attention_heads % args.num_key_value_heads:
        raise CheckpointError(f"{source}: vision_config has {args.num_key_value_heads} KV heads "
                              f"for {args.num_attention_heads} query heads")
    if args.head_dim % 4:
        raise CheckpointError(f"{source}: vision head_dim {args.head_dim} is not a multiple of 4 (2D RoPE)")
    return args


def first_given(*values: Any) -> Any:
    """The first value that is not None (a config's null means "the default")."""
    for v in values:
        if v is not None:
            return v
    return None
