"""Benchmark worker for mlx-diffusiongemma (this repository), run by `scripts/bench.py`.

    python scripts/bench_worker_ours.py --model FOLDER --plan plan.json --out result.json

Public API only: `mlx_diffusiongemma.load`, `model.prefill`, `model.denoise`,
`mlx_diffusiongemma.diffusion.sampler.compiled_step` (+ the engine's stop test and noise source, exactly
what `engine.run` does per step) and `mlx_diffusiongemma.generate`. The breakdown pass stubs
`model.Experts.__call__` to time the rest of the decoder without the routed experts.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import bench_common as C  # noqa: E402


def main() -> None:
    args = C.worker_args(__doc__.splitlines()[0])
    plan = C.load_plan(args.plan)
    import mlx_diffusiongemma
    from mlx_diffusiongemma import generate, load
    from mlx_diffusiongemma.diffusion import sampler
    from mlx_diffusiongemma.model import layers as layers_mod
    from mlx_diffusiongemma.model import model as model_mod

    mem = C.Memory(mx)
    result: dict = {"port": "ours", "plan": plan, "model_folder": args.model,
                    "version": mlx_diffusiongemma.__version__}
    precision = plan["precision"]
    t0 = time.perf_counter()
    model, tok = load(args.model, dtype=mx.float32 if precision == "f32" else None)
    result["load_s"] = time.perf_counter() - t0
    result["weights_gb"] = mem.active_gb()
    vocab, canvas_len = model.vocab_size, model.canvas_length
    # No EOS: every run commits the same number of tokens (random weights emit EOS ids by chance).
    model.generation = dataclasses.replace(model.generation, eos_token_ids=(vocab,))
    gen = model.generation
    warmup, repeats = plan["warmup"], plan["repeats"]
    C.log(f"ours {plan['preset']}/{precision}: loaded in {result['load_s']:.1f}s")

    # -- prefill ---------------------------------------------------------------------------------
    def prefill(ids):
        cache = model.prefill(ids)
        mx.eval(cache.state())
        return cache

    result["prefill"] = C.measure_prefill(mx, prefill, plan, vocab, mem)

    # The decoder's timing does not depend on the cached values, only on the cache's shape and
    # layout: fill the cache through its own append path, in the prefill's chunk size, with
    # random K/V (no encoder cost, so long caches are affordable at every precision).
    act_dtype = mx.float32 if precision == "f32" else model.embed_dtype
    chunk = model_mod.PREFILL_CHUNK

    def synthetic_cache(n):
        cache = model.make_cache()
        blocks = {}
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            for i, layer in enumerate(cache.layers):
                shape = (1, model.text.kv_heads[i], m, model.text.head_dims[i])
                if shape not in blocks:
                    blocks[shape] = mx.random.normal(shape, key=mx.random.key(len(blocks))).astype(act_dtype)
                layer.append(blocks[shape], blocks[shape])
            cache.length += m
            mx.eval(cache.state())
        return cache

    caches = {n: synthetic_cache(n) for n in plan["cache_lengths"]}

    # -- one decoder step: forward and sampler, separately --------------------------------------
    canvas = C.random_ids(mx, canvas_len, vocab, seed=7, low=0)
    t_first = sampler.temperature_f32(plan["steps"], plan["steps"], gen.t_min, gen.t_max)
    forward = {}
    sc = None
    for n in plan["cache_lengths"]:
        cache = caches[n]
        # Steady state: self-conditioned on the previous step's processed logits.
        logits0 = model.denoise(canvas, cache, None)
        sc = (logits0 / t_first).astype(model.embed_dtype)
        mx.eval(sc)

        def fwd(cache=cache, sc=sc):
            mx.eval(model.denoise(canvas, cache, sc))

        forward[str(n)] = C.measure(fwd, mem, f"forward @ cache {n}", warmup=warmup, repeats=repeats)
    result["forward"] = forward

    # The sampler does not depend on the cache: measured once, on real logits.
    logits = model.denoise(canvas, caches[plan["cache_lengths"][0]], sc)
    mx.eval(logits)
    keys = iter(mx.random.split(mx.random.key(0), 10_000))
    history = sampler.init_history(gen.stability_threshold, 1, canvas_len)
    t_arr = mx.array(sampler.temperature_f32(plan["steps"] // 2, plan["steps"], gen.t_min, gen.t_max), dtype=mx.float32)

    def sampler_step():  # what engine.run does per step besides model.denoise
        u = sampler.sample_uniforms(next(keys), (1, canvas_len))
        r = sampler.random_canvas(next(keys), 1, canvas_len, vocab)
        res = sampler.compiled_step(logits, canvas, t_arr, u, r, gen.entropy_bound)
        stop, hist = sampler.stop_check(history, res.argmax, res.token_entropy, gen.confidence_threshold)
        mean = res.token_entropy.mean()
        mx.eval(stop, mean, res.next_canvas, res.argmax, res.accepted, hist)  # the one sync
        stop.item()
        mean.item()

    result["sampler"] = C.measure(sampler_step, mem, "sampler", warmup=max(warmup, 2), repeats=repeats)

    # -- our optional fast path: top-k self-conditioning (an approximation; off by default) --------
    topk = plan.get("ours_topk_self_conditioning")
    if topk:
        n = plan["cache_lengths"][0]
        s = C.time_calls(lambda: mx.eval(model.denoise(canvas, caches[n], sc, self_conditioning_top_k=topk)),
                         warmup=warmup, repeats=repeats)
        result["forward_topk_self_conditioning"] = {"k": topk, "cache_length": n, "forward": s}
        C.log(f"  forward @ cache {n}, top-{topk} self-conditioning: {s['median']*1e3:.1f} ms")

    # -- breakdown: the decoder without its routed experts, and the experts alone -----------------
    if plan.get("breakdown_cache_length") in caches:
        n = plan["breakdown_cache_length"]
        cache = caches[n]
        original = layers_mod.Experts.__call__

        def stub(self, x, idx, weights):
            return mx.zeros_like(x)

        layers_mod.Experts.__call__ = stub
        try:
            s_stub = C.time_calls(lambda: mx.eval(model.denoise(canvas, cache, sc)), warmup=warmup, repeats=repeats)
        finally:
            layers_mod.Experts.__call__ = original
        # The experts alone, layer after layer, on canvas-shaped inputs and real routing.
        layers = model.layers
        d = model.text.hidden_size
        x = (mx.random.normal((1, canvas_len, d), key=mx.random.key(3))).astype(model.embed_dtype)
        routes = [layer.router(x) for layer in layers]
        mx.eval(x, routes)

        def experts_only():
            mx.eval([layer.experts(x, idx, w) for layer, (idx, w) in zip(layers, routes)])

        s_exp = C.time_calls(experts_only, warmup=warmup, repeats=repeats)
        prof = [C.profile_ops(mx, lambda: mx.eval(model.denoise(canvas, cache, sc)))
                for _ in range(plan.get("profile_repeats", 1))]
        result["breakdown"] = {"cache_length": n, "forward_without_experts": s_stub, "experts_only": s_exp,
                               "forward": forward[str(n)], "op_profile": prof}
        C.log(f"  breakdown @ {n}: no-experts {s_stub['median']*1e3:.1f} ms, experts alone {s_exp['median']*1e3:.1f} ms")
    caches.clear()

    # -- end to end ----------------------------------------------------------------------------
    e = plan["e2e"]
    if not e:
        C.write_result(args.out, result)
        return
    prompt = [int(i) for i in C.random_ids(mx, e["prompt_len"], vocab, seed=11).tolist()[0]]
    max_tokens = e["blocks"] * canvas_len
    e2e = {}
    modes = [("fixed", -1.0, {}), ("adaptive", None, {})]
    if topk:
        # Our optional fast paths together: top-k self-conditioning and a stop read every 4 steps.
        modes.append(("fixed-lean", -1.0, {"self_conditioning_top_k": topk, "stop_check_interval": 4}))
    for mode, conf, extra in modes:
        if mode == "adaptive" and not e.get("adaptive", True):
            continue
        runs = []
        reps = e["repeats"] if mode == "fixed" else e.get("adaptive_repeats", 1) if mode == "adaptive" else 1
        for i in range(e["warmup"] + reps):
            mem.reset()
            t = time.perf_counter()
            r = generate(model, tok, prompt, max_tokens=max_tokens, seed=100 + i,
                         max_denoising_steps=e["steps"], confidence_threshold=conf, mode="exact", **extra)
            wall = time.perf_counter() - t
            if i >= e["warmup"]:
                runs.append({
                    "wall_s": wall, "tokens": len(r.tokens), "generation_tps": r.generation_tps,
                    "generation_time": r.generation_time, "prefill_time": r.prefill_time,
                    "steps_per_block": r.steps_per_block, "tokens_per_forward": r.tokens_per_forward,
                    "peak_memory_gb": r.peak_memory_gb,
                    "decoder_passes": r.decoder_passes, "host_syncs": r.host_syncs,
                })
        tps = C.summarize([x["generation_tps"] for x in runs])
        e2e[mode] = {"runs": runs, "generation_tps": tps, "options": extra,
                     "steps_per_block": [x["steps_per_block"] for x in runs],
                     "peak_memory_gb": max(x["peak_memory_gb"] for x in runs)}
        C.log(f"  e2e {mode}: {tps['median']:.1f} tok/s, steps/block {runs[-1]['steps_per_block']}")
    result["e2e"] = e2e
    result["host_syncs_per_step"] = 1
    C.write_result(args.out, result)


if __name__ == "__main__":
    main()
