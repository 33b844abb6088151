"""Golden outputs: the token ids every path gives for fixed seeds, to show that a change of structure
changes no behaviour.

    python scripts/golden_outputs.py --out before.json                       # record
    python scripts/golden_outputs.py --out after.json --compare before.json  # record and compare

Paths covered: the trained demo model's held-out prompts (exact and fast mode, sampler overrides,
deferred stop checks, top-k self-conditioning), the random demo model over several canvases, a tiny
reference checkpoint built with transformers (sharpened so the adaptive stop fires), the 4-bit
mlx-vlm fixture (gather_qmm), a chat session that reuses its cache, templates / JSON / edits /
score / sudoku (pinned canvases, allowed-token masks, hooks), the HTTP server with concurrent
requests (batched decoder passes, fast mode, in-canvas streaming, drafts), the CLI, and a 2-rank
`mlx.launch` run. Every record holds token ids (or, over HTTP, the text) and steps per block.
Exits 1 when `--compare` finds a difference. Takes a few minutes on 2 CPU cores.

Each record names its path: "exact" records ask for the exact path, "fast" records for the
few-step setting (`FastOptions.few_steps()`, fast mode's default when these records were first
made), so they compare across the change of default; "default" records run with no mode at all
(fast mode's default since the many-step instrument). Over HTTP a request cannot choose the fast
techniques: the server's "fast" records run the server's fast mode, whatever its default.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's reference-checkpoint builders

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _few_steps():
    from mlx_diffusiongemma import FastOptions

    return FastOptions.few_steps()


FEW = _few_steps()
PATHS = {"exact": {"mode": "exact"}, "fast": {"mode": "fast", "fast": FEW}, "default": {}}
# The same setting from the command line.
FEW_FLAGS = ["--fast", "--fast-bound-window", "0", "--fast-commit-gap", "1.5"]


def _record(result) -> dict:
    """What a GenerationResult says about the path it took."""
    return {"tokens": list(result.tokens), "steps": list(result.steps_per_block), "passes": result.decoder_passes,
            "finish": result.finish_reason}


def demo_model(out: dict) -> None:
    import mlx_diffusiongemma as dg
    from mlx_diffusiongemma import FastOptions

    from mlx_diffusiongemma.demo.tasks import FAMILIES, held_out_set

    model, tok = dg.load("demo")
    for family in FAMILIES:
        for i, (prompt, _) in enumerate(held_out_set(family, 4, seed=77)):
            for mode, options in PATHS.items():
                r = dg.generate(model, tok, prompt, seed=100 + i, **options)
                out[f"demo/{family}/{i}/{mode}"] = _record(r)
    prompt = held_out_set("sort", 1, seed=5)[0][0]
    variants = {
        "steps10_bound05": dict(max_denoising_steps=10, entropy_bound=0.5, mode="exact"),
        "interval4": dict(stop_check_interval=4, mode="exact"),
        "sc_top_k16": dict(self_conditioning_top_k=16, mode="exact"),
        "t_min0": dict(t_min=0.0, t_max=0.5, stability_threshold=2, confidence_threshold=0.01, mode="exact"),
        "thinking": dict(thinking=True, mode="exact"),
        "fast_none": dict(mode="fast", fast=FastOptions.none()),
        "fast_no_gap": dict(mode="fast", fast=replace(FEW, commit_gap=None)),
        "fast_no_tail": dict(mode="fast", fast=replace(FEW, eos_tail_gap=None, stop_mean_over_canvas=False)),
        "fast_top_k_none": dict(mode="fast", fast=replace(FEW, top_k=None, bucket=False)),
        "default_steps10": dict(max_denoising_steps=10),
        "default_thinking": dict(thinking=True),
    }
    for name, options in variants.items():
        out[f"demo/variant/{name}"] = _record(dg.generate(model, tok, prompt, seed=9, **options))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    out["demo/messages"] = _record(dg.generate(model, tok, messages, seed=3, mode="exact"))

    chat = dg.ChatSession(model, tok, seed=4, mode="exact")
    for turn, text in enumerate(["Sort these numbers: 42 7 19 88 3", "Reverse the words: sun moon star rain"]):
        r = chat.send(text)
        out[f"demo/chat/{turn}"] = _record(r) | {"encoded": r.encoded_tokens}
    fast_chat = dg.ChatSession(model, tok, seed=5, **PATHS["fast"])
    default_chat = dg.ChatSession(model, tok, seed=5)
    for turn, text in enumerate(["Count from 5 to 70.", "Is 37 greater than 12?"]):
        out[f"demo/chat_fast/{turn}"] = _record(fast_chat.send(text))
        out[f"demo/chat_default/{turn}"] = _record(default_chat.send(text))

    # Canvas powers: pins, allowed-token masks and hooks.
    card = "Make a card for Ada, 36, from Paris."
    template = "Name:{{name:..6}}\nAge:{{age:..3}}\nCity:{{city:..6}}"
    for mode in ("exact", "fast"):
        r = dg.infill(model, tok, card, template, seed=1, **PATHS[mode])
        out[f"demo/infill/{mode}"] = {"text": r.text, "holes": r.holes} | _record(r.result)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer"},
                                               "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                               "adult": {"type": "boolean"}}}
    r = dg.fill_json(model, tok, card, schema, seed=2)
    out["demo/fill_json"] = {"text": r.text} | _record(r.result)
    r = dg.edit(model, tok, "3 7 19 42 88", "Sort these numbers: 88 3 42 7 19", strength=0.5, seed=3)
    out["demo/edit/warm"] = {"text": r.text} | _record(r.result)
    text = "Name: Ada\nAge: 36\nCity: Paris"
    start = text.index(" Paris")  # the space joins the word in the demo's tokenizer
    r = dg.edit(model, tok, text, "Make a card for Ada, 36, from Rome.", spans=[(start, start + 6)], seed=3)
    out["demo/edit/span"] = {"text": r.text} | _record(r.result)
    s = dg.score(model, tok, "Is 37 greater than 12?", ["yes", "no"], seed=0)
    out["demo/score"] = {"choice": s.choice, "probabilities": {k: round(v, 6) for k, v in s.probabilities.items()}}
    from mlx_diffusiongemma.editing import sudoku
    cells = sudoku.parse_puzzle("..3./.4.2/21../..2.")
    final = None
    for item in sudoku.stream_solve(model, tok, cells, seed=6):
        final = item
    out["demo/sudoku"] = {"text": final.text} | _record(final.result)


def random_models(out: dict, home: Path) -> None:
    import mlx.core as mx

    import mlx_diffusiongemma as dg
    from mlx_diffusiongemma import FastOptions

    from mlx_diffusiongemma.demo.random import ensure_demo

    model, tok = dg.load(ensure_demo(home / "demo-random"))
    for prompt in ("Hello there", "Tell me a story."):
        for name, options in {**PATHS, "interval3": dict(stop_check_interval=3, mode="exact"),
                              "fast_none": dict(mode="fast", fast=FastOptions.none())}.items():
            r = dg.generate(model, tok, prompt, seed=11, max_tokens=96, max_denoising_steps=6, **options)
            out[f"random/{prompt}/{name}"] = _record(r)

    from conftest import build_reference, save_checkpoint, sharpen, tiny_text_config

    from mlx_diffusiongemma import SamplerOptions
    from mlx_diffusiongemma.checkpoint.config import load_generation_defaults
    from mlx_diffusiongemma.checkpoint.loading import load_model
    from mlx_diffusiongemma.diffusion.engine import Request, run

    for name, sharp in (("plain", False), ("sharp", True)):
        ref = build_reference(tiny_text_config(), canvas_length=8, seed=4, vision=False)
        if sharp:
            sharpen(ref)
        folder = save_checkpoint(ref, home / f"ref-{name}")
        ours, _ = load_model(folder, dtype=mx.float32)
        ours.generation = load_generation_defaults(folder)
        for mode in ("exact", "fast", "default"):
            fast = {"fast": {"exact": None, "fast": FEW, "default": FastOptions()}[mode]}
            request = Request([2, 5, 17, 30, 44, 9], max_tokens=40, sampler=SamplerOptions(max_denoising_steps=12),
                              seed=21, **fast)
            result = list(run(ours, request))[-1]
            out[f"reference/{name}/{mode}"] = _record(result)

    model, tok = dg.load(ROOT / "tests" / "fixtures" / "mlxvlm_tiny" / "mlxvlm-4bit")
    for mode, options in PATHS.items():
        r = dg.generate(model, tok, [2, 5, 17, 30, 44, 9, 60], seed=3, max_tokens=32, max_denoising_steps=5, **options)
        out[f"mlxvlm-4bit/{mode}"] = _record(r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(out: dict) -> None:
    import urllib.request

    import uvicorn

    import mlx_diffusiongemma as dg
    from mlx_diffusiongemma.server import ServerConfig, create_app

    model, tok = dg.load("demo")
    app = create_app(model, tok, ServerConfig(model_id="demo", max_active=4))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            break
        except OSError:
            time.sleep(0.05)

    def post(path: str, body: dict):
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=600)

    prompts = ["Sort these numbers: 42 7 19 88 3", "Reverse the words: sun moon star rain",
               "Make a card for Ada, 36, from Paris.", "Count from 5 to 70.", "Is 37 greater than 12?",
               "Pick 8 different numbers in increasing order."]

    def chat(i: int, prompt: str, extra: dict) -> dict:
        body = {"model": "demo", "messages": [{"role": "user", "content": prompt}], "seed": 30 + i,
                "max_tokens": 128, "enable_thinking": False, **extra}
        data = json.loads(post("/v1/chat/completions", body).read())
        t = data.get("timings", {})
        return {"text": data["choices"][0]["message"]["content"], "steps": t.get("steps_per_block"),
                "finish": data["choices"][0]["finish_reason"], "tokens": data["usage"]["completion_tokens"]}

    def stream(i: int, prompt: str, extra: dict) -> dict:
        body = {"model": "demo", "messages": [{"role": "user", "content": prompt}], "seed": 30 + i,
                "max_tokens": 128, "enable_thinking": False, "stream": True, **extra}
        pieces, drafts, steps = [], 0, None
        with post("/v1/chat/completions", body) as r:
            for raw in r:
                line = raw.decode().rstrip("\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "draft" in data:
                    drafts += 1
                    continue
                for choice in data.get("choices", []):
                    pieces.append(choice["delta"].get("content") or "")
                steps = data.get("timings", {}).get("steps_per_block", steps)
        return {"text": "".join(pieces), "drafts": drafts, "steps": steps}

    exact = {"mode": "exact"}
    jobs = [(chat, i, p, exact) for i, p in enumerate(prompts)]  # concurrent: batched decoder passes
    jobs += [(chat, 10 + i, p, {"mode": "fast"}) for i, p in enumerate(prompts[:3])]
    jobs += [(chat, 40 + i, p, {}) for i, p in enumerate(prompts[3:])]  # the server's default path
    jobs += [(stream, 20, prompts[0], {"stream_options": {"in_canvas": True}, **exact}),
             (stream, 21, prompts[2], {"stream_options": {"include_drafts": True}, **exact})]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {f"server/{fn.__name__}/{i}": pool.submit(fn, i, p, extra) for fn, i, p, extra in jobs}
        for key, future in futures.items():
            out[key] = future.result()
    r = json.loads(post("/v1/completions", {"model": "demo", "prompt": "Sort these numbers: 5 1 3", "seed": 1,
                                            "max_tokens": 64, **exact}).read())
    out["server/completions"] = {"text": r["choices"][0]["text"]}
    srv.should_exit = True
    thread.join(timeout=30)


def cli(out: dict, home: Path) -> None:
    env = dict(os.environ, MLX_DIFFUSIONGEMMA_HOME=str(home))
    dgemma = [sys.executable, "-m", "mlx_diffusiongemma.cli.app"]
    prompt = "Sort these numbers: 42 7 19 88 3"
    runs = {"exact": ["--exact"], "fast": FEW_FLAGS, "fast_gap0": ["--fast", "--fast-bound-window", "0", "--fast-commit-gap", "0"],
            "fast_no_tail": [*FEW_FLAGS, "--no-fast-eos-tail"], "steps": ["--exact", "--steps", "7", "--entropy-bound", "0.3"],
            "default": [], "default_window0": ["--fast-bound-window", "0"]}
    for name, flags in runs.items():
        p = subprocess.run([*dgemma, "generate", "--model", "demo", "-p", prompt, "--seed", "8", "--json", *flags],
                           capture_output=True, text=True, env=env, timeout=600)
        data = json.loads(p.stdout)
        out[f"cli/{name}"] = {"tokens": data["token_ids"], "steps": data["steps_per_block"]}
    p = subprocess.run([*dgemma, "sudoku", "--model", "demo", "--seed", "2", "--json"], capture_output=True,
                       text=True, env=env, timeout=600)
    out["cli/sudoku"] = json.loads(p.stdout)

    # Two ranks on loopback: the model split over processes gives the same tokens.
    launch = "from mlx._distributed_utils.launch import main; main()"
    for name, flags in {"exact": ["--exact"], "fast": FEW_FLAGS, "default": []}.items():
        p = subprocess.run([sys.executable, "-c", launch, "--backend", "ring", "-n", "2", "--starting-port",
                            str(_free_port()), "--", sys.executable, "-m", "mlx_diffusiongemma.cli.app", "generate",
                            "--model", "demo", "-p", prompt, "--seed", "8", "--json", *flags],
                           capture_output=True, text=True, env=env, timeout=900)
        line = next(line for line in p.stdout.splitlines() if line.startswith("{"))
        data = json.loads(line)
        out[f"ranks2/{name}"] = {"tokens": data["token_ids"], "steps": data["steps_per_block"]}


def compare(now: dict, before: dict) -> int:
    missing = sorted(set(before) - set(now))
    added = sorted(set(now) - set(before))
    changed = sorted(k for k in set(now) & set(before) if now[k] != before[k])
    for k in changed:
        print(f"DIFFERS {k}\n  before {before[k]}\n  now    {now[k]}")
    for k in missing:
        print(f"MISSING {k}")
    for k in added:
        print(f"NEW {k}")
    same = len(set(now) & set(before)) - len(changed)
    print(f"{same} of {len(before)} records identical, {len(changed)} differ, {len(missing)} missing, {len(added)} new")
    return 1 if changed or missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--only", nargs="*", default=["demo", "random", "server", "cli"])
    args = parser.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for part in args.only:
            t0 = time.perf_counter()
            {"demo": lambda: demo_model(out), "random": lambda: random_models(out, home),
             "server": lambda: server(out), "cli": lambda: cli(out, home)}[part]()
            print(f"{part}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} records -> {args.out}")
    if args.compare:
        return compare(out, json.loads(args.compare.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
