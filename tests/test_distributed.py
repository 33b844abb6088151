"""The model split over 2 and 3 processes on loopback (`mlx.launch --backend ring`) equals the
single-process model: denoise logits to float32 tolerance, generated tokens exactly under a seed.
A rank that dies, a rank that hangs and a host that never answers end with a clear error on
rank 0 within a time bound, and leave no output file behind."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import build_reference, save_checkpoint, tiny_text_config
from mlx_diffusiongemma.checkpoint.config import load_generation_defaults
from mlx_diffusiongemma.diffusion.engine import Request, run
from mlx_diffusiongemma.diffusion.options import FastOptions, SamplerOptions
from mlx_diffusiongemma.checkpoint.loading import load_model
from mlx_diffusiongemma.checkpoint.safetensors import SafetensorsSlicer
from mlx_diffusiongemma.parallel.group import share
from mlx_diffusiongemma.parallel.plan import DistributedError, expert_ranges, plan_shards, slice_of

WORKER = Path(__file__).with_name("dist_worker.py")
QUANTIZED = Path(__file__).parent / "fixtures" / "mlxvlm_tiny" / "mlxvlm-4bit"  # 4 experts, 4-bit
INPUTS = dict(prompt=[2, 5, 17, 30, 44, 9, 60], canvas=list(range(3, 19)), seed=3, max_tokens=32, steps=5)
LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # what the mlx.launch script runs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    configs = {
        # 5 experts: uneven over 2 ranks (3/2); two global KV heads so attention splits over 2.
        "e5": tiny_text_config(num_experts=5, num_global_key_value_heads=2),
        # 6 experts: even over 3 ranks; 6/3/3 heads and a 96-wide MLP so attention and MLP split over 3.
        "e6": tiny_text_config(num_experts=6, num_attention_heads=6, num_key_value_heads=3,
                               num_global_key_value_heads=3, intermediate_size=96),
        # 4 experts: uneven over 3 ranks (2/1/1).
        "e4": tiny_text_config(num_experts=4),
    }
    return {name: save_checkpoint(build_reference(cfg, canvas_length=16, vision=False), root / name)
            for name, cfg in configs.items()} | {"q4": QUANTIZED}


def _free_port(span: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span < 65535 and all(_port_free(base + i) for i in range(1, span)):
            return base
    raise RuntimeError("no free loopback ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _launch(n: int, jobs: list[dict], out: Path, *extra: str, limit: float = 900):
    cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(n), "--starting-port", str(_free_port(n)),
           "--", sys.executable, str(WORKER), "--jobs", json.dumps(jobs), "--inputs", json.dumps(INPUTS),
           "--out", str(out), *extra]
    t0 = time.monotonic()
    for _ in range(3):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL)
        # MLX's ring gives up connecting after a fixed number of tries; on a starved machine a rank
        # can still be importing then. That is the launch failing, not the code under test: retry.
        if "Couldn't connect" not in proc.stderr:
            break
    return proc, time.monotonic() - t0


def _single(folder: Path):
    """The single-process results the ranks must reproduce."""
    model, config = load_model(Path(folder), dtype=mx.float32)
    model.generation = load_generation_defaults(Path(folder), config)
    cache = model.prefill(INPUTS["prompt"])
    canvas = mx.array(INPUTS["canvas"], dtype=mx.int32)[None]
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, first / 0.7)
    req = Request(INPUTS["prompt"], max_tokens=INPUTS["max_tokens"], seed=INPUTS["seed"],
                  sampler=SamplerOptions(max_denoising_steps=INPUTS["steps"]))
    result = list(run(model, req))[-1]
    experts = sum(v.nbytes for k, v in _flat(model) if ".experts." in k)
    fast = Request(INPUTS["prompt"], max_tokens=INPUTS["max_tokens"], seed=INPUTS["seed"],
                   sampler=SamplerOptions(max_denoising_steps=INPUTS["steps"]), fast=FastOptions())
    fast_tokens = list(run(model, fast))[-1].tokens
    return np.array(first), np.array(second), result, experts, model.text.num_experts, fast_tokens


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


@pytest.mark.parametrize("n, jobs", [
    (2, [("e5", ["attention", "mlp"]), ("q4", [])]),  # uneven experts + TP; even, 4-bit
    (3, [("e6", ["attention", "mlp"]), ("e4", [])]),  # even experts + TP; uneven
])
def test_sharded_equals_single_process(checkpoints, tmp_path, n, jobs):
    out = tmp_path / "results.npz"
    # A generous per-step bound: a busy CI machine may starve a rank for many seconds.
    proc, _ = _launch(n, [{"name": name, "folder": str(checkpoints[name]), "tp": tp} for name, tp in jobs], out,
                      "--timeout", "300")
    assert out.exists(), f"the ranks failed:\n{proc.stdout}\n{proc.stderr}"
    got = np.load(out)
    for name, _ in jobs:
        first, second, result, expert_bytes, num_experts, fast_tokens = _single(checkpoints[name])
        np.testing.assert_allclose(got[f"{name}/first"], first, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"{name}/second"], second, rtol=1e-5, atol=1e-5)
        assert got[f"{name}/tokens"].tolist() == result.tokens
        assert got[f"{name}/steps"].tolist() == result.steps_per_block
        if f"{name}/fast_tokens" in got:
            assert got[f"{name}/fast_tokens"].tolist() == fast_tokens
        # One host synchronisation per step on each rank, as in the single process.
        assert got[f"{name}/syncs"].tolist() == [sum(result.steps_per_block)]
        # Each rank holds exactly its experts' share of the expert bytes.
        per_rank = got[f"{name}/per_rank"]
        counts = [stop - start for start, stop in expert_ranges(num_experts, n)]
        assert per_rank[:, 0].tolist() == [expert_bytes * c / num_experts for c in counts]


def test_dead_rank_ends_with_a_clear_error(checkpoints, tmp_path):
    out = tmp_path / "results.npz"
    proc, seconds = _launch(2, [{"name": "e4", "folder": str(checkpoints["e4"]), "tp": []}], out,
                            "--fail", "load", "--timeout", "120")
    assert "error: rank 0: lost another rank of the group" in proc.stderr, proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))
    print(f"\ndead rank reported on rank 0 after {seconds:.1f} s (launch included)")


def test_stuck_rank_ends_within_the_bound(checkpoints, tmp_path):
    out = tmp_path / "results.npz"
    proc, seconds = _launch(2, [{"name": "e4", "folder": str(checkpoints["e4"]), "tp": []}], out,
                            "--fail", "hang", "--timeout", "4")
    # Rank 0 normally reports it; on a loaded machine the hanging rank can reach a collective 4 s
    # before rank 0 does and report first (seen once in CI): either way one line names the bound.
    assert re.search(r"error: rank [01]: no answer from the other ranks within 4 s", proc.stderr), proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))
    print(f"\nstuck rank: stopped after {seconds:.1f} s (launch and load included)")


def test_unreachable_host_ends_within_the_bound(tmp_path):
    """Rank 0 of a 2-host ring whose other host never comes up: a bounded wait, then an error."""
    port = _free_port(2)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = dict(os.environ, MLX_HOSTFILE=str(hosts), MLX_RANK="0")
    out = tmp_path / "results.npz"
    proc = subprocess.run([sys.executable, str(WORKER), "--jobs", "[]", "--inputs", json.dumps(INPUTS),
                           "--out", str(out), "--timeout", "3"], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "the distributed group did not form within 3 s" in proc.stderr, proc.stderr
    assert not out.exists()


# -- the plan and the slices, in one process ----------------------------------------------------


def test_expert_ranges_cover_every_expert_once():
    assert expert_ranges(128, 2) == [(0, 64), (64, 128)]
    assert expert_ranges(128, 3) == [(0, 43), (43, 86), (86, 128)]
    assert expert_ranges(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(DistributedError, match="cannot be split"):
        expert_ranges(2, 3)


def test_plan_refuses_splits_that_do_not_divide():
    from mlx_diffusiongemma.model.args import parse_model_args

    config = {"model_type": "diffusion_gemma", "text_config": tiny_text_config(num_experts=4)}
    args = parse_model_args(config)
    plan_shards(args, 0, 2)  # experts only: fine
    with pytest.raises(DistributedError, match="attention cannot be split over 2 ranks: layer 2"):
        plan_shards(args, 0, 2, ["attention"])  # full layers have one KV head
    with pytest.raises(DistributedError, match="dense MLP"):
        plan_shards(args, 0, 3, ["mlp"])  # 128 does not divide by 3
    with pytest.raises(DistributedError, match="unknown tensor-parallel"):
        plan_shards(args, 0, 2, ["vision"])
    plan = plan_shards(args, 1, 2, ["mlp"])
    assert slice_of("model.decoder.layers.0.experts.down_proj.weight", (4, 64, 64), plan) == (0, 2, 4)
    assert slice_of("model.decoder.layers.0.mlp.up_proj.weight", (128, 64), plan) == (0, 64, 128)
    assert slice_of("model.decoder.layers.0.mlp.down_proj.scales", (64, 2), plan) == (1, 1, 2)
    assert slice_of("model.decoder.layers.0.self_attn.q_proj.weight", (64, 64), plan) is None
    assert slice_of("model.decoder.self_conditioning.up_proj.weight", (128, 64), plan) is None


def test_slices_read_from_disk_equal_slices_of_the_loaded_tensor(tmp_path):
    data = {"a": mx.random.normal((5, 6, 8)).astype(mx.bfloat16), "b": mx.arange(24, dtype=mx.uint32).reshape(4, 6)}
    path = tmp_path / "t.safetensors"
    mx.save_safetensors(str(path), data)
    s = SafetensorsSlicer(path)
    assert s.read("a").dtype == mx.bfloat16
    assert mx.array_equal(s.read("a"), data["a"])
    assert mx.array_equal(s.read("a", (0, 3, 5)), data["a"][3:5])
    assert mx.array_equal(s.read("a", (2, 4, 8)), data["a"][:, :, 4:8])
    assert mx.array_equal(s.read("b", (1, 0, 3)), data["b"][:, :3])


def test_share_is_the_identity_in_one_process():
    assert share({"ids": [1, 2]}, mx.distributed.init()) == {"ids": [1, 2]}


def test_cli_generate_under_mlx_launch_equals_one_process(checkpoints, tmp_path):
    """`mlx.launch -- dgemma generate --json`: rank 0 prints the single process's reply, the other
    rank prints nothing."""
    args = ["-m", "mlx_diffusiongemma.cli.app", "generate", "--model", str(checkpoints["e5"]), "--prompt",
            "hello there", "--seed", "5", "--max-tokens", "24", "--steps", "4", "--json"]
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240,
                            stdin=subprocess.DEVNULL)
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(_free_port(2)),
           "--", sys.executable, *args, "--tensor-parallel", "attention,mlp"]
    for _ in range(3):  # see _launch
        split = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if "Couldn't connect" not in split.stderr:
            break
    lines = [line for line in split.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, split.stdout + split.stderr  # one JSON object: rank 0's
    one, two = json.loads(single.stdout), json.loads(lines[0])
    assert two["ranks"] == 2
    assert two["token_ids"] == one["token_ids"] and two["text"] == one["text"]
    assert two["steps_per_block"] == one["steps_per_block"]
