"""`dgemma convert` against hostile sources and destinations, signals and a full disk (issue 14,
items 5, 6, 7, 8): real subprocesses for the signals, small crafted folders for the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_convert import build_hf_checkpoint
from mlx_diffusiongemma.convert import convert
from mlx_diffusiongemma.errors import CheckpointError


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("hostile-src") / "hf")


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name + "."))


# -- 5. shard names in the index are confined to the folder -----------------------------------------


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_index_pointing_outside_is_refused_and_nothing_is_packaged(src, tmp_path, how):
    folder = _copy(src, tmp_path / "src")
    secret = tmp_path / "secret.safetensors"
    first = sorted(folder.glob("*.safetensors"))[0]
    shutil.copy(first, secret)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v == first.name)
    index["weight_map"][key] = str(secret) if how == "absolute" else "../secret.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refusing to read it"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


# -- 7. --force replaces only a model folder -----------------------------------------------------------


def test_force_refuses_a_folder_that_is_not_a_model(src, tmp_path):
    dst = tmp_path / "documents"
    dst.mkdir()
    (dst / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="not a model folder"):
        convert(src, dst, recipe="bf16", force=True)
    assert (dst / "thesis.tex").read_text() == "years of work"
    assert not _leftovers(tmp_path, "documents")


def test_force_refuses_a_file(src, tmp_path):
    dst = tmp_path / "notes.txt"
    dst.write_text("keep me")
    with pytest.raises(CheckpointError, match="not a model folder"):
        convert(src, dst, recipe="bf16", force=True)
    assert dst.read_text() == "keep me"


def test_force_replaces_a_model_folder_and_an_empty_one(src, tmp_path):
    dst = tmp_path / "model"
    convert(src, dst, recipe="bf16")
    assert convert(src, dst, recipe="8bit", force=True).replaced_existing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(src, empty, recipe="bf16", force=True).replaced_existing


# -- 8. a full disk names the file and says so --------------------------------------------------------


def test_disk_full_message(src, tmp_path, monkeypatch):
    import mlx_diffusiongemma.convert as C
    import mlx_diffusiongemma.convert.writer as Wr

    def failing_save(path, arrays, metadata=None):
        raise RuntimeError("[write] Unable to write 1048576 bytes to file.")

    monkeypatch.setattr(Wr.mx, "save_safetensors", failing_save)
    real_usage = shutil.disk_usage

    def usage(path):
        if str(path).startswith(str(tmp_path / "out")):
            return real_usage(path)._replace(free=4096)
        return real_usage(path)

    monkeypatch.setattr(C.shutil, "disk_usage", usage)
    with pytest.raises(CheckpointError) as info:
        convert(src, tmp_path / "out", recipe="bf16", shard_size_bytes=64 << 10)
    msg = str(info.value)
    assert "the disk is full" in msg and str(tmp_path / "out") in msg and "free some space" in msg
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_other_write_errors_name_the_path(src, tmp_path, monkeypatch):
    import mlx_diffusiongemma.convert.writer as Wr

    def failing_save(path, arrays, metadata=None):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Wr.mx, "save_safetensors", failing_save)
    with pytest.raises(CheckpointError, match="could not write .*out.*Input/output error"):
        convert(src, tmp_path / "out", recipe="bf16", shard_size_bytes=64 << 10)


# -- 6. SIGTERM and SIGHUP clean up like SIGINT (a real subprocess) ------------------------------------

_SLOW_CONVERT = """
import signal, sys, time
# A parent run under nohup passes SIGHUP on as ignored, and a background job of a shell passes
# SIGINT on as ignored (then Python installs no KeyboardInterrupt handler); an ignored signal is
# (rightly) left alone by convert: start from the dispositions a terminal session gives.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
from mlx_diffusiongemma.convert import convert
def progress(done, total, done_bytes, total_bytes):
    if done == 1:
        print("started", flush=True)
    time.sleep(0.2)
convert(sys.argv[1], sys.argv[2], recipe="bf16", shard_size_bytes=64 << 10, progress=progress)
print("finished", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_convert_leaves_nothing(src, tmp_path, signum):
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        assert _leftovers(tmp_path, "out")  # the partial folder exists while converting
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not dst.exists()
    assert not _leftovers(tmp_path, "out"), "the partial folder was left behind"


def test_cli_exit_code_after_sigterm(src, tmp_path):
    """Through `dgemma convert`: 'interrupted' and 128 + SIGTERM, nothing left."""
    script = ("import sys, time\n"
              "import mlx_diffusiongemma.convert as C\n"
              "real = C._stream\n"
              "def slow(inventory, plan, writer, report, progress):\n"
              "    print('started', flush=True)\n"
              "    time.sleep(30)\n"
              "C._stream = slow\n"
              "from mlx_diffusiongemma.cli.app import main\n"
              "sys.argv = ['dgemma', 'convert', sys.argv[1], '-o', sys.argv[2]]\n"
              "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted" in err and "Traceback" not in err
    assert not _leftovers(tmp_path, "out") and not (tmp_path / "out").exists()


# -- a config that disagrees with the weights is refused before the plan builds the model -------------


def test_convert_refuses_a_huge_config_quickly(src, tmp_path):
    folder = _copy(src, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 500
    config["text_config"].pop("layer_types", None)
    config["text_config"].pop("per_layer_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_hidden_layers = 500"):
        convert(folder, tmp_path / "out")
    assert time.perf_counter() - t0 < 20
