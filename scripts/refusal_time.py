"""How long a request that cannot fit the memory takes to be refused, on the API, the server and
the CLI (the memory plan, README "Memory plan").

    python scripts/refusal_time.py

The machine is made smaller by setting `memory.memory_limit` (in process) or the plan's limit
(a loaded model). Prints a markdown table: what was refused, where, seconds (median of 5) and the
first words of the message. The CLI row is a whole `dgemma generate` process (Python start and
imports included), with the limit set in that process before the command runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from full_shape import RELEASED  # noqa: E402  (the released model's config, one copy for the scripts)

# The CLI in its own process, the machine made small before the command runs.
_CLI = """
import sys
from mlx_diffusiongemma.checkpoint import memory
limit = int(sys.argv[1])
memory.memory_limit = lambda: (limit, "Metal's recommended working set")
from mlx_diffusiongemma.cli.app import main
sys.argv = ["dgemma"] + sys.argv[2:]
main()
"""


def timed(fn, n: int = 5) -> tuple[float, str]:
    times, message = [], ""
    for _ in range(n):
        t = time.perf_counter()
        try:
            fn()
            message = "(not refused)"
        except Exception as e:  # the refusal under test
            message = str(e)
        times.append(time.perf_counter() - t)
    return statistics.median(times), message


def main() -> int:
    import openai

    import mlx_diffusiongemma as dg
    from mlx_diffusiongemma.checkpoint import loading, memory
    from mlx_diffusiongemma.demo import shipped_demo_dir
    from mlx_diffusiongemma.server.app import ServerConfig, create_app

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers_server import running

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "diffusiongemma-26B-A4B-it"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(RELEASED))
        (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
        saved = memory.memory_limit
        memory.memory_limit = lambda: (int(10.7e9), "Metal's recommended working set")
        try:
            s, m = timed(lambda: loading.plan(hf).converted("mixed-4bit").check())
            rows.append(("26B shape converted mixed-4bit, on a 16 GB Mac (config and index only)",
                         "API (`plan(...).converted(...).check()`)", s, m))
            memory.memory_limit = lambda: (2**20, "Metal's recommended working set")
            s, m = timed(lambda: dg.load("demo"))
            rows.append(("demo model on a 1 MiB machine", "API (`load`)", s, m))
        finally:
            memory.memory_limit = saved

        model, tok = dg.load("demo")
        model.memory_plan.limit = model.memory_plan.at(512).peak
        s, m = timed(lambda: dg.generate(model, tok, "hello", max_tokens=2048, mode="exact"))
        rows.append(("demo model, a 2048-token reply over the memory", "API (`generate`)", s, m))
        with running(create_app(model, tok, ServerConfig(model_id="demo", max_tokens_limit=4096))) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            s, m = timed(lambda: c.completions.create(model="demo", prompt="hello", max_tokens=2048))
            rows.append(("demo model, a 2048-token reply over the memory", "server (HTTP, openai client)", s, m))

        limit = str(model.memory_plan.weights)
        cmd = [sys.executable, "-c", _CLI, limit, "generate", "--model", str(shipped_demo_dir()), "-p", "hi"]
        s, m = timed(lambda: _cli(cmd), n=3)
        rows.append(("demo model over the machine", "CLI (`dgemma generate`, whole process)", s, m))
        s, m = timed(lambda: _cli(cmd[:3] + [str(10**15)] + cmd[4:6] + ["/nonexistent"] + cmd[7:]), n=3)
        rows.append(("(baseline: a missing --model folder)", "CLI (`dgemma generate`, whole process)", s, m))

    print("| what | where | seconds (median) | message |")
    print("|---|---|---|---|")
    for what, where, s, m in rows:
        print(f"| {what} | {where} | {s:.3f} | {m[:110]}… |")
    return 0


def _cli(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
