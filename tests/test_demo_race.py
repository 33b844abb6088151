"""First use of `--model demo-random` by several processes at once (issue 14, item 2): every process
gets a working demo model; no process removes a folder another one is loading."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from mlx_diffusiongemma.demo import random as D

_LOAD_DEMO = """
from mlx_diffusiongemma.api import load
model, tok = load("demo-random")
assert tok.encode("hi")
print("ok", model.source, flush=True)
"""


def test_concurrent_first_use_real_processes(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, MLX_DIFFUSIONGEMMA_HOME=str(home), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD_DEMO], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert out.startswith("ok ")
    sources = {out.split()[1] for out, _ in outputs}
    assert len(sources) == 1
    # One finished folder; no partial folder left next to it.
    assert [p.name for p in home.iterdir() if "partial" in p.name] == []
    assert (Path(sources.pop()) / "config.json").exists()


def test_a_finished_folder_that_appears_meanwhile_is_kept(tmp_path, monkeypatch):
    """Without the lock (another platform, another version), the loser of the rename uses the
    winner's folder instead of deleting it."""
    folder = tmp_path / "demo"
    winner = tmp_path / "winner"
    D.ensure_demo(winner)
    marker = "written by the winner"

    real_save = D.json.dumps

    def appear_then_continue(*a, **kw):
        # Just before the loser writes its files, the winner's folder takes the name.
        if not folder.exists():
            os.rename(winner, folder)
            (folder / "marker.txt").write_text(marker)
        return real_save(*a, **kw)

    monkeypatch.setattr(D, "_creation_lock", lambda f: contextlib.nullcontext())
    monkeypatch.setattr(D.json, "dumps", appear_then_continue)
    assert D.ensure_demo(folder) == folder
    monkeypatch.undo()
    assert (folder / "marker.txt").read_text() == marker
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
