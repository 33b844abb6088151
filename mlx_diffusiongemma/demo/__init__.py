"""The demo models, both offline, and what they were built from.

- "demo": the trained demo model that ships inside the package (`demo/model/`): a
  2.9M-parameter DiffusionGemma (routed experts, sliding and full layers, self-conditioning,
  canvas 64) trained by `scripts/train_demo.py` (with `build.py`) on the toy tasks of `tasks.py`
  (sorting, arithmetic, reversing, 4x4 sudoku, ...). It answers those tasks; it knows nothing else.
- "demo-random": a tiny random-weight model with a character-level tokenizer (`random.py`), built
  on first use into the user's cache directory (fixed seed). Its output is noise; tests and
  mechanics checks use it because it is smaller still and every character is one token.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.files import read_json
from ..errors import CheckpointError

DEMO_NAME = "demo"  # the trained demo model (package data)
RANDOM_DEMO_NAME = "demo-random"  # the random one, built on first use


def shipped_demo_dir() -> Path:
    """The trained demo model's folder inside the installed package."""
    return Path(__file__).resolve().parent / "model"


def folder_for(name: str | Path) -> Path | None:
    """The folder of the demo model called `name` ("demo", "demo-random"), or None for any other
    name, or when a folder of that name exists here (a local folder wins)."""
    if str(name) not in (DEMO_NAME, RANDOM_DEMO_NAME) or Path(name).expanduser().exists():
        return None
    if str(name) == RANDOM_DEMO_NAME:
        from .random import ensure_demo

        return ensure_demo()
    folder = shipped_demo_dir()
    if not (folder / "model.safetensors").exists():
        raise CheckpointError(f"the demo model is missing from this installation ({folder}); reinstall the package")
    return folder


def is_trained_demo(folder: Path | None) -> bool:
    """Whether the checkpoint in `folder` is the trained demo model (its chat lists its tasks)."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return False
    return read_json(Path(folder) / "config.json").get("mlx_diffusiongemma_demo") == "trained"
