"""mlx-vlm 0.7.10 end to end on the demo model's prompts, run by `scripts/bench_demo.py` with the
python of mlx-vlm's own environment (nothing of our package is imported here):

    VLM_PYTHON scripts/bench_worker_vlm_e2e.py --model FOLDER --prompts prompts.json --out result.json

Two settings, each over every prompt (token ids rendered by the driver with the demo's chat
template, so both ports see the same ids), seeded with `mx.random.seed(index)`:
- "mlx-vlm 0.7.10, its default sampler": `stream_diffusion_generate(..., max_tokens=N,
  skip_special_token_ids=[])` and nothing else (its defaults: confidence-threshold sampler,
  temperature 0, a shrunken canvas);
- "mlx-vlm 0.7.10, reference sampler settings": temperature 1.0, `diffusion_full_canvas=True`,
  `diffusion_sampler="entropy-bound"`, `max_denoising_steps` from the checkpoint's
  generation_config.
The model runs in float32 (MLX's CPU GatherMM, which its experts call, is float32-only).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import mlx.core as mx
    from mlx_vlm.generate import diffusion as D
    from mlx_vlm.utils import load

    job = json.loads(open(args.prompts).read())
    model, processor = load(args.model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    tokenizer = getattr(processor, "tokenizer", processor)
    gen_cfg = model.config.generation_config or {}
    steps = int(gen_cfg.get("max_denoising_steps", 48))
    settings = {
        "mlx-vlm 0.7.10, its default sampler": {},
        "mlx-vlm 0.7.10, reference sampler settings": dict(
            temperature=1.0, diffusion_full_canvas=True, diffusion_sampler="entropy-bound", max_denoising_steps=steps),
    }
    runs = {}
    for label, kwargs in settings.items():
        items = job["items"]
        for it in items[:2]:  # warm-up
            for _ in D.stream_diffusion_generate(model, processor, tokenizer, mx.array([it["ids"]]), None, None,
                                                 max_tokens=job["max_tokens"], skip_special_token_ids=[], **kwargs):
                pass
        out = []
        for i, it in enumerate(items):
            mx.random.seed(i)
            t = time.perf_counter()
            text, last = "", None
            for r in D.stream_diffusion_generate(model, processor, tokenizer, mx.array([it["ids"]]), None, None,
                                                 max_tokens=job["max_tokens"], skip_special_token_ids=[], **kwargs):
                text += r.text
                last = r
            wall = time.perf_counter() - t
            canvases = max(1, round(last.diffusion_canvas_tokens / max(1, int(model.config.canvas_length))))
            out.append({
                "family": it["family"], "prompt": it["prompt"], "reference": it["reference"], "text": text,
                "tokens": last.generation_tokens, "wall_s": wall,
                "steps_per_block": [last.diffusion_denoising_steps / canvases] * canvases,
                "canvas_tokens": last.diffusion_canvas_tokens, "work_tokens": last.diffusion_work_tokens,
            })
        runs[label] = {"prompts": out, "options": kwargs}
        print(f"{label}: {sum(x['tokens'] for x in out) / sum(x['wall_s'] for x in out):.1f} tok/s", flush=True)
    with open(args.out, "w") as f:
        json.dump({"runs": runs}, f)


if __name__ == "__main__":
    main()
