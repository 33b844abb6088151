"""Start-up of the command line: how long `dgemma` takes before and around a one-shot reply.

    python scripts/bench_startup.py                      # this checkout's environment
    python scripts/bench_startup.py --python OTHER/bin/python --runs 5
    python scripts/bench_startup.py --hide torch          # as installed by `pip install .` (no torch)

For each command (`dgemma --help`, and `dgemma generate --model demo ...` end to end) it runs
the command `--runs` times in a fresh process and reports the median wall time and the median CPU
time (user + system: less sensitive to other work on a shared machine). The commands run from
`/`, so the interpreter's installed package is measured, not the current folder. `--hide torch`
makes the packages named invisible to the process (`sys.modules[name] = None`: transformers then
sees no torch), as in an install without the test extra, where torch is only the tests' oracle.
Then
`python -X importtime` of what `generate` imports (the command line and `api.load`) is summed by
top-level package (self times), which says where the import time goes. Results go to
docs/performance.md ("Start-up"); nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

PROMPT = "Sort these numbers: 42 7 19 88 3"


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one run in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout


def hidden(names: list[str]) -> str:
    return f"import sys; sys.modules.update(dict.fromkeys({names!r})); "


def import_profile(python: str, env: dict, hide: list[str]) -> dict[str, float]:
    """Seconds of import (self time) per top-level package for what `dgemma generate` imports."""
    code = hidden(hide) + ("import mlx_diffusiongemma.cli.app, mlx_diffusiongemma.cli.generate; "
                           "from mlx_diffusiongemma.api import load; load('demo')")
    err = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env,
                         cwd="/").stderr
    total: dict[str, float] = defaultdict(float)
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (p.strip() for p in line[len("import time:"):].split("|"))
        total[name.split(".")[0]] += int(self_us) / 1e6
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="the interpreter of the environment to measure")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hide", default="", help="comma-separated packages to make invisible (e.g. torch)")
    args = ap.parse_args()
    hide = [name for name in args.hide.split(",") if name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    dgemma = [args.python, "-c", hidden(hide) + "sys.argv[0] = 'dgemma'; from mlx_diffusiongemma.cli.app import main; main()"]
    commands = {
        "dgemma --help": dgemma + ["--help"],
        f'dgemma generate --model demo -p "{PROMPT}" --seed 0': dgemma + ["generate", "--model", "demo", "-p", PROMPT,
                                                                         "--seed", "0"],
    }
    print(f"python: {args.python}; hidden: {', '.join(hide) or 'none'}; load average {os.getloadavg()[0]:.1f} (CPU time is the steadier figure)")
    print("| command | wall (median) | CPU user+sys (median) | output |")
    print("|---|---|---|---|")
    for name, cmd in commands.items():
        runs = [timed(cmd, env) for _ in range(args.runs)]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        text = [line for line in runs[-1][2].strip().splitlines() if line.strip()][:1]
        print(f"| `{name}` | {statistics.median(walls):.2f} s | {statistics.median(cpus):.2f} s | "
              f"{text[-1] if text else ''} |")
    profile = import_profile(args.python, env, hide)
    print("\nimport time (self, summed per top-level package) of the generate path:")
    print("| package | seconds |")
    print("|---|---|")
    for name, seconds in list(profile.items())[:10]:
        print(f"| {name} | {seconds:.2f} |")
    print(f"| all | {sum(profile.values()):.2f} |")


if __name__ == "__main__":
    main()
