"""The process group `mlx.launch` starts: forming it within a time bound, sharing rank 0's request
with the others, and ending a rank that waits too long for the others (`Watchdog`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Iterable, Iterator

import mlx.core as mx
import numpy as np

from .plan import DistributedError


def init_group(backend: str = "any", timeout: float = 60.0) -> mx.distributed.Group:
    """The group `mlx.launch` set up (size 1 when not launched), formed within `timeout` seconds.

    Forming the ring blocks inside MLX until every host answers, so the bound is kept by a
    `Watchdog` process: an unreachable host ends this process with a message instead of a hang.
    """
    launched = any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_HOSTFILE"))
    if not launched:
        return mx.distributed.init()
    rank = os.environ.get("MLX_RANK", "?")
    with Watchdog(timeout, f"rank {rank}: the distributed group did not form within {timeout:g} s "
                           "(a host is unreachable or a rank did not start); stopping."):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise DistributedError(f"could not form the distributed group: {e}") from None
        # Every rank answers once before any work starts (as mlx-lm's sharded_load does).
        barrier(group)
    return group


def barrier(group: mx.distributed.Group) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def share(value: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's JSON-serialisable `value`, on every rank (the others pass anything, e.g. None).

    Two small all_sums (the length, then the bytes) carry it; the other ranks contribute zeros.
    """
    if group.size() == 1:
        return value
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    n = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group, stream=mx.cpu)
    size = int(n.item())
    if group.rank() == 0:
        buf = mx.array(np.frombuffer(data, dtype=np.uint8).astype(np.int32))
    else:
        buf = mx.zeros((size,), dtype=mx.int32)
    out = mx.distributed.all_sum(buf, group=group, stream=mx.cpu)
    return json.loads(bytes(np.array(out).astype(np.uint8)).decode())


_WATCHDOG = r"""
import os, select, signal, sys
parent, deadline, message = int(sys.argv[1]), None, ""
while True:
    ready, _, _ = select.select([sys.stdin], [], [], deadline)
    if not ready:  # no word from the parent within the bound: it is stuck in a collective
        sys.stderr.write("error: " + message + "\n"); sys.stderr.flush()
        try:
            os.kill(parent, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(0)
    line = sys.stdin.readline()
    if not line or line.startswith("off"):
        sys.exit(0)  # the parent is done (or gone)
    seconds, _, message = line.rstrip("\n").partition(" ")
    deadline = float(seconds)
"""


class Watchdog:
    """Ends this process with `message` on stderr if it makes no progress for `timeout` seconds.

    A separate process, because MLX blocks in C++ (holding the interpreter lock while forming the
    group) when a peer is unreachable or stuck, where no Python thread or signal handler runs.
    `pet()` restarts the clock; leaving the `with` block stops the watchdog. A rank that dies
    outright is reported faster: MLX raises "connection to a peer was lost" at once.
    """

    def __init__(self, timeout: float, message: str):
        self.timeout, self.message = float(timeout), " ".join(message.split())
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "Watchdog":
        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())],
                                      stdin=subprocess.PIPE, text=True)
        self.pet()
        return self

    def pet(self, message: str | None = None) -> None:
        if message is not None:
            self.message = " ".join(message.split())
        if self._proc is not None:
            self._proc.stdin.write(f"{self.timeout} {self.message}\n")
            self._proc.stdin.flush()

    def guard(self, events: Iterable) -> Iterator:
        """Pass `events` through, restarting the clock at each one (each step or block)."""
        for event in events:
            self.pet()
            yield event

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.write("off\n")
                self._proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            self._proc.wait(timeout=10)
            self._proc = None


def stop_on_termination(message: str) -> None:
    """Turn SIGTERM into a `DistributedError(message)`.

    `mlx.launch` terminates the surviving ranks as soon as one rank exits; rank 0 may be between
    collectives then (loading, or computing), and would vanish without a word. The error is
    raised where the main thread is, so the caller reports it and cleans up as for any error.
    """
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise DistributedError(message)

    signal.signal(signal.SIGTERM, handler)


def lost_peer(error: BaseException) -> bool:
    """Whether an exception is MLX reporting a lost connection to another rank."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("[ring]" in text or "[jaccl]" in text or "peer" in text)
