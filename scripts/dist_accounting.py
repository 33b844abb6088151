"""Communication and memory of the model split over ranks, for the 26B shape (plain arithmetic).

    python scripts/dist_accounting.py [--canvas 256] [--steps 16]

Prints the markdown tables quoted in docs/distributed.md: bytes exchanged per denoising step and
per committed token for 2 and 4 ranks, what Thunderbolt 5 and 10 GbE links imply for step time,
and the weight bytes each rank holds (mixed-4bit, the default conversion).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import text_config  # noqa: E402

from mlx_diffusiongemma.perf.accounting import weight_bytes_per_step
from mlx_diffusiongemma.model.args import parse_text_args
from mlx_diffusiongemma.model.args import ModelArgs
from mlx_diffusiongemma.parallel.plan import DistributedError, expert_ranges, plan_shards
from mlx_diffusiongemma.perf.communication import link_time, pass_communication

# Links: nominal rate, and a per-message latency for the ring backend's TCP sockets. The rates are
# the links' line rates (what MLX's ring backend reaches over TCP is lower: see the docs); the
# latencies are typical small-message TCP round-trip halves on a direct cable.
LINKS = {
    "Thunderbolt 5 (80 Gb/s)": (80.0, 20e-6),
    "Thunderbolt 4/3 (40 Gb/s)": (40.0, 25e-6),
    "10 GbE (10 Gb/s)": (10.0, 40e-6),
}
LAYOUTS = {"experts only (default)": (), "experts + attention TP": ("attention",),
           "experts + attention + MLP TP": ("attention", "mlp")}


def splittable(text, n: int, tp) -> bool:
    """Whether the released model, converted mixed-4bit (group 64), can be split so."""
    args = ModelArgs(text, quantization={"group_size": 64, "bits": 4})
    paths = {f"model.decoder.layers.{i}.{m}" for i in range(text.num_hidden_layers)
             for m in ("self_attn.o_proj", "mlp.down_proj")}
    try:
        plan_shards(args, 0, n, tp, paths)
        return True
    except DistributedError:
        return False


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--steps", type=int, default=16, help="denoising steps per block, for per-token figures")
    a = p.parse_args(argv)
    text = parse_text_args(text_config("26b-shape"))
    c = a.canvas

    print(f"### Bytes per rank, 26B shape, canvas {c}, bf16 activations\n")
    print("| ranks | layout | splits the 26B mixed-4bit? | all_sums / step | sent per rank / step | "
          f"per committed token ({a.steps} steps + 1 encode per block) | on all links / step |")
    print("|---|---|---|---|---|---|---|")
    for n in (2, 4):
        for name, tp in LAYOUTS.items():
            step = pass_communication(text, c, n, tp)
            enc = pass_communication(text, c, n, tp, encoder=True)
            per_token = (a.steps * step["sent_per_rank"] + enc["sent_per_rank"]) / c
            ok = "yes" if splittable(text, n, tp) else "no"
            print(f"| {n} | {name} | {ok} | {step['collectives']} | {mb(step['sent_per_rank'])} | "
                  f"{per_token / 1e3:.0f} KB | {mb(step['on_links'])} |")

    print(f"\n### Communication time per denoising step (ideal: line rate, nothing overlapped)\n")
    print("| link | ranks | " + " | ".join(LAYOUTS) + " |")
    print("|---|---|" + "---|" * len(LAYOUTS))
    for link, (gbit, lat) in LINKS.items():
        for n in (2, 4):
            cells = [f"{link_time(pass_communication(text, c, n, tp), gbit, lat) * 1e3:.1f} ms" for tp in LAYOUTS.values()]
            print(f"| {link} | {n} | " + " | ".join(cells) + " |")

    w = weight_bytes_per_step(text, c, "mixed-4bit")
    experts = w["experts"]
    # Held once: the embedding (also the LM head and the soft-embedding matrix) and the rest.
    embed = w["lm_head"]
    other = w["attention"] + w["dense_mlp"] + w["router"] + w["norms_scalars"] + embed \
        + (w["self_conditioning"] - embed)
    print("\n### Weight bytes held per rank (mixed-4bit)\n")
    print("| ranks | routed experts | attention | dense MLP | everything else | total per rank |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 | {experts / 1e9:.2f} GB | {w['attention'] / 1e9:.2f} GB | {w['dense_mlp'] / 1e9:.2f} GB | "
          f"{(other - w['attention'] - w['dense_mlp']) / 1e9:.2f} GB | {(experts + other) / 1e9:.2f} GB |")
    for n in (2, 4):
        most = max(stop - start for start, stop in expert_ranges(text.num_experts, n))
        e = experts * most / text.num_experts
        rest = other - w["attention"] - w["dense_mlp"]
        print(f"| {n} | {e / 1e9:.2f} GB | {w['attention'] / 1e9:.2f} GB (TP: {w['attention'] / n / 1e9:.2f}) | "
              f"{w['dense_mlp'] / 1e9:.2f} GB (TP: {w['dense_mlp'] / n / 1e9:.2f}) | {rest / 1e9:.2f} GB | "
              f"{(e + other) / 1e9:.2f} GB" + (f" (attention TP: {(e + other - w['attention'] * (1 - 1 / n)) / 1e9:.2f} GB)"
                                                if splittable(text, n, ("attention",)) else "") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
