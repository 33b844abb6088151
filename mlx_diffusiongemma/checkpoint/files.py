"""Reading a checkpoint's small files: JSON configs, and the check that a path is a regular file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# What `load()` and the command line run when no model is named (here, not in loading.py, so that
# the command line can show it without importing the model stack).
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"

# JSON files of a checkpoint are small; a larger one is corrupt or hostile.
MAX_JSON_BYTES = 64 << 20


def check_regular_file(path: Path) -> os.stat_result:
    """stat() a file the loader will open, refusing anything that is not a regular file (a FIFO
    or a device would block or never end): a CheckpointError naming it."""
    try:
        info = os.stat(path)  # follows symlinks, as the hub cache uses them
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
        raise CheckpointError(f"{path} is {kind}; a checkpoint holds regular files only")
    return info


def read_json(path: Path) -> dict[str, Any]:
    info = check_regular_file(Path(path))
    if info.st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is {info.st_size} bytes; a JSON config this large is not a checkpoint's")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data
