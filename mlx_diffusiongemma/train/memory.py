"""Memory a fine-tuning step needs, by accounting (hardware-independent, like `accounting.py`).

`finetune_memory(text_args, ...)` adds up, for one optimizer step of the block-diffusion objective
(`objective.diffusion_loss`: an encoder pass over the context with gradient, a no-gradient
self-conditioning decoder pass, the trained decoder pass, cross-entropy over the canvas):

- **weights**: the base model as stored (`convert.projected_size` of the recipe);
- **trained state**: LoRA matrices in float32 (as `mlx_lm.tuner` creates them), their gradients
  and Adam's two moments: 4 x 4 bytes per trained parameter; for a full fine-tune the trained
  layers' weights in bf16 with float32 gradients and moments (2 + 3 x 4 bytes);
- **activations** the backward pass reads, for the layers from the first trained one up (the
  layers below carry no gradient), in the decoder (batch x canvas rows) AND in the encoder
  (batch x context rows: the trained layers also wrote the cached K/V the decoder reads). Per row
  and layer, each tensor the backward reads is counted once: 16 hidden-width vectors (inputs,
  norm outputs, residuals, branch outputs), q/k/v before and after their norms and RoPE, the
  attention output, the dense GeGLU's gate/up/gelu/product, the router's logits and
  probabilities (float32), the top-k experts' gate/up, activation, product and outputs, and the
  LoRA `x @ A` products; attention scores and probabilities in float32 over every key the rows
  see (the training encoder runs the context as one chunk, so its scores are context x context
  per head, masked but materialised, on sliding layers too). Activations in bf16 (2 bytes).
  `grad_checkpoint` (`dgemma finetune --grad-checkpoint`) keeps only the input of each layer's
  feed-forward block, plus one layer's feed-forward activations recomputed at a time;
- **logits**: `[batch, canvas, vocab]` float32 arrays alive at the peak: the self-conditioning
  pass's logits and their softmax, the trained pass's logits before and after the softcap, and
  the cross-entropy's gradient (5 arrays).

Not counted: MLX's temporary buffers inside a kernel, allocator caching and fragmentation, the
tokenizer and Python. Compare with a measured peak (docs/training.md does, on the demo model).
"""

from __future__ import annotations

from typing import Any

from ..model.args import TextArgs

ACT_BYTES = 2  # bf16 activations
F32 = 4
LOGIT_ARRAYS = 5


def _linears(a: TextArgs, layer: int) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count) of the linear layers LoRA wraps in one layer (count: experts)."""
    d, hq, hkv, hd = a.hidden_size, a.num_attention_heads, a.kv_heads[layer], a.head_dims[layer]
    out = [("q_proj", d, hq * hd, 1), ("k_proj", d, hkv * hd, 1)]
    if a.is_sliding(layer):
        out.append(("v_proj", d, hkv * hd, 1))
    out += [("o_proj", hq * hd, d, 1), ("mlp.gate_proj", d, a.intermediate_size, 1),
            ("mlp.up_proj", d, a.intermediate_size, 1), ("mlp.down_proj", a.intermediate_size, d, 1),
            ("router.proj", d, a.num_experts, 1),
            ("experts.gate_up_proj", d, 2 * a.moe_intermediate_size, a.num_experts),
            ("experts.down_proj", a.moe_intermediate_size, d, a.num_experts)]
    return out


def lora_parameter_count(a: TextArgs, num_layers: int, rank: int) -> int:
    first = a.num_hidden_layers - num_layers
    return sum(count * rank * (i + o) for layer in range(first, a.num_hidden_layers)
               for _, i, o, count in _linears(a, layer))


def layer_parameter_count(a: TextArgs, layer: int) -> int:
    """Weights of one layer (matrices and vectors) for a full fine-tune."""
    d = a.hidden_size
    mats = sum(count * i * o for _, i, o, count in _linears(a, layer))
    # 7 norms and the router scale (d each), q/k norms, per-expert scales, the layer scalar.
    return mats + 8 * d + 2 * a.head_dims[layer] + a.num_experts + 1


def _row_elements(a: TextArgs, layer: int, rank: int | None, dense_experts: bool) -> tuple[int, int]:
    """(attention-side, feed-forward-side) activation elements one row keeps in one layer."""
    d, hq, hkv, hd = a.hidden_size, a.num_attention_heads, a.kv_heads[layer], a.head_dims[layer]
    i, im, e, k = a.intermediate_size, a.moe_intermediate_size, a.num_experts, a.top_k_experts
    experts = e if dense_experts else k
    lora = 0 if rank is None else rank * (len(_linears(a, layer)) - 2 + 2 * experts)
    attention = 7 * d + 3 * hq * hd + 4 * hkv * hd
    feed_forward = 9 * d + 4 * i + 2 * (F32 // ACT_BYTES) * e + experts * (4 * im + d)
    return attention + lora // 2, feed_forward + lora - lora // 2


def finetune_memory(a: TextArgs, *, canvas_length: int, context_length: int, batch_size: int = 1,
                    fine_tune_type: str = "lora", num_layers: int = 16, rank: int = 8,
                    recipe: str = "mixed-4bit", grad_checkpoint: bool = False,
                    dense_experts: bool = False, weight_bytes: int | None = None,
                    act_bytes: int = ACT_BYTES) -> dict[str, Any]:
    """Bytes of one training step's peak, by component (see the module docstring).
    `act_bytes` is 4 for a model trained in float32 (as the demo model is)."""
    from ..model.args import ModelArgs
    from ..convert.plan import projected_size

    n = a.num_hidden_layers
    num_layers = n if num_layers == -1 else min(num_layers, n)
    first = n - num_layers
    if weight_bytes is None:
        weight_bytes = projected_size(ModelArgs(text=a, canvas_length=canvas_length), recipe).bytes
    if fine_tune_type == "lora":
        trained = lora_parameter_count(a, num_layers, rank)
        state = trained * 4 * F32
        r = rank
    else:
        trained = sum(layer_parameter_count(a, layer) for layer in range(first, n))
        state = trained * (2 + 3 * F32)
        r = None
    c, p, b = canvas_length, context_length, batch_size
    rows = {"decoder": b * c, "encoder": b * p}
    acts = {"decoder": 0, "encoder": 0}
    scores = {"decoder": 0, "encoder": 0}
    recompute = 0
    for layer in range(first, n):
        att, ff = _row_elements(a, layer, r, dense_experts)
        kept_ff = a.hidden_size if grad_checkpoint else ff
        for side, count in rows.items():
            acts[side] += count * (att + kept_ff) * act_bytes
        if grad_checkpoint:
            recompute = max(recompute, (rows["decoder"] + rows["encoder"]) * ff * act_bytes)
        visible = min(p, a.sliding_window - 1) if a.is_sliding(layer) else p
        scores["decoder"] += b * a.num_attention_heads * c * (visible + c) * 2 * F32
        scores["encoder"] += b * a.num_attention_heads * p * p * 2 * F32
    logits = LOGIT_ARRAYS * b * c * a.vocab_size * F32
    out = {
        "weights": weight_bytes,
        "trained_parameters": trained,
        "trained_state": state,
        "activations_decoder": acts["decoder"],
        "activations_encoder": acts["encoder"],
        "attention_scores_decoder": scores["decoder"],
        "attention_scores_encoder": scores["encoder"],
        "recomputed_feed_forward": recompute,
        "logits": logits,
    }
    out["total"] = sum(v for k, v in out.items() if k != "trained_parameters")
    return out
