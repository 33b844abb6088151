"""Adapters, fine-tuning and fusing under hostile conditions (issue 30): adapters used from another
thread (an app's worker, the server's engine), a re-run stopped before its first save, NaN
settings and losses, partial or integer adapter files, SIGTERM/SIGHUP, a full disk, and fusing a
model with a vision tower. On the random demo model and the tiny vision checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_diffusiongemma as dg
from conftest import error_line, invoke
from helpers_server import running
from mlx_diffusiongemma.checkpoint import adapters as A
from mlx_diffusiongemma.demo.random import DEMO_VERSION
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.train import finetune as F
from mlx_diffusiongemma.train import lora as L
from mlx_diffusiongemma.train.fuse import fuse_adapters, save_model
from test_finetune_cli import FAST, write_task


@pytest.fixture(scope="module")
def demo(home):
    return home / f"demo-v{DEMO_VERSION}"


def make_adapters(folder, out, *, layers=2, rank=4):
    """A small LoRA adapter folder for `folder`'s model, with nonzero B matrices."""
    model, _ = dg.load(folder)
    L.setup_finetune(model, "lora", layers, A.lora_parameters(rank=rank))
    key = mx.random.key(3)
    updates = []
    for name, p in tree_flatten(model.trainable_parameters()):
        key, sub = mx.random.split(key)
        updates.append((name, 0.05 * mx.random.normal(p.shape, key=sub).astype(p.dtype)))
    model.load_weights(updates, strict=False)
    L.write_adapter_config(out, {"fine_tune_type": "lora", "num_layers": layers,
                                 "lora_parameters": A.lora_parameters(rank=rank)})
    L.save_adapters(model, out / A.ADAPTER_WEIGHTS)
    return out


@pytest.fixture(scope="module")
def adapters(demo, tmp_path_factory):
    return make_adapters(demo, tmp_path_factory.mktemp("adapters") / "a")


# -- 2. adapters are evaluated where they are loaded -------------------------------------------------


def test_generate_on_a_worker_thread_with_adapters(demo, adapters):
    model, tok = dg.load(demo, adapter_path=adapters)
    outcome = {}

    def work():
        try:
            outcome["result"] = dg.generate(model, tok, "hi", max_tokens=8, max_denoising_steps=2, seed=0)
        except Exception as e:  # reported below
            outcome["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].decoder_passes > 0


def test_server_with_adapters_answers(demo, adapters):
    import openai

    from mlx_diffusiongemma.server import ServerConfig, create_app

    model, tok = dg.load(demo, adapter_path=adapters)  # as `dgemma serve --adapter-path` does
    with running(create_app(model, tok, ServerConfig(model_id="tuned"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, extra_body={"max_denoising_steps": 2, "seed": 0})
    assert reply.choices[0].finish_reason in ("stop", "length")


# -- 4. a re-run leaves the folder as it was until its first save --------------------------------------


def test_rerun_writes_its_config_only_with_its_weights(demo, adapters, tmp_path):
    import shutil

    folder = shutil.copytree(adapters, tmp_path / "a")
    before = (folder / A.ADAPTER_CONFIG).read_text()
    data = write_task(tmp_path / "data", n_train=4, n_valid=2)
    run = F.FinetuneRun.prepare(F.FinetuneSettings(model=str(demo), data=str(data), lora_rank=8, iters=1,
                                                   batch_size=2, val_batches=0, adapter_path=str(folder)))
    assert (folder / A.ADAPTER_CONFIG).read_text() == before  # killed here: the old adapters still load
    run.save()
    config = json.loads((folder / A.ADAPTER_CONFIG).read_text())
    assert config["lora_parameters"]["rank"] == 8
    dg.load(demo, adapter_path=folder)  # the new config and weights belong together


# -- 9, 10. signals, NaN settings and losses ------------------------------------------------------------


def _send(sig):
    """Deliver `sig` to this process, if something turns it into an exception (its default
    action would end the test run)."""
    if signal.getsignal(sig) == signal.SIG_DFL:
        raise AssertionError(f"{signal.Signals(sig).name} would kill the process here")
    os.kill(os.getpid(), sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_finetune_saves_on_sigterm_and_sighup(runner, tmp_path, monkeypatch, sig):
    data = write_task(tmp_path / "data", n_train=8, n_valid=2)
    original = F.FinetuneRun.reports

    def signalled(self):
        for report in original(self):
            yield report
            if report.step == 2:
                _send(sig)

    monkeypatch.setattr(F.FinetuneRun, "reports", signalled)
    out = tmp_path / "adapters"
    result = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--iters", "50",
                             "--val-batches", "0", "--adapter-path", str(out), *FAST[:4]])
    assert result.exit_code == 128 + sig, result.output
    assert f"interrupted (stopped by {signal.Signals(sig).name}) at step 2: adapters saved to" in result.stderr
    dg.load("demo-random", adapter_path=out)


@pytest.mark.parametrize("args, message", [
    (["--lora-scale", "nan"], "--lora-scale must be a finite number"),
    (["--lora-scale", "inf"], "--lora-scale must be a finite number"),
    (["--learning-rate", "1e300"], "the training loss is nan at step"),
])
def test_nan_settings_and_losses_stop_the_run(runner, tmp_path, args, message):
    data = write_task(tmp_path / "data", n_train=4, n_valid=2)
    out = tmp_path / "a"
    result = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--batch-size", "2",
                             "--val-batches", "0", "--iters", "4", "--adapter-path", str(out), *args])
    assert result.exit_code == 1, result.output
    assert message in error_line(result, last=True)
    assert "adapters saved" not in result.output
    assert not (out / A.ADAPTER_CONFIG).exists() and not (out / A.ADAPTER_WEIGHTS).exists()


def test_adapter_config_with_nan_scale_is_refused(demo, adapters, tmp_path):
    import shutil

    folder = shutil.copytree(adapters, tmp_path / "a")
    config = json.loads((folder / A.ADAPTER_CONFIG).read_text())
    config["lora_parameters"]["scale"] = float("nan")
    (folder / A.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'scale' must be a finite number"):
        dg.load(demo, adapter_path=folder)


# -- 11, 23. partial, empty or integer adapter files ----------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    (lambda w: {}, "holds no tensors"),
    (lambda w: dict(list(w.items())[: len(w) // 2]), "adapter tensor(s) that adapter_config.json implies are missing"),
    (lambda w: {k: v.astype(mx.int32) for k, v in w.items()}, "is I32; adapter weights are floating point"),
])
def test_damaged_adapter_files_are_refused(demo, adapters, tmp_path, runner, damage, message):
    import shutil

    folder = shutil.copytree(adapters, tmp_path / "a")
    weights = damage(mx.load(str(folder / A.ADAPTER_WEIGHTS)))
    path = folder / A.ADAPTER_WEIGHTS
    if weights:
        mx.save_safetensors(str(path), weights)
    else:  # mx.save_safetensors writes no file for no arrays: an empty header by hand
        raw = b"{}      "
        path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dg.load(demo, adapter_path=folder)
    result = invoke(runner, ["fuse", "--model", "demo-random", "--adapter-path", str(folder),
                             "--save-path", str(tmp_path / "fused")])
    assert result.exit_code == 1 and message in error_line(result, last=True)
    assert not (tmp_path / "fused").exists()


# -- 7, 8, 20. fusing: the vision tower kept, signals, a full disk -------------------------------------


def test_fuse_keeps_the_vision_tower(tiny_checkpoint, tmp_path):
    _, folder = tiny_checkpoint
    model, _ = dg.load(folder)
    assert model.has_vision
    L.setup_finetune(model, "lora", 1, A.lora_parameters(rank=2))
    fuse_adapters(model)
    fused = save_model(model, folder, tmp_path / "fused")
    assert "vision_config" in json.loads((fused / "config.json").read_text())
    again, _ = dg.load(fused)
    assert again.has_vision


def _leftovers(tmp_path, name):
    return [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{name}.partial-")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_fuse_interrupted_by_a_signal_cleans_up(adapters, runner, tmp_path, monkeypatch, sig):
    import mlx_diffusiongemma.convert.writer as Wr

    original = Wr.ShardWriter.add

    def add(self, name, value):
        _send(sig)
        return original(self, name, value)

    monkeypatch.setattr(Wr.ShardWriter, "add", add)
    result = invoke(runner, ["fuse", "--model", "demo-random", "--adapter-path", str(adapters),
                             "--save-path", str(tmp_path / "fused")])
    assert result.exit_code == 128 + sig, result.output
    assert f"interrupted (stopped by {signal.Signals(sig).name})" in result.stderr
    assert not (tmp_path / "fused").exists() and not _leftovers(tmp_path, "fused")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[write] Unable to write 1048576 bytes to file.")])
def test_full_disk_while_fusing_and_saving_adapters(demo, adapters, tmp_path, monkeypatch, error):
    import shutil

    import mlx_diffusiongemma.convert.writer as Wr

    def failing_save(path, arrays, metadata=None):
        raise error

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
    monkeypatch.setattr(Wr.mx, "save_safetensors", failing_save)
    model, _ = dg.load(demo, adapter_path=adapters)
    fuse_adapters(model)
    with pytest.raises(CheckpointError, match="the disk is full") as info:
        save_model(model, demo, tmp_path / "fused")
    assert str(tmp_path / "fused") in str(info.value)
    assert not (tmp_path / "fused").exists() and not _leftovers(tmp_path, "fused")

    model, _ = dg.load(demo)
    L.setup_finetune(model, "lora", 1, A.lora_parameters(rank=2))
    with pytest.raises(CheckpointError, match="the disk is full") as info:
        L.save_adapters(model, tmp_path / "out" / A.ADAPTER_WEIGHTS, {"fine_tune_type": "lora"})
    assert str(tmp_path / "out") in str(info.value)
    assert not list((tmp_path / "out").iterdir())
