#!/usr/bin/env python3
"""What the server holds across sequential long-prompt requests, with and without its memory budget.

    nice -n 10 python scripts/server_memory.py --model demo-random --requests 12 --prompt 1024 --max-tokens 64

Loads the model once and serves it in this process (uvicorn on a free loopback port, the app
`dgemma serve` runs), then sends `--requests` completions one after another, each with a
different `--prompt`-token prompt, and reads `/health` after each: the prompt-cache store's
snapshots and bytes, and MLX's active, peak (reset before each request) and cached bytes as the
engine thread last saw them. Two runs:

- **no budget**: the plan's limit unknown, so the store is bounded by its entry count only (8,
  two snapshots per request), which is what the server did before it had a memory budget;
- **budget**: the plan's limit set to the weights plus `--room` running requests' planned bytes
  (`MemoryPlan.request_bytes`), a machine with that much room; the store keeps what is left.

Prints a Markdown table and the plan's numbers for the released model's shape at the same
context (`scripts/full_shape.py`'s config), where one snapshot is hundreds of MB. Not part of CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.checkpoint.memory import buffer_bytes, kv_bytes
from mlx_diffusiongemma.diffusion.engine import request_positions
from mlx_diffusiongemma.model.args import parse_model_args
from mlx_diffusiongemma.server import ServerConfig, create_app
from mlx_diffusiongemma.server.serving import make_server

MB = 2**20


def serve(app):
    """(base URL, stop) for `app` under uvicorn on a loopback port the OS picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def call(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run(model, tok, prompts: list[list[int]], args, limit: int | None) -> tuple[list[dict], dict]:
    """(a row per sequential request, the concurrent requests' row) with the plan's limit `limit`."""
    plan = model.memory_plan
    saved, plan.limit = plan.limit, limit
    rows = []
    gc.collect()
    mx.clear_cache()
    try:
        url, stop = serve(create_app(model, tok, ServerConfig(model_id="m", max_tokens_limit=args.max_tokens)))

        def ask(i: int, ids: list[int]) -> dict:
            return call(url, "/v1/completions", {"model": "m", "prompt": ids, "max_tokens": args.max_tokens,
                                                 "seed": i, "max_denoising_steps": args.steps})

        try:
            for i, ids in enumerate(prompts[: args.requests]):
                mx.reset_peak_memory()  # the engine thread is idle between requests
                out = ask(i, ids)
                h = call(url, "/health")
                rows.append({"request": i + 1, "prompt_tokens": out["usage"]["prompt_tokens"],
                             "entries": h["prompt_cache"]["entries"], "store": h["memory"]["prompt_cache"],
                             "evicted": h["prompt_cache"]["evicted_for_memory"], **h["memory"]["mlx"]})
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=ask, args=(100 + i, ids))
                       for i, ids in enumerate(prompts[args.requests:])]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            h = call(url, "/health")
            together = {"requests": len(threads), "seconds": time.perf_counter() - t0,
                        "waited": h["memory"]["waited_for_memory"], "batches": h["batch_sizes"],
                        "store": h["memory"]["prompt_cache"], **h["memory"]["mlx"]}
        finally:
            stop()
    finally:
        plan.limit = saved
    return rows, together


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo-random")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens of each request")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="max_denoising_steps of each request")
    p.add_argument("--concurrent", type=int, default=4, help="requests sent at once after the sequential ones")
    p.add_argument("--room", type=float, default=1.1, help="the budget run's headroom, in planned requests")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 64 or not 0 <= args.concurrent <= 16 or not 1 <= args.prompt <= 8192:
        p.error("--requests must be 1-64, --concurrent 0-16 and --prompt 1-8192")

    model, tok = dg.load(args.model)
    plan = model.memory_plan
    rng = random.Random(0)
    vocab = [t for t in range(model.vocab_size) if t not in set(model.generation.eos_token_ids)]
    prompts = [[rng.choice(vocab) for _ in range(args.prompt)] for _ in range(args.requests + args.concurrent)]
    positions = request_positions(model, args.prompt, args.max_tokens)
    cost = plan.request_bytes(positions)
    limit = plan.weights + int(args.room * cost)
    print(f"{args.model}: weights {plan.weights / MB:.1f} MiB; a request of {positions} positions reserves "
          f"{cost / MB:.1f} MiB ({kv_bytes(model.text, positions) / MB:.2f} MiB of it its cache); "
          f"budget run's limit {limit / MB:.1f} MiB", file=sys.stderr)
    before, before_together = run(model, tok, prompts, args, None)
    after, after_together = run(model, tok, prompts, args, limit)

    print("| request | no budget: snapshots | store MiB | MLX active MiB | peak MiB | budget: snapshots "
          "| store MiB | MLX active MiB | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, a in zip(before, after):
        print(f"| {b['request']} | {b['entries']} | {b['store'] / MB:.2f} | {b['active'] / MB:.2f} | "
              f"{b['peak'] / MB:.2f} | {a['entries']} | {a['store'] / MB:.2f} | {a['active'] / MB:.2f} | "
              f"{a['peak'] / MB:.2f} |")
    print(f"\n| {args.concurrent} requests at once | seconds | waited for memory | decoder batches (size: count) "
          f"| MLX peak MiB | store MiB after |")
    print("|---|---|---|---|---|---|")
    for name, t in (("no budget", before_together), ("budget", after_together)):
        print(f"| {name} | {t['seconds']:.1f} | {t['waited']} | {t['batches']} | {t['peak'] / MB:.1f} | "
              f"{t['store'] / MB:.2f} |")
    released = parse_model_args(_released())
    c = released.canvas_length
    ctx = request_positions(SimpleNamespace(canvas_length=c), args.prompt, args.max_tokens)
    kv, buf = kv_bytes(released.text, ctx), max(buffer_bytes(released.text, c, ctx).values())
    print(f"\nThe released shape at {ctx} positions (plan): a snapshot up to {kv / 1e9:.2f} GB, a running "
          f"request {(kv + buf) / 1e9:.2f} GB; 8 snapshots up to {8 * kv / 1e9:.2f} GB.")
    if args.out:
        args.out.write_text(json.dumps({"before": before, "after": after, "before_together": before_together,
                                        "after_together": after_together, "limit": limit, "cost": cost}, indent=1))
    return 0


def _released() -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from full_shape import RELEASED

    return RELEASED


if __name__ == "__main__":
    raise SystemExit(main())
