"""Work done by one denoising step, independent of the hardware.

`step_work(text_args, canvas_length, cache_len)` counts, for one decoder pass plus the sampler of
one step with `cache_len` tokens already encoded:

- FLOPs (2 per multiply-add) of the transformer body (attention projections; attention scores
  and values over the visible prefix plus the canvas, where a sliding layer sees
  `min(cache_len, sliding_window - 1)` prefix rows and a full layer all of them; the dense GeGLU
  MLP; the router; the routed experts, top-k per token), of the tied LM head, of the
  self-conditioning block (`softmax @ E` over the whole vocabulary, or a gather of k rows with
  top-k self-conditioning, plus its GeGLU MLP) and of the sampler (element-wise work over the
  `[canvas, vocab]` logits, counted as a few operations per logit);
- bytes of cached prefix K/V copied per step: 0 for this runtime (the decoder reads the cache
  in place, see docs/architecture.md), and for a design that concatenates the visible prefix
  with the canvas K/V in every layer at every step, the bytes of that visible prefix;
- bytes of weights read per step for a quantization recipe ("bf16", "mixed-4bit", "8bit"):
  every dense matrix once, the embedding as the LM head and again for `softmax @ E`, and the
  routed experts actually selected (at most `min(num_experts, canvas * top_k)` distinct experts
  per layer, an upper bound reached by the canvases of a real model);
- host synchronisations per step (a property of the generate loop, not of the arithmetic).

Everything is plain integer arithmetic on a `config.TextArgs`, so it can be printed for the
26B model's shape on any machine (`scripts/bench.py` prints it for every preset).
"""

from __future__ import annotations

from typing import Any

from ..checkpoint.recipes import GROUP_SIZE, module_bits
from ..model.args import TextArgs, VisionArgs

# Element-wise work of the sampler per logit: temperature divide; softmax for the draw (max,
# subtract, exp, sum, divide) and its inverse-CDF cumsum/compare; argmax; entropy (log, multiply,
# sum). An estimate, not a count of kernel launches.
SAMPLER_OPS_PER_LOGIT = 12
# softmax of the previous processed logits before `@ E` (max, subtract, exp, sum, divide).
SOFTMAX_OPS_PER_LOGIT = 5

# Host synchronisations per denoising step, from reading each generate loop.
HOST_SYNCS_PER_STEP = {
    "ours": "1 (one mx.eval of the step's outputs + the stop decision; 1/k with stop_check_interval=k)",
    "mlx-vlm 0.7.10": "0 at a block's first step, then 1 (`mx.all(argmax == previous).item()`) "
                      "+ 1 more (`(mean entropy < threshold).item()`) whenever the argmax repeats",
    "transformers 5.23": "1 (`torch.all(finished_denoising)` read by Python at every step)",
}


def _bytes_per_weight(bits: int | None, group_size: int = GROUP_SIZE, dtype_bytes: int = 2) -> float:
    """Bytes per matrix element: bf16 if unquantized, else packed bits + a bf16 scale and bias per group."""
    if bits is None:
        return float(dtype_bytes)
    return bits / 8 + 2 * dtype_bytes / group_size


def visible_prefix_rows(a: TextArgs, layer: int, cache_len: int) -> int:
    """Prefix rows a decoder layer attends to (the reference's sliding cache keeps window - 1)."""
    if a.is_sliding(layer):
        return min(cache_len, a.sliding_window - 1)
    return cache_len


def _attention_dims(a: TextArgs, layer: int) -> tuple[int, int, int]:
    return a.num_attention_heads, a.kv_heads[layer], a.head_dims[layer]


def layer_flops(a: TextArgs, layer: int, canvas_length: int, cache_len: int, rows: int | None = None) -> dict[str, int]:
    """FLOPs of one decoder layer over the canvas, or over `rows` of it (fast mode: the live
    rows are the queries, every canvas position stays a key)."""
    d = a.hidden_size
    c = canvas_length if rows is None else rows
    hq, hkv, hd = _attention_dims(a, layer)
    n_kv_proj = 2 if a.is_sliding(layer) else 1  # full layers have no v_proj (K=V)
    keys = visible_prefix_rows(a, layer, cache_len) + canvas_length
    return {
        "attention_projections": 2 * c * d * (hq * hd) * 2 + 2 * c * d * (hkv * hd) * n_kv_proj,
        "attention_scores_values": 2 * (2 * c * hq * hd * keys),
        "dense_mlp": 3 * 2 * c * d * a.intermediate_size,
        "router": 2 * c * d * a.num_experts,
        "experts": c * a.top_k_experts * (2 * d * 2 * a.moe_intermediate_size + 2 * a.moe_intermediate_size * d),
    }


def distinct_experts_bound(a: TextArgs, canvas_length: int) -> int:
    """Upper bound of the distinct experts one layer reads in one step."""
    return min(a.num_experts, canvas_length * a.top_k_experts)


def kv_prefix_bytes(a: TextArgs, cache_len: int, kv_dtype_bytes: int = 2) -> int:
    """Bytes of visible cached K and V, summed over layers (what concatenation copies per step)."""
    total = 0
    for i in range(a.num_hidden_layers):
        _, hkv, hd = _attention_dims(a, i)
        total += 2 * visible_prefix_rows(a, i, cache_len) * hkv * hd * kv_dtype_bytes
    return total


def weight_bytes_per_step(a: TextArgs, canvas_length: int, recipe: str = "bf16", *,
                          top_k_self_conditioning: int | None = None,
                          group_size: int = GROUP_SIZE) -> dict[str, int]:
    """Bytes of weights one step reads under a quantization recipe (see `weights.module_bits`)."""
    d, v, i, e = a.hidden_size, a.vocab_size, a.intermediate_size, a.num_experts
    c = canvas_length

    def matrix(path: str, rows: int, cols: int, count: int = 1) -> float:
        bits = module_bits(path, recipe)
        if bits is not None and cols % group_size:
            bits = None  # not quantized (input width not a multiple of the group size)
        return rows * cols * count * _bytes_per_weight(bits, group_size)

    out = {"attention": 0.0, "dense_mlp": 0.0, "router": 0.0, "experts": 0.0, "norms_scalars": 0.0}
    n_experts = distinct_experts_bound(a, c)
    for layer in range(a.num_hidden_layers):
        hq, hkv, hd = _attention_dims(a, layer)
        p = f"model.decoder.layers.{layer}."
        out["attention"] += matrix(p + "self_attn.q_proj", hq * hd, d) + matrix(p + "self_attn.o_proj", d, hq * hd)
        out["attention"] += matrix(p + "self_attn.k_proj", hkv * hd, d)
        if a.is_sliding(layer):
            out["attention"] += matrix(p + "self_attn.v_proj", hkv * hd, d)
        out["dense_mlp"] += sum(matrix(p + f"mlp.{n}", i, d) for n in ("gate_proj", "up_proj"))
        out["dense_mlp"] += matrix(p + "mlp.down_proj", d, i)
        out["router"] += matrix(p + "router.proj", e, d)
        out["experts"] += matrix(p + "experts.gate_up_proj", 2 * a.moe_intermediate_size, d, n_experts)
        out["experts"] += matrix(p + "experts.down_proj", d, a.moe_intermediate_size, n_experts)
        out["norms_scalars"] += 2 * (9 * d + 2 * hd + e + 2)
    embed_row = matrix("model.decoder.embed_tokens", 1, d)
    out["lm_head"] = v * embed_row
    if top_k_self_conditioning is None:
        soft = v * embed_row
    else:
        soft = min(v, c * top_k_self_conditioning) * embed_row
    sc = "model.decoder.self_conditioning."
    out["self_conditioning"] = soft + sum(matrix(sc + n, i, d) for n in ("gate_proj", "up_proj")) \
        + matrix(sc + "down_proj", d, i)
    out["canvas_embedding"] = c * embed_row
    out = {k: int(round(x)) for k, x in out.items()}
    out["total"] = sum(out.values())
    return out


def step_work(text_args: TextArgs, canvas_length: int, cache_len: int, *,
              top_k_self_conditioning: int | None = None, kv_dtype_bytes: int = 2,
              recipes: tuple[str, ...] = ("bf16", "mixed-4bit")) -> dict[str, Any]:
    """The work of one denoising step (decoder pass + sampler) at `cache_len` encoded tokens."""
    a = text_args
    c, d, v = canvas_length, a.hidden_size, a.vocab_size
    body: dict[str, int] = {}
    for layer in range(a.num_hidden_layers):
        for k, x in layer_flops(a, layer, c, cache_len).items():
            body[k] = body.get(k, 0) + x
    body_total = sum(body.values())
    if top_k_self_conditioning is None:
        soft = 2 * c * v * d
        soft_elementwise = SOFTMAX_OPS_PER_LOGIT * c * v
    else:
        k = min(top_k_self_conditioning, v)
        soft = 2 * c * k * d
        soft_elementwise = 3 * c * v  # top-k selection and log-sum-exp still read every logit
    sc_mlp = 3 * 2 * c * d * a.intermediate_size
    flops = dict(body)
    flops["body"] = body_total
    flops["lm_head"] = 2 * c * d * v
    flops["self_conditioning_soft_embedding"] = soft
    flops["self_conditioning_mlp"] = sc_mlp
    flops["self_conditioning"] = soft + sc_mlp
    flops["decoder_total"] = body_total + flops["lm_head"] + flops["self_conditioning"]
    elementwise = {
        "sampler": SAMPLER_OPS_PER_LOGIT * c * v,
        "self_conditioning_softmax": soft_elementwise,
        "softcap": 3 * c * v,
    }
    return {
        "canvas_length": c,
        "cache_len": cache_len,
        "top_k_self_conditioning": top_k_self_conditioning,
        "flops": flops,
        "elementwise_ops": elementwise,
        "visible_prefix_rows": {
            "sliding": min(cache_len, a.sliding_window - 1),
            "full": cache_len,
        },
        "kv_copy_bytes": {
            "ours": 0,
            "concatenating": kv_prefix_bytes(a, cache_len, kv_dtype_bytes),
        },
        "kv_read_bytes": kv_prefix_bytes(a, cache_len, kv_dtype_bytes),
        "distinct_experts_per_layer_bound": distinct_experts_bound(a, c),
        "weight_bytes": {
            r: weight_bytes_per_step(a, c, r, top_k_self_conditioning=top_k_self_conditioning) for r in recipes
        },
        "host_syncs_per_step": dict(HOST_SYNCS_PER_STEP),
    }


def format_table(rows: list[tuple[str, int, dict[str, Any]]]) -> str:
    """Markdown table of `step_work` results: rows of (label, cache_len, work)."""
    head = ("| model | cache | body GFLOP | LM head GFLOP | self-cond GFLOP | sampler Gop | total GFLOP "
            "| KV copied/step (ours / concat) | weights read/step bf16 / mixed-4bit |")
    sep = "|" + "---|" * 9
    lines = [head, sep]
    for label, cache_len, w in rows:
        f = w["flops"]
        wb = w["weight_bytes"]
        total = f["decoder_total"] + w["elementwise_ops"]["sampler"]
        lines.append(
            f"| {label} | {_k(cache_len)} | {f['body'] / 1e9:.3g} | {f['lm_head'] / 1e9:.3g} "
            f"| {f['self_conditioning'] / 1e9:.3g} | {w['elementwise_ops']['sampler'] / 1e9:.3g} "
            f"| {total / 1e9:.4g} | 0 / {_mb(w['kv_copy_bytes']['concatenating'])} "
            f"| {_mb(wb.get('bf16', {}).get('total', 0))} / {_mb(wb.get('mixed-4bit', {}).get('total', 0))} |"
        )
    return "\n".join(lines)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _mb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------
# Fast mode: work of a step over some canvas rows, and of a whole generation from its trace
# --------------------------------------------------------------------------------------------

# Float32 passes over a `[rows, vocab]` array per step (each op reads the array once): the
# exact sampler (SAMPLER_OPS_PER_LOGIT above) plus the self-conditioning softmax of the next
# step; the top-k sampler divides by the temperature, reads the row once for the two-stage
# top-k and once for the log-sum-exp (max, subtract-exp, sum), the rest is `[rows, k]` work.
TOP_K_SAMPLER_OPS_PER_LOGIT = 5
TOP_K_SAMPLER_OPS_PER_CANDIDATE = 16  # draw, entropy, gap, self-conditioning weights on k values


def rows_step_work(a: TextArgs, canvas_length: int, cache_len: int, rows: int, *,
                   top_k: int | None = None, recipe: str | None = "mixed-4bit") -> dict[str, int]:
    """One fast-mode step that computes `rows` canvas rows (padding included): decoder FLOPs
    (transformer body + self-conditioning), LM-head FLOPs, sampler float32 bytes and (for
    `recipe`) weight bytes read. `top_k` None: full-vocabulary sampler and exact
    self-conditioning (the exact path when rows == canvas_length)."""
    d, v = a.hidden_size, a.vocab_size
    body = sum(sum(layer_flops(a, i, canvas_length, cache_len, rows).values()) for i in range(a.num_hidden_layers))
    sc_mlp = 3 * 2 * rows * d * a.intermediate_size
    if top_k is None:
        soft = 2 * rows * v * d
        sampler_bytes = 4 * rows * v * (SAMPLER_OPS_PER_LOGIT + SOFTMAX_OPS_PER_LOGIT)
    else:
        k = min(top_k, v)
        soft = 2 * rows * k * d
        sampler_bytes = 4 * rows * (v * TOP_K_SAMPLER_OPS_PER_LOGIT + k * TOP_K_SAMPLER_OPS_PER_CANDIDATE)
    out = {
        "rows": rows,
        "body_flops": body,
        "self_conditioning_flops": soft + sc_mlp,
        "decoder_flops": body + soft + sc_mlp,
        "lm_head_flops": 2 * rows * d * v,
        "sampler_bytes": sampler_bytes,
    }
    if recipe is not None:
        out["weight_bytes"] = weight_bytes_per_step(a, rows, recipe, top_k_self_conditioning=top_k)["total"]
    return out


def generation_work(a: TextArgs, canvas_length: int, cache_len: int, rows_per_step: list[list[int]],
                    committed_tokens: int, *, top_k: int | None = None,
                    recipe: str | None = "mixed-4bit") -> dict[str, Any]:
    """Totals, per step and per committed token, of a generation from its trace: the rows the
    decoder computed at every step of every block (`[[canvas_length] * steps]` per block for the
    exact path; `GenerationResult.extra["padded_rows"]` in fast mode). `cache_len` is the cache
    at the first block; each later block sees `canvas_length` more. "decoder_flops" counts the
    transformer body and self-conditioning; the LM head is reported apart, as is the sampler."""
    keys = ("decoder_flops", "lm_head_flops", "sampler_bytes", "rows") + (("weight_bytes",) if recipe else ())
    total = dict.fromkeys(keys, 0)
    steps = 0
    for block, trace in enumerate(rows_per_step):
        for rows in trace:
            w = rows_step_work(a, canvas_length, cache_len + block * canvas_length, rows, top_k=top_k, recipe=recipe)
            for k in keys:
                total[k] += w[k]
            steps += 1
    per_step = {k: total[k] / steps for k in keys} if steps else dict.fromkeys(keys, 0.0)
    per_token = {k: total[k] / committed_tokens for k in keys} if committed_tokens else dict.fromkeys(keys, 0.0)
    return {"steps": steps, "blocks": len(rows_per_step), "committed_tokens": committed_tokens,
            "total": total, "per_step": per_step, "per_token": per_token}


def rescale_trace(rows_per_step: list[list[int]], from_canvas: int, to_canvas: int) -> list[list[int]]:
    """A trace recorded at one canvas length applied to another: each step's live fraction of the
    canvas kept (rounded up), as an estimate of the same schedule on a wider canvas."""
    return [[min(to_canvas, -(-r * to_canvas // from_canvas)) for r in trace] for trace in rows_per_step]


def vision_memory(v: VisionArgs, text_hidden: int, soft_tokens: int = 280, *,
                  dtype_bytes: int = 2, score_bytes: int = 4) -> dict[str, int]:
    """Memory of the vision tower for one image at `soft_tokens` (the processor's budget: the
    largest image has `soft_tokens * k**2` patches).

    - `parameters` / `weight_bytes`: the tower and its projection (stored in bfloat16 by every
      recipe, see `weights.module_bits`);
    - `attention_scores_bytes`: one layer's `[heads, patches, patches]` scores when they are
      materialised (float32; a fused attention kernel avoids them);
    - `mlp_bytes`: one layer's gate and up activations `[patches, intermediate]`;
    - `peak_activation_bytes`: the larger of the two plus the hidden states, i.e. the transient
      memory of encoding one image on top of the weights (images are encoded one at a time).
    """
    k, p, h, hd = v.pooling_kernel_size, v.patch_size, v.hidden_size, v.head_dim
    per_layer = (h * v.num_attention_heads * hd * 2 + h * v.num_key_value_heads * hd * 2
                 + 3 * h * v.intermediate_size + 4 * h + 2 * hd)
    params = (3 * p * p * h + 2 * v.position_embedding_size * h + v.num_hidden_layers * per_layer
              + h * text_hidden + (2 * h if v.standardize else 0))
    patches = soft_tokens * k * k
    scores = v.num_attention_heads * patches * patches * score_bytes
    mlp = 2 * patches * v.intermediate_size * dtype_bytes
    hidden = 3 * patches * h * dtype_bytes
    return {
        "parameters": params,
        "weight_bytes": params * dtype_bytes,
        "patches": patches,
        "attention_scores_bytes": scores,
        "mlp_bytes": mlp,
        "peak_activation_bytes": max(scores, mlp) + hidden,
    }
