"""`--model` -> (model, tokenizer), saying in a terminal what is happening before the slow part."""

from __future__ import annotations

import time

from rich.console import Console

from .errors import nothing


def load_model(name: str, offline: bool, ui: Console, adapter_path: str | None = None, text_only: bool = False,
               kv_bits: int | None = None, kv_group_size: int | None = None):
    """(model, tokenizer) for --model; 'demo' is the trained demo model in the package,
    'demo-random' the random one (built on first use). In a terminal, a line says what is
    happening before the slow imports and the loading."""
    t0 = time.perf_counter()
    if name == "demo-random":
        from mlx_diffusiongemma.demo.random import demo_dir

        if not (demo_dir() / "config.json").exists():
            ui.print(f"[dim]creating the random demo model in {demo_dir()} (first use only, a few seconds)…[/]")
        elif ui.is_terminal:
            ui.print("[dim]loading the random demo model…[/]")
        with ui.status("[dim]preparing the random demo model…[/]") if ui.is_terminal else nothing():
            from mlx_diffusiongemma.api import load

            model, tokenizer = load(name, adapter_path=adapter_path, text_only=text_only,
                                    kv_bits=kv_bits, kv_group_size=kv_group_size)
        ui.print("[yellow]demo model: random weights, its output is noise.[/]")
        return model, tokenizer
    if name == "demo":
        from mlx_diffusiongemma.api import load

        model, tokenizer = load(name, adapter_path=adapter_path, text_only=text_only,
                                kv_bits=kv_bits, kv_group_size=kv_group_size)
        ui.print("[yellow]demo model: a 2.9M-parameter DiffusionGemma trained on toy tasks only "
                 "(sorting, reversing, cards, 4x4 sudoku, comparisons); /help in chat lists prompts to try.[/]")
        return model, tokenizer
    if ui.is_terminal:  # piped: errors stay one line on stderr
        ui.print(f"[dim]loading {name}…[/]")
    from mlx_diffusiongemma.api import load

    model, tokenizer = load(name, offline=offline or None, adapter_path=adapter_path, text_only=text_only,
                            kv_bits=kv_bits, kv_group_size=kv_group_size)
    if ui.is_terminal:
        ui.print(f"[dim]loaded {model.source} in {time.perf_counter() - t0:.1f} s[/]")
    return model, tokenizer


def demo_notice(model, kind: str, ui: Console) -> None:
    """Print the notice `kind` (demo.tasks.NOTICES) when `model` is the trained demo model."""
    from mlx_diffusiongemma.demo import is_trained_demo
    from mlx_diffusiongemma.demo.tasks import NOTICES

    if is_trained_demo(model.source):
        ui.print(f"[yellow]notice: {NOTICES[kind]}[/]", highlight=False)
