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
    from mlx_diffusiongemma.parallel.group import lost_peer
    from mlx_diffusiongemma.parallel.plan import DistributedError

    try:
        _generate(**options)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        rank = os.environ.get("MLX_RANK", "?")
        raise DistributedError(f"rank {rank}: lost another rank of the group ({e}); stopping") from None


def _generate(*, prompt: str, model: str, system: str | None, options, as_json: bool, offline: bool,
              tensor_parallel: Sequence[str]) -> None:
    """One reply, computed by every rank together; printed by rank 0 (plain text or --json)."""
    import mlx.core as mx

    from mlx_diffusiongemma import demo
    from mlx_diffusiongemma.checkpoint.loading import resolve
    from mlx_diffusiongemma.checkpoint.tokenizer import load_tokenizer
    from mlx_diffusiongemma.diffusion.engine import Request, run
    from mlx_diffusiongemma.diffusion.options import fresh_seed
    from mlx_diffusiongemma.parallel.group import Watchdog, init_group, share, stop_on_termination
    from mlx_diffusiongemma.parallel.load import load_sharded
    from mlx_diffusiongemma.prompts.render import render_messages

    from .views import PlainView, render

    timeout = float(os.environ.get(ENV_TIMEOUT, "120"))
    group = init_group(timeout=timeout)
    rank = group.rank()
    stop_on_termination("lost another rank of the group (mlx.launch stopped this one after another rank exited)")
    with Watchdog(timeout, f"rank {rank}: no answer from the other ranks within {timeout:g} s "
                           f"(a rank is stuck or a host is unreachable; {ENV_TIMEOUT} sets the bound); stopping.") as dog:
        folder = demo.folder_for(model) or resolve(model, offline=offline or None)
        llm, _ = load_sharded(folder, group, tensor_parallel=tensor_parallel)
        dog.pet()
        tokenizer = None
        payload = None
        if rank == 0:
            tokenizer = load_tokenizer(folder, llm.generation)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = render_messages(tokenizer, messages, options.thinking)
            payload = {"ids": ids, "seed": options.seed if options.seed is not None else fresh_seed()}
        payload = share(payload, group)
        request = Request.of(payload["ids"], options.updated(seed=payload["seed"]))
        mx.reset_peak_memory()
        if rank != 0:
            for _ in dog.guard(run(llm, request)):
                pass
            return
        events = dog.guard(run(llm, request, detokenizer=tokenizer.detokenizer))
        view = PlainView(io.StringIO()) if as_json else PlainView(sys.stdout, sys.stderr if options.thinking else None)
        result = render(events, view)
    if as_json:
        out = result.to_json()
        out["ranks"] = group.size()
        print(json.dumps(out, ensure_ascii=False))
