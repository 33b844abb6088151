"""`dgemma convert`: a progress bar over tensors and bytes, then a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)
from rich.table import Table

from mlx_diffusiongemma.checkpoint.recipes import DEFAULT_RECIPE, RECIPES

from .errors import fail, handle_errors
from .flags import Debug, positive

_PRECISION = {4: "4-bit", 8: "8-bit", 16: "bfloat16", 32: "float32"}


def _recipe(value: str) -> str:
    if value not in RECIPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(RECIPES)}")
    return value


def convert(
    src: Annotated[Optional[str], typer.Argument(help="Hugging Face checkpoint: local folder or hub repo id.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", "--mlx-path", help="Destination folder (must not exist).")] = None,
    hf_path: Annotated[Optional[str], typer.Option(
        "--hf-path", help="The checkpoint, as mlx_lm.convert names it (instead of SRC).")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", callback=lambda v: v and _recipe(v),
        help=f"Weights precision: {', '.join(RECIPES)} (default {DEFAULT_RECIPE}).")] = None,
    quantize: Annotated[bool, typer.Option(
        "--quantize", "-q", help=f"Quantize (mlx_lm.convert's flag): the default recipe, {DEFAULT_RECIPE}.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing destination.")] = False,
    shard_size: Annotated[float, typer.Option(
        "--shard-size", callback=positive, help="Largest shard, in GB (2^30 bytes).")] = 5.0,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="Leave the vision tower out (smaller; the folder cannot read images).")] = False,
    debug: Debug = False,
):
    """Convert a Hugging Face DiffusionGemma checkpoint into an MLX folder."""
    with handle_errors(debug):
        if src is not None and hf_path is not None and src != hf_path:
            fail("give the checkpoint once: SRC or --hf-path", 2)
        src = src or hf_path
        if src is None:
            fail("which checkpoint? dgemma convert SRC -o DST (or --hf-path SRC --mlx-path DST)", 2)
        if output is None:
            fail("where to? -o DST (or --mlx-path DST)", 2)
        if quantize and recipe == "bf16":
            fail("-q quantizes; --recipe bf16 does not: give one of them", 2)
        recipe = recipe or DEFAULT_RECIPE
        run_convert(src, output, recipe=recipe, force=force, shard_size_bytes=int(shard_size * 2**30),
                    out=Console(highlight=False), err=Console(stderr=True, highlight=False), text_only=text_only)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if not unit else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}B"


def run_convert(src: str, dst: Path, *, recipe: str, force: bool, shard_size_bytes: int,
                out: Console, err: Console, text_only: bool = False):
    from mlx_diffusiongemma.convert import convert

    progress = Progress(
        TextColumn("[bold]converting"), BarColumn(), TextColumn("{task.fields[tensors]} tensors"),
        DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err,
    )
    task = None

    def on_progress(done_tensors: int, total_tensors: int, done_bytes: int, total_bytes: int):
        nonlocal task
        if task is None:  # shown once the checks have passed and the writing starts
            progress.start()
            task = progress.add_task("convert", total=total_bytes, tensors="")
        progress.update(task, completed=done_bytes, tensors=f"{done_tensors}/{total_tensors}")

    try:
        report = convert(src, dst, recipe=recipe, force=force, shard_size_bytes=shard_size_bytes,
                         progress=on_progress, text_only=text_only)
    finally:
        if task is not None:  # stopping a bar never started prints a blank line before the error
            progress.stop()
    out.print(summary_table(report))
    for message in report.messages:
        out.print(f"[dim]note:[/] {escape(message)}")
    return report


def summary_table(report) -> Table:
    table = Table(title=f"converted to {escape(str(report.destination))}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("recipe", report.recipe)
    table.add_row("size on disk", f"{human_bytes(report.bytes_on_disk)} ({len(report.shards)} shard(s))")
    table.add_row("bits per weight", f"{report.bits_per_weight:.2f}")
    total = sum(report.parameters_by_bits.values()) or 1
    for bits, count in report.parameters_by_bits.items():
        label = _PRECISION.get(bits, f"{bits}-bit")
        table.add_row(f"parameters, {label}", f"{human_count(count)} ({100 * count / total:.1f}%)")
    table.add_row("tensors written", str(report.tensors_written))
    if report.vision_tensors_skipped:
        table.add_row("vision tensors skipped",
                      f"{report.vision_tensors_skipped} ({human_bytes(report.vision_bytes_skipped)}, text only)")
    else:
        table.add_row("vision tensors", f"{report.vision_tensors_written} (bfloat16)")
    if report.replaced_existing:
        table.add_row("replaced", "the previous folder")
    return table
