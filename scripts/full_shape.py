"""The released model's exact shape, for real: a random-weight checkpoint written straight into a
recipe, loaded, run, and its measured peak memory beside the memory plan's prediction.

    nice -n 10 python scripts/full_shape.py --recipe mixed-3bit --dir /tmp/dg-full [--keep]

Not part of CI (it writes 10-15 GB and needs that much memory). Steps:

1. writes `DIR/<recipe>`: config.json (the released text config, canvas 256, no vision tower;
   the recipe's `quantization` block from the converter's own `Plan`), generation_config.json and
   sharded safetensors in the converter's layout (`convert.writer.ShardWriter`), tensor by tensor:
   a quantized matrix is written as random packed integers with scales and biases (never as a
   bfloat16 matrix: the 50 GB bfloat16 model is never materialised), the rest as small random
   bfloat16 (norms and scalars ones);
2. loads it with the library's loader (`load_model`: the plan is made and checked there, before
   any weight is read), prefills a random prompt of `--prompt` tokens, runs the fast mode's first
   pass over the whole canvas (`denoise_rows` on every row, as `FastDenoiser` does), then `--steps`
   passes over `--rows` live rows with top-k self-conditioning, each followed by the sampler's
   float32 work over its logits (softmax, log-probabilities, argmax);
3. prints (and with `--out` writes as JSON) the planned peak for that context and those rows,
   MLX's measured peak (`mx.get_peak_memory`, which counts MLX's buffers) and the process's
   maximum resident size, the load time and each pass's time; deletes the checkpoint unless
   `--keep`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_diffusiongemma.convert.plan import Plan
from mlx_diffusiongemma.convert.writer import ShardWriter
from mlx_diffusiongemma.checkpoint.loading import load_model
from mlx_diffusiongemma.checkpoint.memory import buffer_bytes, kv_bytes
from mlx_diffusiongemma.model.args import parse_model_args

RELEASED = {
    "model_type": "diffusion_gemma",
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "canvas_length": 256,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "diffusion_gemma_text", "vocab_size": 262144, "hidden_size": 2816,
        "intermediate_size": 2112, "moe_intermediate_size": 704, "num_hidden_layers": 30,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 2, "num_experts": 128, "top_k_experts": 8, "sliding_window": 1024,
        "final_logit_softcapping": 30.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    },
}
GENERATION = {"max_denoising_steps": 48, "sampler_config": {"entropy_bound": 0.1}, "t_min": 0.4, "t_max": 0.8,
              "stability_threshold": 1, "confidence_threshold": 0.005, "pad_token_id": 0, "eos_token_id": [1]}
SHARD = 2 * 2**30
STD = 0.02


def _random(name: str, shape: tuple[int, ...], quant: dict | None, key: mx.array) -> list[tuple[str, mx.array]]:
    """One parameter as stored, random: packed codes with scales and biases that centre them
    (weights ~ STD), or a bfloat16 tensor."""
    if quant:
        bits, group = quant["bits"], quant["group_size"]
        rows, cols = shape[:-1], shape[-1]
        codes = mx.random.randint(-2**31, 2**31 - 1, (*rows, cols * bits // 32), dtype=mx.int32, key=key).view(mx.uint32)
        levels = 2**bits - 1
        scale = STD / (levels / 12**0.5) if levels > 1 else STD  # uniform codes' std -> STD
        scales = mx.full((*rows, cols // group), scale, dtype=mx.bfloat16)
        biases = mx.full((*rows, cols // group), -scale * levels / 2, dtype=mx.bfloat16)
        base = name[: -len(".weight")]
        return [(name, codes), (f"{base}.scales", scales), (f"{base}.biases", biases)]
    if len(shape) < 2:
        return [(name, mx.ones(shape, dtype=mx.bfloat16))]
    return [(name, (STD * mx.random.normal(shape, key=key)).astype(mx.bfloat16))]


def write(folder: Path, recipe: str) -> dict:
    folder.mkdir(parents=True, exist_ok=False)
    plan = Plan(RELEASED, recipe)
    writer = ShardWriter(folder, SHARD)
    key = mx.random.key(0)
    t0 = time.perf_counter()
    for i, t in enumerate(plan.tensors.values()):
        key, sub = mx.random.split(key)
        arrays = _random(t.name, t.shape, t.quant, sub)
        mx.eval(*(a for _, a in arrays))
        for name, a in arrays:
            writer.add(name, a)
    estimate = plan.estimate()
    shards = writer.finish(estimate.parameters)
    config = dict(RELEASED)
    quantization = plan.quantization_config()
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    return {"shards": len(shards), "bytes": writer.total_size, "projected": estimate.bytes,
            "write_s": time.perf_counter() - t0}


def run(folder: Path, prompt: int, first_rows: int, rows: int, steps: int, top_k: int) -> dict:
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    context = prompt + RELEASED["canvas_length"]
    model, _ = load_model(folder, context=context)
    load_s = time.perf_counter() - t0
    plan = model.memory_plan
    after_load = mx.get_peak_memory()
    out = {"load_s": load_s, "peak_after_load": after_load, "weights_planned": plan.weights,
           "weights_held": mx.get_active_memory()}

    ids = mx.random.randint(3, RELEASED["text_config"]["vocab_size"], (1, prompt), key=mx.random.key(1))
    t = time.perf_counter()
    cache = model.prefill(ids)
    mx.eval([layer.keys for layer in cache.layers if layer.keys is not None])
    out["prefill_s"] = time.perf_counter() - t
    out["peak_after_prefill"] = mx.get_peak_memory()
    c = model.canvas_length
    canvas = mx.random.randint(3, model.vocab_size, (1, c), key=mx.random.key(2))
    canvas_kv = model.make_canvas_kv()
    passes = []
    soft = None
    live = mx.arange(first_rows)
    for step in range(steps + 1):
        t = time.perf_counter()
        logits = model.denoise_rows(canvas, live, cache, canvas_kv, soft)
        x = logits.astype(mx.float32)
        log_probs = x - mx.logsumexp(x, axis=-1, keepdims=True)
        entropy = -(mx.exp(log_probs) * log_probs).sum(-1)
        best = x.argmax(-1)
        soft = model.soft_embeddings(x, top_k=top_k)
        mx.eval(entropy, best, soft, canvas_kv.keys, canvas_kv.values)
        passes.append({"rows": int(live.shape[0]), "s": time.perf_counter() - t, "peak": mx.get_peak_memory()})
        print(f"pass {step}: {passes[-1]}", file=sys.stderr, flush=True)
        live = mx.arange(rows)  # after the first pass: a few live rows
        soft = soft[:, :rows]
    out["passes"] = passes
    out["peak"] = mx.get_peak_memory()
    out["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The plan for what ran: the context, and the decoder pass over the most rows.
    planned = plan.at(context)
    planned.rows = max(first_rows, rows)
    out["planned_peak"] = planned.peak
    out["planned"] = {"weights": planned.weights, "kv": kv_bytes(model.text, context),
                      "buffers": buffer_bytes(model.text, c, context, planned.rows), "limit": planned.limit}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="mixed-3bit")
    p.add_argument("--dir", type=Path, required=True, help="where the checkpoint is written (needs 10-16 GB)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--first-rows", type=int, default=256,
                   help="rows of the first pass (fast mode's is the whole canvas; fewer on a CPU, where the full shape's experts are slow)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="a small shape of the same layout, to try the script")
    args = p.parse_args(argv)
    if args.rows > args.first_rows:
        p.error("--rows must not exceed --first-rows (the live rows are a subset of the first pass's)")
    if args.smoke:
        RELEASED["text_config"].update(vocab_size=4096, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                                       num_hidden_layers=6, num_experts=16, top_k_experts=4, sliding_window=128)
    parse_model_args(RELEASED)  # the config is the released one, as the loader reads it
    folder = args.dir / args.recipe
    result = {"recipe": args.recipe}
    try:
        if not (folder / "config.json").exists():
            result["written"] = write(folder, args.recipe)
            print(f"written: {result['written']}", file=sys.stderr, flush=True)
        result.update(run(folder, args.prompt, args.first_rows, args.rows, args.steps, args.top_k))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    gb = 1e9
    print(f"| {args.recipe} | {args.prompt} | {args.first_rows}, then {args.rows} x {args.steps} | {result['weights_planned'] / gb:.2f} GB | {result['planned_peak'] / gb:.2f} GB "
          f"| {result['peak'] / gb:.2f} GB | {result['peak'] / result['planned_peak'] - 1:+.1%} "
          f"| {result['max_rss'] / gb:.2f} GB | {result['load_s']:.0f} s | {result['prefill_s']:.1f} s "
          f"| {' / '.join(format(x['s'], '.1f') for x in result['passes'])} s |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
