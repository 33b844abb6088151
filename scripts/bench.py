"""Benchmark mlx-diffusiongemma against the other MLX port (mlx-vlm 0.7.10), one command:

    python scripts/bench.py --presets tiny,small,medium --out bench-results/

From a clean clone with this package installed (`pip install -e ".[test]"`, which brings
transformers for the reference), this:

1. writes random-weight DiffusionGemma checkpoints in the Hugging Face layout for each preset
   (`scripts/bench_models.py`; numpy + safetensors, seconds), and converts each with OUR
   converter (`mlx_diffusiongemma.convert.convert`, recipes "bf16" and "mixed-4bit") and with
   mlx-vlm's OWN converter (`python -m mlx_vlm convert`, unquantized and `-q --q-bits 4
   --q-group-size 64`, its mixed 4/8-bit DiffusionGemma predicate);
2. installs mlx-vlm 0.7.10 into its own virtual environment (`OUT/.vlm-venv`, or reuses
   `--vlm-python`) and drives it from a worker script run with that environment's python;
3. times, for every preset and precision, in separate processes and with the same protocol
   (`scripts/bench_common.py`): prefill tokens/s at several prompt lengths; one decoder step,
   forward and sampler separately, at several cache lengths; end-to-end tokens/s with a fixed
   number of steps per block (stop disabled) and with the adaptive stop; MLX peak memory;
   and a breakdown of the decoder step (routed experts stubbed; a per-op profile of the
   quantized and gather matmuls), for ours (`scripts/bench_worker_ours.py`), mlx-vlm
   (`scripts/bench_worker_vlm.py`) and, for context, the transformers reference on PyTorch CPU
   (`scripts/bench_worker_hf.py`);
   `python scripts/bench.py --demo [options of scripts/bench_demo.py]` runs the end-to-end rows on
   the trained demo model instead: the exact path, each fast-mode technique alone, the full
   fast mode and mlx-vlm on the demo's Hugging Face export, with exact-match accuracy;
4. prints the hardware-independent work accounting of a denoising step
   (`mlx_diffusiongemma.accounting.step_work`) for every preset and the 26B model's shape at
   cache lengths 1K / 8K / 32K;
5. writes OUT/results.json (every raw sample), OUT/results.md (tables, machine, versions, the
   exact commands) and OUT/decoder_step.png (decoder step time against cache length, both
   ports; matplotlib is installed into the benchmark's mlx-vlm environment if no interpreter
   has it, or the chart is skipped with a message); `--update-docs` also puts the tables into
   docs/performance.md between its `bench:begin` / `bench:end` markers.

Precisions: "bf16" (ours only: mlx-vlm's unquantized experts call MLX's CPU GatherMM, which is
float32-only, so mlx-vlm cannot run a bf16 checkpoint on the CPU backend; recorded as such),
"f32" (the bf16 checkpoints computed in float32: the unquantized comparison both ports can run
on a CPU) and "4bit" (ours "mixed-4bit" vs mlx-vlm `-q`: 4-bit experts and self-conditioning,
8-bit everything else, group size 64). The "26b-shape" preset only feeds the work accounting;
timing it needs a machine that holds the model (~50 GB in bf16) and a GPU to be meaningful.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_models  # noqa: E402

VLM_VERSION = "0.7.10"
PRECISIONS = ("bf16", "f32", "4bit")
ACCOUNTING_CACHES = (1024, 8192, 32768)
DOCS_BEGIN = "<!-- bench:begin -->"
DOCS_END = "<!-- bench:end -->"

# What is measured, per preset and precision. Sized so that the default run (tiny, small,
# medium; bf16, f32, 4bit; both ports + the reference on tiny/small) takes <= 15 minutes on a
# 2-core x86 CPU, where MLX's CPU backend multiplies at ~2.5 GFLOP/s (float32), ~5.7 (bf16) and
# ~0.3 (quantized_matmul / gather_qmm): a 4-bit step costs ~10x a bf16 one there, so the 4-bit
# plans are shorter. `results.md` lists what was actually run.
_E2E = dict(prompt_len=64, warmup=0)
PLANS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unquantized": dict(prompt_lengths=[128, 512, 2048, 8192], cache_lengths=[256, 2048, 8192],
                            warmup=1, repeats=3, prefill_warmup=1, prefill_repeats=1,
                            e2e=dict(_E2E, blocks=2, steps=8, repeats=2, adaptive=True, adaptive_repeats=1)),
        "4bit": dict(prompt_lengths=[128, 512], cache_lengths=[256, 2048, 8192],
                     warmup=1, repeats=2, prefill_warmup=1, prefill_repeats=1,
                     e2e=dict(_E2E, blocks=2, steps=8, repeats=1, adaptive=True, adaptive_repeats=1)),
    },
    "small": {
        "unquantized": dict(prompt_lengths=[512, 2048], cache_lengths=[256, 2048, 8192],
                            warmup=1, repeats=3, prefill_warmup=0, prefill_repeats=1,
                            e2e=dict(_E2E, blocks=2, steps=8, repeats=2, adaptive=True, adaptive_repeats=1)),
        "4bit": dict(prompt_lengths=[128], cache_lengths=[256, 8192],
                     warmup=0, repeats=2, prefill_warmup=0, prefill_repeats=1,
                     e2e=dict(_E2E, blocks=1, steps=4, repeats=1, adaptive=False)),
    },
    "medium": {
        "unquantized": dict(prompt_lengths=[512], cache_lengths=[256, 8192],
                            warmup=1, repeats=2, prefill_warmup=0, prefill_repeats=1,
                            e2e=dict(_E2E, blocks=1, steps=8, repeats=1, adaptive=False)),
        "4bit": dict(prompt_lengths=[], cache_lengths=[256],
                     warmup=0, repeats=1, prefill_warmup=0, prefill_repeats=1,
                     e2e=None),
    },
}
QUICK_PLAN = dict(prompt_lengths=[128], cache_lengths=[256, 1024], warmup=0, repeats=1, prefill_warmup=0,
                  prefill_repeats=1, e2e=dict(_E2E, blocks=1, steps=2, repeats=1, adaptive=True, adaptive_repeats=1))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import mlx.core as mx

        info["mlx_device"] = str(mx.default_device())
    except Exception:
        pass
    return info


def main_versions() -> dict[str, str | None]:
    return {p: _version(p) for p in ("mlx", "mlx-lm", "mlx-diffusiongemma", "transformers", "torch", "numpy")}


def _run(cmd: list[str], *, timeout: float | None = None, cwd: Path | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        log("$ " + shlex.join(cmd))
    return subprocess.run(cmd, cwd=cwd, timeout=timeout, capture_output=quiet, text=True)


def vlm_versions(py: str) -> dict[str, str | None]:
    code = ("import json, importlib.metadata as m\n"
            "def v(p):\n  try: return m.version(p)\n  except Exception: return None\n"
            "print(json.dumps({p: v(p) for p in ['mlx-vlm', 'mlx', 'transformers', 'torch', 'matplotlib']}))")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True)
    if r.returncode:
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_vlm_python(args, commands: list[str]) -> str | None:
    """The python of an environment with mlx-vlm 0.7.10: `--vlm-python`, or OUT/.vlm-venv (made here)."""
    if args.vlm_python:
        v = vlm_versions(args.vlm_python).get("mlx-vlm")
        if v != VLM_VERSION:
            raise SystemExit(f"--vlm-python {args.vlm_python}: mlx-vlm {v} found, {VLM_VERSION} required")
        return args.vlm_python
    venv = Path(args.vlm_venv or (Path(args.out) / ".vlm-venv")).absolute()
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if py.exists() and vlm_versions(str(py)).get("mlx-vlm") == VLM_VERSION:
        return str(py)
    if args.no_install:
        log(f"mlx-vlm {VLM_VERSION} not available (no --vlm-python, {venv} missing, --no-install): skipping it")
        return None
    log(f"installing mlx-vlm {VLM_VERSION} into {venv} (once; a few minutes)")
    base = getattr(sys, "_base_executable", None) or sys.executable
    mlx_req = "mlx" if sys.platform == "darwin" else "mlx[cpu]"
    for cmd in ([base, "-m", "venv", str(venv)],
                [str(py), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                # mlx-vlm 0.7.10 needs transformers but not torch for this model.
                [str(py), "-m", "pip", "install", "--quiet", f"mlx-vlm=={VLM_VERSION}", mlx_req,
                 "transformers==5.23.0"]):
        commands.append(shlex.join(cmd))
        r = _run(cmd)
        if r.returncode:
            raise SystemExit(f"could not set up the mlx-vlm environment: {shlex.join(cmd)} failed")
    return str(py)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def prepare_models(preset: str, models_dir: Path, vlm_python: str | None, precisions: list[str],
                   commands: list[str]) -> dict[str, Path]:
    from mlx_diffusiongemma.convert import convert

    base = models_dir / preset
    hf = base / "hf"
    t = time.perf_counter()
    bench_models.build_hf_checkpoint(preset, hf)
    folders = {"hf": hf}
    stamp = (hf / "bench_checkpoint.json").read_text()
    need = {"bf16"} if {"bf16", "f32"} & set(precisions) else set()
    if "4bit" in precisions:
        need.add("4bit")
    for kind in sorted(need):
        dst = base / f"ours-{kind}"
        recipe = "bf16" if kind == "bf16" else "mixed-4bit"
        if not _fresh(dst, stamp):
            commands.append(f"python -c \"from mlx_diffusiongemma.convert import convert; "
                            f"convert('{hf}', '{dst}', recipe='{recipe}', force=True)\"")
            convert(hf, dst, recipe=recipe, force=True)
            (dst / "bench_source.json").write_text(stamp)
        folders[f"ours-{kind}"] = dst
        if vlm_python:
            vdst = base / f"vlm-{kind}"
            if not _fresh(vdst, stamp):
                if vdst.exists():
                    shutil.rmtree(vdst)
                cmd = [vlm_python, "-m", "mlx_vlm", "convert", "--hf-path", str(hf), "--mlx-path", str(vdst)]
                if kind == "4bit":
                    cmd += ["-q", "--q-bits", "4", "--q-group-size", "64"]
                commands.append(shlex.join(cmd))
                r = _run(cmd, quiet=True)
                if r.returncode:
                    raise SystemExit(f"mlx-vlm convert failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
                (vdst / "bench_source.json").write_text(stamp)
            folders[f"vlm-{kind}"] = vdst
    log(f"{preset}: checkpoints ready in {time.perf_counter() - t:.1f}s "
        f"({bench_models.parameter_count(preset) / 1e6:.1f}M parameters)")
    return folders


def _fresh(folder: Path, stamp: str) -> bool:
    f = folder / "bench_source.json"
    return f.exists() and f.read_text() == stamp and (folder / "config.json").exists()


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------
def plan_for(preset: str, precision: str, args) -> dict[str, Any]:
    if args.quick:
        base = dict(QUICK_PLAN)
    else:
        plans = PLANS.get(preset) or PLANS["medium"]
        base = json.loads(json.dumps(plans["4bit" if precision == "4bit" else "unquantized"]))
    if args.repeats:
        base["repeats"] = args.repeats
    plan = dict(base, preset=preset, precision=precision, steps=8)
    plan["ours_topk_self_conditioning"] = None if args.no_ours_variants else 64
    plan["breakdown_cache_length"] = plan["cache_lengths"][0] if plan["cache_lengths"] else None
    if not plan.get("e2e"):
        plan["e2e"] = None
    return plan


def run_worker(kind: str, python: str, model: Path, plan: dict[str, Any], raw_dir: Path, commands: list[str],
               timeout: float) -> dict[str, Any]:
    name = f"{plan['preset']}-{plan['precision']}-{kind}"
    plan_path = raw_dir / f"{name}.plan.json"
    out_path = raw_dir / f"{name}.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    script = HERE / {"ours": "bench_worker_ours.py", "mlx-vlm": "bench_worker_vlm.py",
                     "transformers": "bench_worker_hf.py"}[kind]
    cmd = [python, str(script), "--model", str(model), "--plan", str(plan_path), "--out", str(out_path)]
    commands.append(shlex.join(cmd))
    if out_path.exists():
        out_path.unlink()
    t = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    try:
        r = subprocess.run(cmd, timeout=timeout, env=env)
        rc = r.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t
    if out_path.exists():
        res = json.loads(out_path.read_text())
    else:
        res = {"port": kind, "plan": plan, "failed": f"worker exit status {rc}"}
    res["worker_wall_s"] = wall
    res["worker_command"] = shlex.join(cmd)
    log(f"{name}: done in {wall:.0f}s" + ("" if rc == 0 else f" (exit {rc})"))
    return res


def calibrate() -> dict[str, Any]:
    """MLX CPU/GPU throughput of the kernels that dominate a step, on this machine."""
    import mlx.core as mx

    def gflops(fn, flop, n=5):
        fn()
        best = float("inf")
        for _ in range(n):  # best of n: the kernel's rate, not the machine's other load
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return flop / best / 1e9

    m, k, n_out, e = 64, 512, 512, 16
    x = mx.random.normal((m, k))
    w = mx.random.normal((n_out, k)) * 0.05
    out: dict[str, Any] = {"shape": f"[{m}, {k}] x [{k}, {n_out}]", "device": str(mx.default_device())}
    for name, dt in (("matmul_float32", mx.float32), ("matmul_bfloat16", mx.bfloat16)):
        xa, wa = x.astype(dt), w.astype(dt)
        mx.eval(xa, wa)
        out[name] = gflops(lambda: mx.eval(xa @ wa.T), 2 * m * k * n_out)
    xb = x.astype(mx.bfloat16)
    for bits in (8, 4):
        wq, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=bits)
        mx.eval(xb, wq, s, b)
        out[f"quantized_matmul_{bits}bit"] = gflops(
            lambda: mx.eval(mx.quantized_matmul(xb, wq, s, b, transpose=True, group_size=64, bits=bits)), 2 * m * k * n_out)
    # Experts: m (token, expert) pairs, one [1, k] x [k, n_out] product each, as in a MoE layer.
    we = mx.random.normal((e, n_out, k)) * 0.05
    idx = mx.sort(mx.random.randint(0, e, (m,))).astype(mx.uint32)
    xe = x[:, None, :]
    mx.eval(we, idx, xe)
    out["gather_mm_float32"] = gflops(
        lambda: mx.eval(mx.gather_mm(xe, we.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True)), 2 * m * k * n_out)
    wq, s, b = mx.quantize(we.astype(mx.bfloat16), group_size=64, bits=4)
    xeb = xe.astype(mx.bfloat16)
    mx.eval(wq, s, b, xeb)
    out["gather_qmm_4bit"] = gflops(lambda: mx.eval(mx.gather_qmm(xeb, wq, s, b, rhs_indices=idx, transpose=True,
                                                                 group_size=64, bits=4, sorted_indices=True)),
                                    2 * m * k * n_out)
    try:  # the same product on PyTorch's CPU kernels, one thread (as MLX's CPU backend uses here)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        a = torch.randn(m, k)
        bb = torch.randn(k, n_out)
        out["torch_matmul_float32_1thread"] = gflops(lambda: a @ bb, 2 * m * k * n_out, n=20)
        torch.set_num_threads(threads)
    except Exception:
        pass
    return out


def accounting(presets: list[str]) -> dict[str, Any]:
    from mlx_diffusiongemma.perf.accounting import format_table, step_work
    from mlx_diffusiongemma.model.args import parse_model_args

    rows, data = [], {}
    for preset in presets:
        a = parse_model_args(bench_models.model_config(preset)).text
        c = bench_models.PRESETS[preset]["canvas"]
        for n in ACCOUNTING_CACHES:
            w = step_work(a, c, n)
            rows.append((preset, n, w))
            data[f"{preset}@{n}"] = w
        if preset == "26b-shape":
            w = step_work(a, c, 8192, top_k_self_conditioning=64)
            rows.append((preset + " (top-64 self-cond)", 8192, w))
            data[f"{preset}@8192/topk64"] = w
    return {"table": format_table(rows), "rows": data}


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _med(s: dict | None, scale: float = 1.0) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['median'] * scale:.4g}"


def _med_spread(s: dict | None, scale: float = 1e3) -> str:
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{s['median'] * scale:.4g}"
    return f"{s['median'] * scale:.4g} [{s['min'] * scale:.3g}-{s['max'] * scale:.3g}]"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _get(res: dict | None, *path):
    cur = res
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def render_markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    L: list[str] = []
    m = results["machine"]
    L.append(f"Machine: {m.get('platform')}, {m.get('cpu_model') or m.get('processor') or m.get('machine')}, "
             f"{m.get('cpu_count')} CPUs, MLX device {m.get('mlx_device')}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m.get('load_average_at_start', []))}. Run took "
             f"{results.get('wall_s', 0) / 60:.1f} min.")
    v, vv = results["versions"]["main"], results["versions"].get("mlx-vlm env", {})
    L.append("")
    L.append(f"Versions: ours mlx-diffusiongemma {v.get('mlx-diffusiongemma')} (mlx {v.get('mlx')}, mlx-lm "
             f"{v.get('mlx-lm')}); mlx-vlm {vv.get('mlx-vlm')} (mlx {vv.get('mlx')}, transformers "
             f"{vv.get('transformers')}); reference transformers {v.get('transformers')} on torch {v.get('torch')} (CPU, float32).")
    cal = results.get("calibration") or {}
    if cal:
        L.append("")
        L.append(f"MLX kernel throughput on this machine ({cal.get('shape')}, GFLOP/s): "
                 + ", ".join(f"{k} {cal[k]:.3g}" for k in cal if isinstance(cal[k], float)) + ".")
    L.append("")
    L.append("Presets (random weights, Hugging Face layout; `scripts/bench_models.py`):")
    L.append("")
    L.append("| preset | params | vocab | hidden | layers | heads | sliding kv | full kv (K=V) | dense MLP | experts | expert MLP | window | canvas |")
    L.append("|" + "---|" * 13)
    for name in results["presets"] + ["26b-shape"]:
        p = bench_models.PRESETS[name]
        L.append(f"| {name} | {bench_models.parameter_count(name) / 1e6:.1f}M | {p['vocab']} | {p['hidden']} | {p['layers']} "
                 f"| {p['heads']} | {p['kv_heads']}x{p['head_dim']} | {p['global_kv_heads']}x{p['global_head_dim']} "
                 f"| {p['dense']} | {p['experts']} top-{p['top_k']} | {p['expert_dim']} | {p['window']} | {p['canvas']} |")

    def both(preset, precision):
        return runs.get(f"{preset}-{precision}-ours"), runs.get(f"{preset}-{precision}-mlx-vlm")

    # decoder step
    L.append("")
    L.append("### Decoder step (one denoising step, ms: median [min-max])")
    L.append("")
    L.append("Forward = `model.denoise` (ours) / `diffusion_self_conditioning` + `diffusion_decoder_logits` "
             "(mlx-vlm), self-conditioned, at a cache of the given length; sampler = the rest of one step of "
             "each loop (temperature, draw, entropy-bound accept, renoise, stop test and its host read). "
             "Speed-up = mlx-vlm time / ours (> 1: ours faster).")
    L.append("")
    L.append("FLOPs / rate = the step's matmul FLOPs (`accounting.step_work`) divided by the calibrated rate "
             "of the kernel that runs them at this precision (quantized_matmul for 4-bit weights; float32 / "
             "bfloat16 matmul otherwise; attention products at the activation dtype's rate).")
    L.append("")
    L.append("| preset | precision | cache | ours forward | mlx-vlm forward | speed-up | FLOPs / rate | ours sampler | mlx-vlm sampler | reference (torch f32, 1 thread) forward |")
    L.append("|" + "---|" * 10)
    for preset in results["presets"]:
        for precision in results["precisions"]:
            ours, vlm = both(preset, precision)
            if ours is None and vlm is None:
                continue
            ref = runs.get(f"{preset}-f32-transformers") if precision == "f32" else None
            lengths = sorted({int(k) for r in (ours, vlm) if r for k in (r.get("forward") or {})})
            for n in lengths:
                fo, fv = _get(ours, "forward", str(n)), _get(vlm, "forward", str(n))
                vlm_cell = _med_spread(fv) if fv else ("n/a (unsupported on CPU)" if vlm and vlm.get("unsupported") else "-")
                floor = compute_floor_ms(preset, precision, n, results.get("calibration") or {})
                L.append(f"| {preset} | {precision} | {n} | {_med_spread(fo)} | {vlm_cell} "
                         f"| {_ratio(_get(fv, 'median'), _get(fo, 'median'))} | {_fmt(floor)} "
                         f"| {_med_spread(_get(ours, 'sampler'))} | {_med_spread(_get(vlm, 'sampler'))} "
                         f"| {_med_spread(_get(ref, 'forward', str(n)))} |")

    # end to end
    L.append("")
    L.append("### End to end (tokens/s after prefill: median over runs; steps per block)")
    L.append("")
    L.append("Fixed: the stop test can never fire (confidence threshold -1), every block runs the cap. "
             "Adaptive: the checkpoint's stop (stability 1, confidence 0.005). EOS disabled on both ports so "
             "every run commits the same tokens. Ratio = ours / mlx-vlm.")
    L.append("")
    L.append("| preset | precision | mode | blocks x steps cap | ours tok/s | mlx-vlm tok/s | ratio | ours steps/block | mlx-vlm steps/block | ours peak GB | mlx-vlm peak GB | reference tok/s (incl. prefill) |")
    L.append("|" + "---|" * 12)
    for preset in results["presets"]:
        for precision in results["precisions"]:
            ours, vlm = both(preset, precision)
            ref = runs.get(f"{preset}-f32-transformers") if precision == "f32" else None
            for mode in ("fixed", "adaptive"):
                eo, ev = _get(ours, "e2e", mode), _get(vlm, "e2e", mode)
                if not eo and not ev:
                    continue
                plan = (ours or vlm)["plan"]["e2e"]
                spb_o = _get(eo, "steps_per_block")
                spb_v = _get(ev, "steps_per_block")
                L.append(f"| {preset} | {precision} | {mode} | {plan['blocks']} x {plan['steps']} "
                         f"| {_med(_get(eo, 'generation_tps'))} | {_med(_get(ev, 'generation_tps'))} "
                         f"| {_ratio(_get(eo, 'generation_tps', 'median'), _get(ev, 'generation_tps', 'median'))} "
                         f"| {spb_o[-1] if spb_o else '-'} | {spb_v[-1] if spb_v else '-'} "
                         f"| {_fmt(_get(eo, 'peak_memory_gb'))} | {_fmt(_get(ev, 'peak_memory_gb'))} "
                         f"| {_med(_get(ref, 'e2e', mode, 'tokens_per_s_incl_prefill'))} |")

    # our optional fast paths
    rows = []
    for preset in results["presets"]:
        for precision in results["precisions"]:
            ours = runs.get(f"{preset}-{precision}-ours")
            tk = _get(ours, "forward_topk_self_conditioning")
            if not tk:
                continue
            exact = _get(ours, "forward", str(tk["cache_length"]))
            lean, fixed = _get(ours, "e2e", "fixed-lean"), _get(ours, "e2e", "fixed")
            rows.append(f"| {preset} | {precision} | {tk['cache_length']} | {_med(exact, 1e3)} | {_med(tk['forward'], 1e3)} "
                        f"| {_ratio(_get(exact, 'median'), _get(tk, 'forward', 'median'))} "
                        f"| {_med(_get(fixed, 'generation_tps'))} | {_med(_get(lean, 'generation_tps'))} "
                        f"| {_ratio(_get(lean, 'generation_tps', 'median'), _get(fixed, 'generation_tps', 'median'))} |")
    if rows:
        L.append("")
        L.append("### Ours with its optional fast paths (not the reference algorithm bit for bit)")
        L.append("")
        L.append("Top-64 self-conditioning (`self_conditioning_top_k=64`: the 64 most probable tokens' rows "
                 "instead of softmax @ E over the vocabulary) and the stop read every 4 steps "
                 "(`stop_check_interval=4`: same tokens, a quarter of the host synchronisations).")
        L.append("")
        L.append("| preset | precision | cache | forward ms (exact) | forward ms (top-64) | speed-up | e2e tok/s fixed | e2e tok/s fixed, top-64 + stop every 4 | speed-up |")
        L.append("|" + "---|" * 9)
        L.extend(rows)

    # prefill
    L.append("")
    L.append("### Prefill (tokens/s, median; peak GB)")
    L.append("")
    L.append("Ours: `model.prefill` (chunks of 512). mlx-vlm: `diffusion_prefill_cache` with its default "
             "prefill step 2048.")
    L.append("")
    L.append("| preset | precision | prompt | ours tok/s | mlx-vlm tok/s | ratio | ours peak GB | mlx-vlm peak GB |")
    L.append("|" + "---|" * 8)
    for preset in results["presets"]:
        for precision in results["precisions"]:
            ours, vlm = both(preset, precision)
            lengths = sorted({int(k) for r in (ours, vlm) if r for k in (r.get("prefill") or {})})
            for n in lengths:
                po, pv = _get(ours, "prefill", str(n)), _get(vlm, "prefill", str(n))
                L.append(f"| {preset} | {precision} | {n} | {_fmt(_get(po, 'tokens_per_s'))} "
                         f"| {_fmt(_get(pv, 'tokens_per_s'))} "
                         f"| {_ratio(_get(po, 'tokens_per_s'), _get(pv, 'tokens_per_s'))} "
                         f"| {_fmt(_get(po, 'peak_memory_gb'))} | {_fmt(_get(pv, 'peak_memory_gb'))} |")

    # breakdown
    L.append("")
    L.append("### Where a decoder step's time goes")
    L.append("")
    L.append("At the smallest cache length: forward as measured; forward with the routed experts stubbed out "
             "(returning zeros); the experts alone (every layer, canvas-shaped input, real routing); and a "
             "synchronous per-op profile of one forward (`bench_common.profile_ops`: quantized_matmul = every "
             "quantized dense layer, the LM head and the quantized self-conditioning product; gather_qmm / "
             "gather_mm = routed experts; rest = dense bf16/f32 matmuls, attention, norms, everything else).")
    L.append("")
    L.append("| preset | precision | port | forward ms | without experts ms | experts alone ms | profile: total | quantized_matmul | gather_qmm | gather_mm | rest |")
    L.append("|" + "---|" * 11)
    for preset in results["presets"]:
        for precision in results["precisions"]:
            for port in ("ours", "mlx-vlm"):
                r = runs.get(f"{preset}-{precision}-{port}")
                b = _get(r, "breakdown")
                if not b:
                    continue
                prof = (b.get("op_profile") or [None])[-1] or {}
                ops = prof.get("ops", {})

                def ms(x):
                    return f"{x * 1e3:.4g}" if x is not None else "-"

                def share(name):
                    s = _get(ops, name, "s")
                    if not s:
                        return "-"
                    return f"{s * 1e3:.4g} ({s / prof['total_s']:.0%})"

                L.append(f"| {preset} | {precision} | {port} | {_med(b.get('forward'), 1e3)} "
                         f"| {_med(b.get('forward_without_experts'), 1e3)} | {_med(b.get('experts_only'), 1e3)} "
                         f"| {ms(prof.get('total_s'))} | {share('quantized_matmul')} | {share('gather_qmm')} "
                         f"| {share('gather_mm')} | {ms(prof.get('rest_s'))} |")

    # accounting
    L.append("")
    L.append("### Work per denoising step (hardware-independent; `mlx_diffusiongemma.accounting.step_work`)")
    L.append("")
    L.append("FLOPs at 2 per multiply-add; the sampler counted as ~12 element-wise operations per logit; "
             "KV copied = cached prefix K/V bytes a step copies (ours 0: the decoder reads the cache in place; "
             "a port that concatenates prefix and canvas K/V in every layer copies the visible prefix); weights "
             "read = every matrix once, the embedding twice (LM head and softmax @ E), and at most "
             "min(experts, canvas x top-k) distinct experts per layer.")
    L.append("")
    L.append(results["accounting"]["table"])
    L.append("")
    from mlx_diffusiongemma.perf.accounting import HOST_SYNCS_PER_STEP

    L.append("Host synchronisations per step: " + "; ".join(f"{k}: {v}" for k, v in HOST_SYNCS_PER_STEP.items()) + ".")
    errors = [(k, r.get("failed") or r.get("unsupported") or r.get("errors")) for k, r in runs.items()
              if r.get("failed") or r.get("unsupported") or r.get("errors")]
    if errors:
        L.append("")
        L.append("Not measured / errors: " + "; ".join(f"{k}: {str(e)[:200]}" for k, e in errors) + ".")
    L.append("")
    L.append("Commands (in order):")
    L.append("")
    L.append("```")
    L.extend(results["commands"])
    L.append("```")
    return "\n".join(L) + "\n"


def compute_floor_ms(preset: str, precision: str, cache_len: int, cal: dict[str, Any]) -> float | None:
    """Matmul FLOPs of one decoder pass / the calibrated rate of the kernel that runs them (ms)."""
    from mlx_diffusiongemma.perf.accounting import step_work
    from mlx_diffusiongemma.model.args import parse_model_args

    if not cal or preset not in bench_models.PRESETS:
        return None
    a = parse_model_args(bench_models.model_config(preset)).text
    f = step_work(a, bench_models.PRESETS[preset]["canvas"], cache_len)["flops"]
    attention = f["attention_scores_values"]
    weights = f["decoder_total"] - attention
    if precision == "4bit":
        w_rate, a_rate = cal.get("quantized_matmul_4bit"), cal.get("matmul_bfloat16")
    elif precision == "bf16":
        w_rate = a_rate = cal.get("matmul_bfloat16")
    else:
        w_rate = a_rate = cal.get("matmul_float32")
    if not w_rate or not a_rate:
        return None
    return (weights / w_rate + attention / a_rate) / 1e6


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def update_docs(markdown: str, path: Path) -> None:
    text = path.read_text() if path.exists() else f"# Performance\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
    if DOCS_BEGIN not in text or DOCS_END not in text:
        text = text.rstrip() + f"\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
    start = text.index(DOCS_BEGIN) + len(DOCS_BEGIN)
    end = text.index(DOCS_END)
    path.write_text(text[:start] + "\n" + markdown + text[end:])


def draw_chart(results_path: Path, png: Path, vlm_python: str | None, args, commands: list[str]) -> str:
    candidates = [sys.executable] + ([vlm_python] if vlm_python else [])
    chart_py = None
    for py in candidates:
        r = subprocess.run([py, "-c", "import matplotlib"], capture_output=True)
        if r.returncode == 0:
            chart_py = py
            break
    if chart_py is None and vlm_python and not args.no_install:
        cmd = [vlm_python, "-m", "pip", "install", "--quiet", "matplotlib"]
        commands.append(shlex.join(cmd))
        if _run(cmd).returncode == 0:
            chart_py = vlm_python
    if chart_py is None:
        return "chart skipped: no python with matplotlib (install it, or drop --no-install)"
    cmd = [chart_py, str(HERE / "bench_chart.py"), str(results_path), str(png)]
    commands.append(shlex.join(cmd))
    r = _run(cmd, quiet=True)
    if r.returncode:
        return f"chart failed: {r.stderr.strip()[-500:]}"
    return f"chart: {png}"


# ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small,medium",
                    help=f"comma-separated, from {', '.join(bench_models.PRESETS)} (26b-shape: accounting only)")
    ap.add_argument("--precisions", default="bf16,f32,4bit", help="comma-separated, from bf16, f32, 4bit")
    ap.add_argument("--out", default="bench-results", help="output folder (models are cached under OUT/models)")
    ap.add_argument("--vlm-python", help="python of an existing environment with mlx-vlm 0.7.10 (else OUT/.vlm-venv is made)")
    ap.add_argument("--vlm-venv", help="where to create mlx-vlm's environment (default OUT/.vlm-venv)")
    ap.add_argument("--no-vlm", action="store_true", help="do not run mlx-vlm")
    ap.add_argument("--reference-presets", default="tiny,small",
                    help="presets on which the transformers reference is also timed ('' for none)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="PyTorch threads for the reference (default 1: MLX's CPU backend computes on one thread)")
    ap.add_argument("--no-ours-variants", action="store_true",
                    help="skip our optional fast paths (top-64 self-conditioning, stop read every 4 steps)")
    ap.add_argument("--quick", action="store_true", help="a short smoke plan for every preset (development)")
    ap.add_argument("--repeats", type=int, help="override the timed repeats of every plan")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    ap.add_argument("--no-install", action="store_true", help="never pip-install (mlx-vlm env, matplotlib)")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--demo"]:  # end-to-end rows on the trained demo model (exact vs fast mode)
        import bench_demo

        return bench_demo.main(argv[1:])
    args = parse_args(argv)
    t_start = time.perf_counter()
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in bench_models.PRESETS:
            raise SystemExit(f"unknown preset {p!r}; choose from {', '.join(bench_models.PRESETS)}")
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        if p not in PRECISIONS:
            raise SystemExit(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    timed = [p for p in presets if p != "26b-shape"]
    out = Path(args.out)
    raw_dir = out / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    argv_shown = sys.argv[1:] if argv is None else list(argv)
    commands = ["python scripts/bench.py " + shlex.join(argv_shown)]

    results: dict[str, Any] = {"machine": machine_info(), "versions": {"main": main_versions()},
                               "presets": timed, "precisions": precisions, "runs": {}}
    log(f"machine: {results['machine']}")
    vlm_python = None if args.no_vlm or not timed else ensure_vlm_python(args, commands)
    if vlm_python:
        results["versions"]["mlx-vlm env"] = vlm_versions(vlm_python)
        results["vlm_python"] = vlm_python
    log(f"versions: {results['versions']}")

    acc = accounting(presets + ([] if "26b-shape" in presets else ["26b-shape"]))
    results["accounting"] = acc
    print("\nWork per denoising step (hardware-independent):\n" + acc["table"] + "\n", flush=True)

    if timed:
        results["calibration"] = calibrate()
        log(f"calibration (GFLOP/s): {results['calibration']}")
    ref_presets = {p for p in args.reference_presets.split(",") if p}
    for preset in timed:
        folders = prepare_models(preset, out / "models", vlm_python, precisions, commands)
        for precision in precisions:
            plan = plan_for(preset, precision, args)
            kind = "4bit" if precision == "4bit" else "bf16"
            results["runs"][f"{preset}-{precision}-ours"] = run_worker(
                "ours", sys.executable, folders[f"ours-{kind}"], plan, raw_dir, commands, args.timeout)
            if vlm_python:
                results["runs"][f"{preset}-{precision}-mlx-vlm"] = run_worker(
                    "mlx-vlm", vlm_python, folders[f"vlm-{kind}"], plan, raw_dir, commands, args.timeout)
            if precision == "f32" and preset in ref_presets:
                ref_plan = dict(plan, cache_lengths=[n for n in plan["cache_lengths"] if n <= 2048],
                                torch_threads=args.torch_threads)
                results["runs"][f"{preset}-f32-transformers"] = run_worker(
                    "transformers", sys.executable, folders["hf"], ref_plan, raw_dir, commands, args.timeout)
            # Write as we go, so an interrupted run keeps what it measured.
            results["wall_s"] = time.perf_counter() - t_start
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    results["commands"] = commands
    results["wall_s"] = time.perf_counter() - t_start
    results_path = out / "results.json"
    results_path.write_text(json.dumps(results, indent=1, default=str))
    if timed and not args.no_chart:
        msg = draw_chart(results_path, out / "decoder_step.png", vlm_python, args, commands)
        log(msg)
    results["commands"] = commands
    md_text = render_markdown(results)
    (out / "results.md").write_text(md_text)
    results_path.write_text(json.dumps(results, indent=1, default=str))
    if args.update_docs:
        update_docs(md_text, ROOT / "docs" / "performance.md")
        log("docs/performance.md updated")
    log(f"wrote {results_path}, {out / 'results.md'} in {(time.perf_counter() - t_start) / 60:.1f} min")
    print("\n" + md_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
