"""`dgemma finetune` and `dgemma fuse`: the rendering (progress bar, log lines, summaries).

The work is in `mlx_diffusiongemma.train` (`finetune.FinetuneRun`, `fuse.fuse`); this module only
shows it. On a terminal a rich progress bar carries loss, validation loss, it/s, tokens/s and
peak memory; piped, one mlx-lm-style line every `--steps-per-report` steps. Ctrl-C saves the
adapters and exits 130.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def header(run) -> Table:
    s = run.settings
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    kind = s.fine_tune_type
    if kind == "lora":
        kind += f" (rank {s.lora_rank}, scale {s.lora_scale:g})"
    table.add_row("model", escape(str(s.model)))
    table.add_row("fine-tune", f"{kind} on the last {run.num_layers} of {len(run.model.layers)} layers")
    share = 100 * run.trainable / max(run.total, 1)
    table.add_row("trainable", f"{run.trainable / 1e6:.3f}M of {run.total / 1e6:.3f}M parameters ({share:.3f}%)")
    table.add_row("data", f"{len(run.train_items)} training / {len(run.valid_items)} validation canvases "
                          f"of {run.model.canvas_length} tokens")
    table.add_row("schedule", f"{s.iters} iters · batch {s.batch_size} · {s.optimizer} lr {s.learning_rate:g} "
                              f"({s.lr_schedule}{f', warmup {s.warmup}' if s.warmup else ''}) · seed {s.seed}")
    table.add_row("adapters", escape(str(run.adapter_dir)))
    return table


def run_finetune(settings, *, steps_per_report: int, out: Console, err: Console, interactive: bool) -> int:
    from mlx_diffusiongemma.train.finetune import FinetuneRun

    if interactive:
        err.print(f"[dim]loading {escape(str(settings.model))} and {escape(str(settings.data))}…[/]")
    run = FinetuneRun.prepare(settings)
    err.print(header(run))
    progress = Progress(
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} · val {task.fields[val]} · {task.fields[its]} it/s · "
                   "{task.fields[tps]} tok/s · peak {task.fields[mem]} GB"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not interactive,
    )
    task = progress.add_task("train", total=settings.iters, loss="-", val="-", its="-", tps="-", mem="-")
    t0 = time.perf_counter()
    last = None
    window: list[float] = []
    reports = run.reports()
    try:
        with progress:
            for r in reports:
                last = r
                window.append(r.loss)
                elapsed = time.perf_counter() - t0
                its = r.step / elapsed if elapsed > 0 else 0.0
                tps = r.trained_tokens / elapsed if elapsed > 0 else 0.0
                smooth = sum(window[-10:]) / len(window[-10:])
                progress.update(task, completed=r.step, loss=f"{smooth:.3f}", val=_fmt(run.last_val_loss),
                                its=f"{its:.2f}", tps=f"{tps:.0f}", mem=f"{r.peak_memory_gb:.2f}")
                if not interactive and r.step == 1 and run.initial_val_loss is not None:
                    err.print(f"Iter 0: Val loss {run.initial_val_loss:.3f}", markup=False, highlight=False)
                if not interactive and (r.step % steps_per_report == 0 or r.val_loss is not None
                                        or r.step == settings.iters):
                    line = f"Iter {r.step}: Train loss {smooth:.3f}"
                    if r.val_loss is not None:
                        line += f", Val loss {r.val_loss:.3f}"
                    line += (f", Learning Rate {r.learning_rate:.3e}, It/sec {its:.3f}, Tokens/sec {tps:.1f}, "
                             f"Trained Tokens {r.trained_tokens}, Peak mem {r.peak_memory_gb:.3f} GB")
                    err.print(line, markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        reports.close()
        path = run.save()
        err.print(f"interrupted at step {run.step}: adapters saved to {escape(str(path))}")
        return 130
    path = run.save()
    elapsed = time.perf_counter() - t0
    summary = (f"trained {last.step} steps in {elapsed:.1f} s · loss {sum(window[-10:]) / len(window[-10:]):.3f}"
               f" · val loss {_fmt(run.initial_val_loss)} -> {_fmt(run.last_val_loss)} · peak memory {last.peak_memory_gb:.2f} GB")
    err.print(summary, markup=False, highlight=False, soft_wrap=True)
    out.print(f"adapters saved to {escape(str(path))}")
    out.print(f"[dim]try: dgemma chat --model {escape(str(settings.model))} --adapter-path "
              f"{escape(str(run.adapter_dir))}[/]")
    return 0


def run_fuse(model: str, adapter_path: str, save_path: str, *, dequantize: bool, offline: bool | None,
             out: Console, err: Console) -> None:
    from mlx_diffusiongemma.train.fuse import fuse

    err.print(f"[dim]loading {escape(model)} with the adapters in {escape(adapter_path)}…[/]")
    summary = fuse(model, adapter_path, save_path, dequantize=dequantize, offline=offline)
    kind = "quantized" if summary["quantized"] else "unquantized"
    out.print(f"fused {summary['fused_layers']} LoRA layers; {kind} model written to {escape(summary['save_path'])}")
