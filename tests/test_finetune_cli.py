"""`dgemma finetune`, `dgemma fuse` and `--adapter-path` through typer's CliRunner (piped mode), on
the random demo checkpoint (`demo-random`) with a CI-sized task: the validation loss falls, adapters land in mlx-lm's
layout and change generation, Ctrl-C saves, bad input is one error line."""

from __future__ import annotations

import json
import random
import re

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from conftest import error_line, invoke
from mlx_diffusiongemma.train import finetune as F

WORDS = ["cat", "dog", "sun", "map", "red", "blue", "tree", "fish", "bird", "moon", "star", "leaf"]
FAST = ["--batch-size", "2", "--learning-rate", "2e-3", "--val-batches", "2", "--seed", "0"]


def write_task(folder, n_train=24, n_valid=4):
    """A tiny new task: write the words in capitals."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)

    def row(i):
        words = " ".join(rng.sample(WORDS, 2))
        if i % 3 == 0:
            return {"messages": [{"role": "user", "content": f"Uppercase: {words}"},
                                 {"role": "assistant", "content": words.upper()}]}
        return {"prompt": f"Uppercase: {words}", "completion": words.upper()}

    (folder / "train.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(n_train)))
    (folder / "valid.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(n_valid)))
    return folder


@pytest.fixture(scope="module")
def trained(home, tmp_path_factory):
    """One CI-sized LoRA run shared by the tests below: (result, data folder, adapter folder)."""
    import os

    tmp = tmp_path_factory.mktemp("finetune")
    data = write_task(tmp / "data")
    adapters = tmp / "adapters"
    old = os.environ.get("MLX_DIFFUSIONGEMMA_HOME")
    os.environ["MLX_DIFFUSIONGEMMA_HOME"] = str(home)
    try:
        result = invoke(CliRunner(), ["finetune", "--model", "demo-random", "--data", str(data), "--iters", "16",
                                      "--steps-per-eval", "16", "--save-every", "8", "--steps-per-report", "4",
                                      "--adapter-path", str(adapters), *FAST])
    finally:
        if old is None:
            os.environ.pop("MLX_DIFFUSIONGEMMA_HOME")
        else:
            os.environ["MLX_DIFFUSIONGEMMA_HOME"] = old
    return result, data, adapters


def test_lora_run_lowers_the_loss_and_writes_mlx_lm_adapters(trained):
    result, _, adapters = trained
    assert result.exit_code == 0, result.output
    log = result.stderr
    before = float(re.search(r"Iter 0: Val loss ([\d.]+)", log).group(1))
    after = float(re.search(r"Iter 16: Train loss [\d.]+, Val loss ([\d.]+)", log).group(1))
    assert after < 0.8 * before, log
    for key in ("It/sec", "Tokens/sec", "Peak mem", "Learning Rate"):
        assert key in log
    assert "adapters saved to" in result.stdout
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 4
    assert config["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    weights = mx.load(str(adapters / "adapters.safetensors"))
    assert weights and all(k.endswith(("lora_a", "lora_b")) for k in weights)
    assert (adapters / "0000008_adapters.safetensors").is_file()


def test_adapter_path_changes_generation_and_fuse_writes_a_model(trained, runner, tmp_path):
    _, _, adapters = trained
    args = ["generate", "--model", "demo-random", "-p", "Uppercase: cat dog", "--max-tokens", "32", "--steps", "3",
            "--seed", "0", "--json"]
    plain = invoke(runner, args)
    tuned = invoke(runner, args + ["--adapter-path", str(adapters)])
    assert plain.exit_code == 0 and tuned.exit_code == 0, tuned.output
    assert json.loads(plain.stdout)["token_ids"] != json.loads(tuned.stdout)["token_ids"]

    fused = tmp_path / "fused"
    result = invoke(runner, ["fuse", "--model", "demo-random", "--adapter-path", str(adapters), "--save-path", str(fused)])
    assert result.exit_code == 0, result.output
    assert "fused 39 LoRA layers" in result.stdout
    again = invoke(runner, ["generate", "--model", str(fused), "-p", "Uppercase: cat dog", "--max-tokens", "32",
                            "--steps", "3", "--seed", "0", "--json"])
    assert again.exit_code == 0, again.output
    exists = invoke(runner, ["fuse", "--model", "demo-random", "--adapter-path", str(adapters), "--save-path", str(fused)])
    assert exists.exit_code == 1 and "already exists" in error_line(exists, last=True)


def test_resume_continues_from_saved_adapters(trained, runner, tmp_path):
    _, data, adapters = trained
    out = tmp_path / "resumed"
    result = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--iters", "1",
                             "--val-batches", "0", "--adapter-path", str(out),
                             "--resume-adapter-file", str(adapters / "adapters.safetensors"), *FAST[:4]])
    assert result.exit_code == 0, result.output
    wrong = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--iters", "1", "--lora-rank", "4",
                            "--adapter-path", str(out), "--resume-adapter-file",
                            str(adapters / "adapters.safetensors")])
    assert wrong.exit_code == 1 and "does not match this run's trainable parameters" in error_line(wrong, last=True)


def test_ctrl_c_saves_the_adapters(runner, tmp_path, monkeypatch):
    data = write_task(tmp_path / "data", n_train=8, n_valid=2)
    original = F.FinetuneRun.reports

    def interrupted(self):
        for report in original(self):
            yield report
            if report.step == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(F.FinetuneRun, "reports", interrupted)
    out = tmp_path / "adapters"
    result = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--iters", "50",
                             "--val-batches", "0", "--adapter-path", str(out), *FAST[:4]])
    assert result.exit_code == 130, result.output
    assert "interrupted at step 2: adapters saved to" in result.stderr
    assert set(mx.load(str(out / "adapters.safetensors")))


def test_full_finetune_saves_layer_weights(runner, tmp_path):
    data = write_task(tmp_path / "data", n_train=4, n_valid=2)
    out = tmp_path / "full"
    result = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--iters", "2",
                             "--fine-tune-type", "full", "--num-layers", "1", "--val-batches", "0",
                             "--adapter-path", str(out), *FAST[:4]])
    assert result.exit_code == 0, result.output
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights and all(k.startswith("model.decoder.layers.3.") for k in weights)
    gen = invoke(runner, ["generate", "--model", "demo-random", "-p", "hi", "--max-tokens", "8", "--steps", "2",
                          "--adapter-path", str(out), "--json"])
    assert gen.exit_code == 0, gen.output


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: (d / "train.jsonl").write_text("{bad\n"), [], "train.jsonl:1: not valid JSON"),
    (lambda d: (d / "valid.jsonl").unlink(), [], "valid.jsonl is missing"),
    (lambda d: None, ["--fine-tune-type", "qlora"], "--fine-tune-type must be one of lora, full"),
    (lambda d: None, ["--num-layers", "9"], "num_layers 9 is not in 1..4"),
    (lambda d: None, ["--batch-size", "99"], "fewer than --batch-size 99"),
    (lambda d: None, ["--warmup", "5", "--iters", "5"], "--warmup must be in 0..iters-1"),
])
def test_bad_input_is_one_error_line(runner, tmp_path, setup, args, message):
    data = write_task(tmp_path / "data", n_train=4, n_valid=2)
    setup(data)
    result = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--adapter-path",
                             str(tmp_path / "a"), *args])
    assert result.exit_code == 1, result.output
    assert message in error_line(result, last=True)


def test_bad_adapter_path_on_generate(runner, tmp_path):
    result = invoke(runner, ["generate", "--model", "demo-random", "-p", "hi", "--adapter-path", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "no such adapter folder" in error_line(result, last=True)
