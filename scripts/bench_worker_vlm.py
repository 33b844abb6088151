"""Benchmark worker for the other MLX port, mlx-vlm 0.7.10, run by `scripts/bench.py` with the
python of mlx-vlm's own virtual environment (nothing of mlx-vlm is imported by our package):

    VLM_PYTHON scripts/bench_worker_vlm.py --model FOLDER --plan plan.json --out result.json

It drives mlx-vlm's DiffusionGemma through its own entry points, as its generate loop
(`mlx_vlm.generate.diffusion.stream_diffusion_generate`) does:

- load: `mlx_vlm.utils.load(folder)` -> (model, processor);
- prefill: `cache = model.make_cache()`, `model.diffusion_prefill_cache(ids, cache=cache, ...,
  prefill_step_size=2048, chunk_prefill=len > 2048)` (mlx-vlm's default prefill step), then
  `mx.eval([c.state for c in cache])` as its loop does;
- decoder forward (one step, self-conditioned): `sc = model.diffusion_self_conditioning(processed,
  model.diffusion_prepare_self_conditioning())` (softmax @ E for a bf16 embedding; the logits
  themselves for a quantized one, the product then happening inside the decoder) and
  `model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=sc,
  decoder_attention_mask=model.diffusion_decoder_masks(canvas, cache, None))` (masks built once
  per block, as in its loop);
- sampler (one step of its "entropy-bound" path, temperature 1.0): processed = logits / t,
  argmax, `_diffusion_sample_canvas`, `_diffusion_token_entropy`,
  `_diffusion_entropy_transfer_mask`, accept, renoise with `_diffusion_initialize_canvas`, and
  its stop test `_diffusion_stable_and_confident` (host `.item()` reads);
- end to end: `stream_diffusion_generate(model, processor, tokenizer, ids, None, None,
  max_tokens=..., temperature=1.0, max_denoising_steps=N, diffusion_full_canvas=True,
  diffusion_sampler="entropy-bound", prefill_step_size=2048, skip_special_token_ids=[])`; fixed
  steps by setting the loaded `generation_config["confidence_threshold"] = -1` (never confident),
  adaptive with the checkpoint's values. Its stopping criteria are replaced by one that never
  stops, so that both ports commit the same number of tokens (random weights emit EOS ids).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import bench_common as C  # noqa: E402

PREFILL_STEP = 2048  # mlx-vlm's DEFAULT_PREFILL_STEP_SIZE


class _NeverStop:
    def __call__(self, *args, **kwargs):
        return False

    def add_eos_token_ids(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass


def main() -> None:
    args = C.worker_args(__doc__.splitlines()[0])
    plan = C.load_plan(args.plan)
    import mlx_vlm
    from mlx_vlm.generate import diffusion as D
    from mlx_vlm.models.diffusion_gemma import language as L
    from mlx_vlm.utils import load

    mem = C.Memory(mx)
    result: dict = {"port": "mlx-vlm", "plan": plan, "model_folder": args.model, "version": mlx_vlm.__version__}
    precision = plan["precision"]
    t0 = time.perf_counter()
    model, processor = load(args.model)
    if precision == "f32":
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    result["load_s"] = time.perf_counter() - t0
    result["weights_gb"] = mem.active_gb()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.stopping_criteria = _NeverStop()
    text_config = model.config.text_config
    vocab, canvas_len = int(text_config.vocab_size), int(model.config.canvas_length)
    gen_cfg = model.config.generation_config
    adaptive_conf = float(gen_cfg.get("confidence_threshold", 0.005))
    t_min, t_max = float(gen_cfg.get("t_min", 0.4)), float(gen_cfg.get("t_max", 0.8))
    entropy_bound = float((gen_cfg.get("sampler_config") or {}).get("entropy_bound", 0.1))
    warmup, repeats = plan["warmup"], plan["repeats"]
    C.log(f"mlx-vlm {plan['preset']}/{precision}: loaded in {result['load_s']:.1f}s")

    def prefill(ids):
        cache = model.make_cache()
        n = ids.shape[1]
        cache = model.diffusion_prefill_cache(
            ids, attention_mask=None, cache=cache, pixel_values=None, mm_token_type_ids=None,
            prefill_step_size=PREFILL_STEP, chunk_prefill=n > PREFILL_STEP,
        )
        mx.eval([c.state for c in cache])
        return cache

    # A bf16 checkpoint cannot run on MLX's CPU backend here (GatherMM is float32-only): find out
    # with one short call instead of failing every measurement.
    try:
        prefill(C.random_ids(mx, 8, vocab, seed=5))
    except Exception as e:
        result["unsupported"] = f"{type(e).__name__}: {e}"
        C.log(f"  unsupported: {result['unsupported']}")
        C.write_result(args.out, result)
        return

    # -- prefill ---------------------------------------------------------------------------------
    result["prefill"] = C.measure_prefill(mx, prefill, plan, vocab, mem)

    # Decoder caches: random K/V written through the caches' own update path in the prefill's
    # chunks (same layout as a real prefill, no encoder cost).
    act_dtype = model.model.decoder.norm.weight.dtype

    def synthetic_cache(n):
        cache = model.make_cache()
        blocks = {}
        for start in range(0, n, PREFILL_STEP):
            m = min(PREFILL_STEP, n - start)
            for c, layer in zip(cache, model.layers):
                attn = layer.self_attn
                shape = (1, attn.n_kv_heads, m, attn.head_dim)
                if shape not in blocks:
                    blocks[shape] = mx.random.normal(shape, key=mx.random.key(len(blocks))).astype(act_dtype)
                c.update_and_fetch(blocks[shape], blocks[shape])
            mx.eval([c.state for c in cache])
        return cache

    caches = {n: synthetic_cache(n) for n in plan["cache_lengths"]}

    # -- one decoder step: forward and sampler --------------------------------------------------
    canvas = C.random_ids(mx, canvas_len, vocab, seed=7, low=0)
    ctx = model.diffusion_prepare_self_conditioning()
    t_first = D._diffusion_linear_temperature(plan["steps"], plan["steps"], {"t_min": t_min, "t_max": t_max})
    forward = {}
    fwd_fns = {}
    processed = None
    for n in plan["cache_lengths"]:
        cache = caches[n]
        masks = model.diffusion_decoder_masks(canvas, cache, None)
        logits0 = model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=None, decoder_attention_mask=masks)
        processed = logits0 / t_first
        mx.eval(processed)

        def fwd(cache=cache, masks=masks, processed=processed):
            sc = model.diffusion_self_conditioning(processed, ctx)
            mx.eval(model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=sc, decoder_attention_mask=masks))

        fwd_fns[n] = fwd
        forward[str(n)] = C.measure(fwd, mem, f"forward @ cache {n}", warmup=warmup, repeats=repeats)
    result["forward"] = forward

    n0 = plan["cache_lengths"][0]
    cache0 = caches[n0]
    masks0 = model.diffusion_decoder_masks(canvas, cache0, None)
    logits = model.diffusion_decoder_logits(canvas, cache=cache0,
                                            self_conditioning=model.diffusion_self_conditioning(processed, ctx),
                                            decoder_attention_mask=masks0)
    mx.eval(logits)
    cur_step = max(2, plan["steps"] // 2)
    stopping = {"confidence_threshold": adaptive_conf, "stability_threshold": int(gen_cfg.get("stability_threshold", 1))}
    # A full history (as from a block's second step on) holding a different argmax: the common
    # case, where its stop test reads one value from the device (a repeated argmax adds a second
    # read and an entropy pass).
    history = [(mx.argmax(logits, axis=-1).astype(mx.int32) + 1) % vocab]

    def sampler_step():  # its entropy-bound loop body after the decoder call
        t = D._diffusion_linear_temperature(cur_step, plan["steps"], {"t_min": t_min, "t_max": t_max})
        proc = logits / t
        argmax = mx.argmax(proc, axis=-1).astype(mx.int32)
        denoiser = D._diffusion_sample_canvas(proc, mx.int32, 1.0)
        entropy = D._diffusion_token_entropy(proc)
        mask = D._diffusion_entropy_transfer_mask(entropy, entropy_bound)
        accepted = mx.where(mask, denoiser, canvas)
        nxt = mx.where(mask, accepted, D._diffusion_initialize_canvas(1, canvas_len, vocab, mx.int32))
        hist = list(history)
        D._diffusion_stable_and_confident(argmax, proc, hist, stopping)
        mx.eval(nxt, argmax)

    result["sampler"] = C.measure(sampler_step, mem, "sampler", warmup=max(warmup, 2), repeats=repeats)

    # -- breakdown -----------------------------------------------------------------------------
    nb = plan.get("breakdown_cache_length")
    if nb in fwd_fns:
        original = L.Experts.__call__

        def stub(self, x, top_k_indices):
            return mx.zeros((*top_k_indices.shape, x.shape[-1]), dtype=x.dtype)

        L.Experts.__call__ = stub
        try:
            s_stub = C.time_calls(fwd_fns[nb], warmup=warmup, repeats=repeats)
        finally:
            L.Experts.__call__ = original
        layers = model.layers
        d = int(text_config.hidden_size)
        x = mx.random.normal((canvas_len, d), key=mx.random.key(3)).astype(model.model.decoder.norm.weight.dtype)
        routes = [layer.router(x) for layer in layers]
        mx.eval(x, routes)

        def experts_only():
            mx.eval([layer.experts(x, idx) for layer, (idx, _) in zip(layers, routes)])

        s_exp = C.time_calls(experts_only, warmup=warmup, repeats=repeats)
        prof = [C.profile_ops(mx, fwd_fns[nb]) for _ in range(plan.get("profile_repeats", 1))]
        result["breakdown"] = {"cache_length": nb, "forward_without_experts": s_stub, "experts_only": s_exp,
                               "forward": forward[str(nb)], "op_profile": prof}
        C.log(f"  breakdown @ {nb}: no-experts {s_stub['median']*1e3:.1f} ms, experts alone {s_exp['median']*1e3:.1f} ms")
    caches.clear()
    fwd_fns.clear()

    # -- end to end ----------------------------------------------------------------------------
    e = plan["e2e"]
    if not e:
        C.write_result(args.out, result)
        return
    prompt = C.random_ids(mx, e["prompt_len"], vocab, seed=11)
    max_tokens = e["blocks"] * canvas_len
    e2e = {}
    for mode, conf in (("fixed", -1.0), ("adaptive", adaptive_conf)):
        if mode == "adaptive" and not e.get("adaptive", True):
            continue
        gen_cfg["confidence_threshold"] = conf
        runs = []
        reps = e["repeats"] if mode == "fixed" else e.get("adaptive_repeats", e["repeats"])
        for i in range(e["warmup"] + reps):
            mx.random.seed(100 + i)
            mem.reset()
            t = time.perf_counter()
            last = None
            for r in D.stream_diffusion_generate(
                model, processor, tokenizer, prompt, None, None, max_tokens=max_tokens,
                skip_special_token_ids=[], temperature=1.0, max_denoising_steps=e["steps"],
                diffusion_full_canvas=True, diffusion_sampler="entropy-bound", prefill_step_size=PREFILL_STEP,
            ):
                last = r
            wall = time.perf_counter() - t
            if i >= e["warmup"]:
                blocks = max(1, round(last.diffusion_canvas_tokens / canvas_len))
                runs.append({
                    "wall_s": wall, "tokens": last.generation_tokens, "generation_tps": last.generation_tps,
                    "prefill_time": last.prompt_tokens / max(last.prompt_tps, 1e-9),
                    "denoising_steps": last.diffusion_denoising_steps,
                    "steps_per_block": [last.diffusion_denoising_steps / blocks] * blocks,
                    "peak_memory_gb": last.peak_memory,
                })
        gen_cfg["confidence_threshold"] = adaptive_conf
        tps = C.summarize([x["generation_tps"] for x in runs])
        e2e[mode] = {"runs": runs, "generation_tps": tps,
                     "steps_per_block": [x["steps_per_block"] for x in runs],
                     "peak_memory_gb": max(x["peak_memory_gb"] for x in runs)}
        C.log(f"  e2e {mode}: {tps['median']:.1f} tok/s, steps {runs[-1]['denoising_steps']}")
    result["e2e"] = e2e
    C.write_result(args.out, result)


if __name__ == "__main__":
    main()
