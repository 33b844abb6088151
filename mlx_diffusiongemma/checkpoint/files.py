"""A checkpoint's files: reading the small ones (JSON configs, and the check that a path is a
regular file), and what writing a folder (converting, fusing, saving adapters) shares: write
errors named (a full disk said so) and SIGTERM/SIGHUP turned into an interrupt."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# What `load()` and the command line run when no model is named (here, not in loading.py, so that
# the command line can show it without importing the model stack).
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"

# JSON files of a checkpoint are small; a larger one is corrupt or hostile.
MAX_JSON_BYTES = 64 << 20


def irregular_kind(info: os.stat_result) -> str | None:
    """What a path that is not a regular file is, in words ("a folder", ...); None for a regular
    file. Opening a FIFO or a device would block or never end, so readers refuse them by this."""
    if stat.S_ISREG(info.st_mode):
        return None
    return "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"


def check_regular_file(path: Path) -> os.stat_result:
    """stat() a file the loader will open, refusing anything that is not a regular file (a FIFO
    or a device would block or never end): a CheckpointError naming it."""
    try:
        info = os.stat(path)  # follows symlinks, as the hub cache uses them
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    kind = irregular_kind(info)
    if kind is not None:
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


# -- writing -------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while writing (converting, fusing, training): raised like
    Ctrl-C's KeyboardInterrupt so that partial output is removed (or adapters saved) on the way
    out. `signum` says which signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def signals_interrupt():
    """Inside, SIGTERM and SIGHUP interrupt like SIGINT does (their default action kills the
    process at once and leaves a partial folder behind). Only in the main thread (where Python
    runs signal handlers) and only over the default action: a handler the application installed
    is left alone."""
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = {}
    for s in wanted:
        if signal.getsignal(s) == signal.SIG_DFL:
            previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def write_failure(path: Path, error: BaseException, elsewhere: str) -> str:
    """What a failed write of `path` says: "the disk is full" when it is (ENOSPC, EDQUOT, or
    under 64 MB free), then `elsewhere` (what else to do); otherwise the cause."""
    path = Path(path)
    free = None
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        pass
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 << 20)
    if full:
        where = f" ({free / 1e6:.0f} MB free)" if free is not None else ""
        return f"the disk is full{where}: could not write {path}; free some space, or {elsewhere}"
    detail = getattr(error, "strerror", None) or str(error)
    return f"could not write {path}: {detail}"


@contextmanager
def write_errors(path: Path, elsewhere: str = "write to a disk with room"):
    """mlx reports a failed write as RuntimeError('[write] Unable to write ...') without the
    file or the cause: a CheckpointError naming both (see `write_failure`)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise CheckpointError(write_failure(path, e, elsewhere)) from None
