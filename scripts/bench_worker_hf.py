"""Benchmark worker for the reference implementation (transformers 5.23, PyTorch CPU, float32),
run by `scripts/bench.py` with the main environment's python, for context only:

    python scripts/bench_worker_hf.py --model HF_FOLDER --plan plan.json --out result.json

It times the pieces the reference `generate` (`DiffusionGemmaGenerationMixin.generate`) runs:
the encoder over the prompt into a `DynamicCache` (`model.model.encoder` with the masks of
`create_masks_for_generate`), one decoder step (`model(decoder_input_ids=..., self_conditioning_logits=...,
past_key_values=cache, decoder_attention_mask=<create_diffusion_decoder_attention_mask>, ...)`), and
`model.generate(...)` end to end with a fixed step cap (confidence_threshold=1e-30: never
confident; the reference refuses values <= 0) and with the checkpoint's adaptive stop.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as C  # noqa: E402


def main() -> None:
    args = C.worker_args(__doc__.splitlines()[0])
    plan = C.load_plan(args.plan)
    import torch
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    torch.manual_seed(0)
    torch.set_num_threads(int(plan.get("torch_threads") or torch.get_num_threads()))
    result: dict = {"port": "transformers", "plan": plan, "model_folder": args.model,
                    "version": transformers.__version__, "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "dtype": "float32"}
    t0 = time.perf_counter()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.model, dtype=torch.float32).eval()
    result["load_s"] = time.perf_counter() - t0
    cfg = model.config
    vocab, canvas_len = cfg.text_config.vocab_size, cfg.canvas_length
    warmup, repeats = plan["warmup"], plan["repeats"]
    C.log(f"transformers {plan['preset']}: loaded in {result['load_s']:.1f}s")

    def prefill(ids):
        cache = DynamicCache(config=cfg.get_text_config(decoder=True))
        n = ids.shape[1]
        attention_mask = torch.ones((1, n), dtype=torch.bool)
        pos = torch.arange(0, n, dtype=torch.int32).unsqueeze(0)
        dummy = torch.empty((1, n, 0), dtype=model.dtype)
        masks = model.model.encoder.create_masks_for_generate(
            config=cfg, inputs_embeds=dummy, attention_mask=attention_mask, past_key_values=cache, position_ids=pos)
        model.model.encoder(input_ids=ids, attention_mask=masks, past_key_values=cache, position_ids=pos)
        return cache

    def ids_of(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(12, vocab, (1, n), generator=g)

    forward, prefill_res = {}, {}
    canvas = torch.randint(0, vocab, (1, canvas_len), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        for n in plan["cache_lengths"]:
            ids = ids_of(n, n)
            t = time.perf_counter()
            cache = prefill(ids)
            prefill_res[str(n)] = C.summarize([time.perf_counter() - t])
            prefill_res[str(n)]["tokens_per_s"] = n / prefill_res[str(n)]["median"]
            dec_mask = torch.ones((1, n + canvas_len), dtype=torch.bool)
            mask_mapping = model.model.decoder.create_diffusion_decoder_attention_mask(
                config=cfg, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
                decoder_attention_mask=dec_mask)
            pos = torch.arange(n, n + canvas_len, dtype=torch.int32).unsqueeze(0)
            sc = model(decoder_input_ids=canvas, decoder_attention_mask=mask_mapping, past_key_values=cache,
                       decoder_position_ids=pos).logits / 0.8

            def fwd():
                model(decoder_input_ids=canvas, self_conditioning_logits=sc, decoder_attention_mask=mask_mapping,
                      past_key_values=cache, decoder_position_ids=pos)

            forward[str(n)] = C.time_calls(fwd, warmup=warmup, repeats=repeats)
            C.log(f"  forward @ cache {n}: {forward[str(n)]['median']*1e3:.1f} ms")
    result["prefill_single"] = prefill_res
    result["forward"] = forward

    e = plan["e2e"]
    if not e:
        C.write_result(args.out, result)
        return
    prompt = ids_of(e["prompt_len"], 11)
    max_tokens = e["blocks"] * canvas_len
    e2e = {}
    for mode, conf in (("fixed", 1e-30), ("adaptive", None)):
        if mode == "adaptive" and not e.get("adaptive", True):
            continue
        runs = []
        reps = e["repeats"] if mode == "fixed" else e.get("adaptive_repeats", e["repeats"])
        warm = 1 if mode == "fixed" else 0  # the first generate call pays one-time costs
        for i in range(warm + reps):
            kwargs = dict(max_new_tokens=max_tokens, max_denoising_steps=e["steps"], eos_token_id=[vocab])
            if conf is not None:
                kwargs["confidence_threshold"] = conf
            torch.manual_seed(100 + i)
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(prompt, **kwargs)
            wall = time.perf_counter() - t
            tokens = out.sequences.shape[1] - prompt.shape[1]
            passes = float(tokens / out.tokens_per_forward[0]) if out.tokens_per_forward[0] > 0 else None
            if i < warm:
                continue
            runs.append({"wall_s": wall, "tokens": int(tokens), "tokens_per_s_incl_prefill": tokens / wall,
                         "decoder_passes": passes})
        tps = C.summarize([x["tokens_per_s_incl_prefill"] for x in runs])
        e2e[mode] = {"runs": runs, "tokens_per_s_incl_prefill": tps}
        C.log(f"  e2e {mode}: {tps['median']:.1f} tok/s (incl. prefill), passes {runs[-1]['decoder_passes']}")
    result["e2e"] = e2e
    C.write_result(args.out, result)


if __name__ == "__main__":
    main()
