"""`dgemma info MODEL [--context N]`: the memory plan, before loading (or downloading) anything.

For a checkpoint stored unquantized (a Hugging Face one), every recipe is planned too, from the
config alone, so a user can choose one before fetching the weights (a hub repo id fetches its
JSON files only)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import handle_errors
from .flags import Debug, KvBits, KvGroupSize, Offline

_CONTEXT_LIMIT = 1 << 26  # the largest max_position_embeddings a config may declare


def _context(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= _CONTEXT_LIMIT:
        raise typer.BadParameter(f"must be between 1 and {_CONTEXT_LIMIT}")
    return value


def info(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, hub repo id, 'demo' or 'demo-random'.")],
    context: Annotated[int | None, typer.Option(
        "--context", callback=_context,
        help="Positions to plan for: prompt plus reply canvases [default: 1024].")] = None,
    text_only: Annotated[bool, typer.Option("--text-only", help="Without the vision tower.")] = False,
    kv_bits: KvBits = None,
    kv_group_size: KvGroupSize = None,
    offline: Offline = False,
    debug: Debug = False,
):
    """Print the memory plan of a checkpoint: weights, cache and buffers at a context, against
    what MLX can use on this machine."""
    with handle_errors(debug):
        from mlx_diffusiongemma import demo
        from mlx_diffusiongemma.checkpoint.loading import plan
        from mlx_diffusiongemma.checkpoint.recipes import EXPERT_BITS

        source = demo.folder_for(model) or model
        stored = plan(source, context=context, text_only=text_only, offline=offline or None,
                      kv_bits=kv_bits, kv_group_size=kv_group_size)
        rows = [("as stored" + (f" ({stored.recipe})" if stored.recipe else ""), stored)]
        if stored.recipe == "bf16":
            rows += [(f"converted {r}", stored.converted(r)) for r in EXPERT_BITS]
        out = Console(highlight=False)
        cache = f", {kv_bits}-bit KV cache" if kv_bits else ""
        table = Table(title=f"{stored.name}: memory at a {stored.context}-token context{cache}", title_justify="left")
        for column in ("checkpoint", "weights", "+ cache", "+ buffers", "peak", "fits here"):
            table.add_column(column, justify="left" if column == "checkpoint" else "right")
        for label, p in rows:
            table.add_row(label, _gb(p.weights), _gb(p.kv), _gb(p.buffers), _gb(p.peak), "yes" if p.fits else "no")
        out.print(table)
        out.print(f"MLX can use {stored.limit_text()} here.")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 2**20:.1f} MiB"
