"""`dgemma generate` when started by `mlx.launch` (several processes, one model split over them).

Every rank loads only its shard and runs the same engine loop (the sampler is replicated, so the
ranks take the same decisions from the same seed). Rank 0 owns the tokenizer and the terminal:
it renders the prompt, shares the ids and the seed with the others, and prints the reply; the
other ranks print nothing. A lost or stuck rank ends the run with one `error:` line on rank 0.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, Sequence

ENV_TIMEOUT = "DGEMMA_RANK_TIMEOUT"  # seconds a rank waits for the others (default 120)


def launched() -> bool:
    """Whether this process was started by `mlx.launch` (or mpirun) as one rank of several."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"))


def generate(**options: Any) -> None:
    """`_generate`, with MLX's report of a lost peer turned into a one-line error."""
    from mlx_diffusiongemma.parallel import DistributedError, lost_peer

    try:
        _generate(**options)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        rank = os.environ.get("MLX_RANK", "?")
        raise DistributedError(f"rank {rank}: lost another rank of the group ({e}); stopping") from None


def _generate(*, prompt: str, model: str, max_tokens: int, seed: int | None, system: str | None,
             think: bool, sampler: dict[str, Any], as_json: bool, offline: bool,
             tensor_parallel: Sequence[str], fast: bool = False) -> None:
    """One reply, computed by every rank together; printed by rank 0 (plain text or --json)."""
    import mlx.core as mx

    from mlx_diffusiongemma.engine import run
    from mlx_diffusiongemma.generate import make_request, render_messages
    from mlx_diffusiongemma.loading import load_tokenizer, resolve
    from mlx_diffusiongemma.parallel import (
        DistributedError, Watchdog, init_group, load_sharded, share, stop_on_termination)

    from .live import PlainView, render

    timeout = float(os.environ.get(ENV_TIMEOUT, "120"))
    group = init_group(timeout=timeout)
    rank = group.rank()
    stop_on_termination("lost another rank of the group (mlx.launch stopped this one after another rank exited)")
    with Watchdog(timeout, f"rank {rank}: no answer from the other ranks within {timeout:g} s "
                           f"(a rank is stuck or a host is unreachable; {ENV_TIMEOUT} sets the bound); stopping.") as dog:
        folder = resolve(model, offline=offline or None)
        if fast and "attention" in tensor_parallel:
            # Fast mode's canvas K/V buffers are sized by the model's (global) KV heads.
            raise DistributedError("--fast does not combine with --tensor-parallel attention yet")
        llm, _ = load_sharded(folder, group, tensor_parallel=tensor_parallel)
        dog.pet()
        tokenizer = None
        payload = None
        if rank == 0:
            tokenizer = load_tokenizer(folder, llm.generation)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = render_messages(tokenizer, messages, think)
            payload = {"ids": ids, "seed": seed if seed is not None else int.from_bytes(os.urandom(4), "little")}
        payload = share(payload, group)
        request = make_request(payload["ids"], dict(sampler, max_tokens=max_tokens, seed=payload["seed"],
                                                       mode="fast" if fast else "exact"))
        mx.reset_peak_memory()
        if rank != 0:
            for _ in dog.guard(run(llm, request)):
                pass
            return
        events = dog.guard(run(llm, request, decode=tokenizer.decode, detokenizer=tokenizer.detokenizer))
        view = PlainView(io.StringIO()) if as_json else PlainView(sys.stdout, sys.stderr if think else None)
        result = render(events, view)
    if as_json:
        from .app import result_json

        out = result_json(result)
        out["ranks"] = group.size()
        print(json.dumps(out, ensure_ascii=False))
