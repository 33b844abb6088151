"""The command line's options, each declared once.

The generation knobs' flags are derived from `GenerationOptions` (`diffusion/options.py`): their
names, help and ranges come from the knobs' declarations, and a flag's value is checked by the
same `check_knob` the Python API and the server use (a bad value is a usage error, exit 2).
`generation_flags(...)` adds them to a command, which then receives one checked
`options: GenerationOptions`. The options every command shares (`--model`, `--offline`, ...)
are declared below as typed aliases.

mlx-lm's spellings carry over where they mean the same thing here (`-m` is `--max-tokens` and
`--system-prompt` is `--system`, as in `mlx_lm.generate`); its sampling flags that mean nothing to
the diffusion sampler (`--temp`, `--top-p`, ...) are refused with a message that says what to use
instead, rather than typer's "no such option".
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from mlx_diffusiongemma.diffusion.options import (
    GENERATION_KNOBS,
    MAX_BOUND_WINDOW,
    FastOptions,
    GenerationOptions,
    Knob,
    KnobError,
    check_knob,
)

from .errors import handle_errors

Model = Annotated[str, typer.Option(
    "--model", help="Hub repo id or local folder; 'demo' is a small model trained on toy tasks "
    "(offline; /help in chat lists prompts), 'demo-random' a tiny random one (noise).")]
NoLive = Annotated[bool, typer.Option("--no-live", help="No redrawn view of the block being refined.")]
Offline = Annotated[bool, typer.Option("--offline", help="Never reach the hub; use the local cache only.")]
AdapterPath = Annotated[Optional[str], typer.Option(
    "--adapter-path", help="Folder of fine-tuned adapters (from `dgemma finetune`) to apply.")]
Images = Annotated[Optional[list[Path]], typer.Option(
    "--image", "-i", help="An image file for the prompt (repeatable).")]


def _kv_bits(value: int | None) -> int | None:
    from mlx_diffusiongemma.model.cache import KV_BITS

    if value is not None and value not in KV_BITS:
        raise typer.BadParameter(f"must be one of {', '.join(map(str, KV_BITS))}")
    return value


def _kv_group_size(value: int | None) -> int | None:
    from mlx_diffusiongemma.model.cache import KV_GROUP_SIZES

    if value is not None and value not in KV_GROUP_SIZES:
        raise typer.BadParameter(f"must be one of {', '.join(map(str, KV_GROUP_SIZES))}")
    return value


# mlx-lm's spellings: the prompt cache's K/V held quantized (load options, as --adapter-path).
KvBits = Annotated[Optional[int], typer.Option(
    "--kv-bits", callback=_kv_bits, help="Hold the prompt's KV cache quantized to 4 or 8 bits (less memory for "
    "long prompts; no longer token-exact). Default: the exact float cache.")]
KvGroupSize = Annotated[Optional[int], typer.Option(
    "--kv-group-size", callback=_kv_group_size, help="Group size of the quantized KV cache: 32, 64 or 128 "
    "[default: 64, or 32 where the head dimension needs it].")]
TextOnly = Annotated[bool, typer.Option("--text-only", help="Leave the vision tower out (less memory; no images).")]
System = Annotated[Optional[str], typer.Option("--system", "--system-prompt", help="System prompt.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def positive(value):
    """A typer callback: a finite number > 0 (None passes)."""
    if value is not None and not (value > 0 and value != float("inf")):
        raise typer.BadParameter(f"{value} is not a finite number > 0")
    return value


def _checked(name: str, spec: Knob) -> Callable[[Any], Any]:
    def callback(value):
        try:
            return check_knob(name, value, spec)
        except KnobError as e:
            raise typer.BadParameter(str(e)) from None

    return callback


# mlx_lm.generate's short flags, for the knobs that mean the same here.
SHORT_FLAGS = {"max_tokens": "-m"}

# mlx_lm.generate's sampling flags that have no counterpart in the diffusion sampler: what to say.
NO_TEMPERATURE = "the diffusion sampler has no temperature knob; see --t-min/--t-max (docs/sampler.md)"
MLX_LM_ONLY = {
    "--temp": NO_TEMPERATURE,
    "--temperature": NO_TEMPERATURE,
    "--top-p": "the diffusion sampler has no top-p; see --entropy-bound and --t-min/--t-max (docs/sampler.md)",
    "--top-k": "the diffusion sampler has no top-k; see --entropy-bound (docs/sampler.md)",
    "--min-p": "the diffusion sampler has no min-p; see --entropy-bound (docs/sampler.md)",
}


def _refuse(flag: str) -> Callable[[Any], Any]:
    def callback(value):
        if value is not None:
            raise typer.BadParameter(MLX_LM_ONLY[flag], param_hint=f"'{flag}'")
        return value

    return callback


MLX_LM_ONLY_FLAGS = [
    inspect.Parameter(flag[2:].replace("-", "_") + "_unsupported", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Optional[str], typer.Option(flag, hidden=True, callback=_refuse(flag))])
    for flag in MLX_LM_ONLY
]


def knob_flag(name: str, default: Any = None) -> inspect.Parameter:
    """The command-line parameter of the generation knob `name` (see the module docstring)."""
    spec = GENERATION_KNOBS[name]
    flag = spec.flag or "--" + name.replace("_", "-")
    short = (SHORT_FLAGS[name],) if name in SHORT_FLAGS else ()
    if spec.kind is bool:
        option = typer.Option(f"{flag}/--no-{flag[2:]}", help=spec.help)
        annotation = Annotated[bool, option]
        default = bool(default)
    else:
        kind = Optional[int] if spec.kind is int else Optional[float]
        # A command's own default replaces the knob's "(default: ...)" (typer shows the value).
        help_text = spec.help if default is None else spec.help.split(" (default")[0].rstrip(".") + "."
        annotation = Annotated[kind, typer.Option(flag, *short, help=help_text, callback=_checked(name, spec))]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# Fast mode's flags: the path (`--fast/--exact`; fast mode is the default of the commands that
# take these flags), the two techniques whose best setting depends on the model and the machine,
# and the bound window that long free-choice text needs (docs/fast-mode.md); the others are
# switched in Python, `FastOptions`.
_FAST = FastOptions()
FAST_FLAGS = [
    inspect.Parameter("fast", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=Annotated[bool, typer.Option(
        "--fast/--exact", help="Fast mode (settled positions frozen, live rows only; within a few prompts of the "
                               "exact path on every measured task: docs/fast-mode.md) or the exact reference "
                               "sampler, token for token.")]),
    inspect.Parameter("fast_commit_gap", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[float], typer.Option("--fast-commit-gap", min=0, callback=lambda v: v if v is None else _finite(v),
                                      help="Fast mode: commit a canvas once every live position's top-2 gap of "
                                           f"logits reaches this (0: off; default {_FAST.commit_gap:g}, measured on "
                                           "the demo model and the many-step instrument: measure it on yours).")]),
    inspect.Parameter("fast_eos_tail", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[bool], typer.Option("--fast-eos-tail/--no-fast-eos-tail",
                                     help="Fast mode: freeze a certain end-of-text tail right after the step that "
                                          "predicts it (default on).")]),
    inspect.Parameter("fast_bound_window", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[int], typer.Option("--fast-bound-window", min=0, max=MAX_BOUND_WINDOW,
                                    help="Fast mode: frozen positions this close to a live one are recomputed, "
                                         "count in the entropy bound and are renoised when it rejects them, as on "
                                         "the exact path; frozen positions with stale K/V are refreshed (default "
                                         f"{_FAST.bound_window}; 0: off, which with --fast-commit-gap 1.5 is the "
                                         "setting tuned on tasks that settle in a few steps: faster there, but it "
                                         "loses long free-choice answers: docs/fast-mode.md).")]),
]


def _finite(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def fast_options(fast: bool, commit_gap: float | None, eos_tail: bool | None,
                 bound_window: int | None = None) -> FastOptions | None:
    """The FastOptions the fast-mode flags ask for (None: the exact path, `--exact`); the
    technique flags apply to fast mode only."""
    if not fast:
        if commit_gap is not None or eos_tail is not None or bound_window is not None:
            raise ValueError("--fast-commit-gap, --fast-eos-tail and --fast-bound-window apply to fast mode, "
                             "not to --exact")
        return None
    options = FastOptions()
    if commit_gap is not None:
        options = replace(options, commit_gap=commit_gap or None)
    if eos_tail is False:
        options = replace(options, eos_tail_gap=None)
    if bound_window is not None:  # the window, its thaw and the refresh go together: each alone did worse
        on = bound_window > 0
        options = replace(options, bound_window=bound_window or None, thaw=on, refresh_frozen=on)
    return options


def generation_flags(*names: str, fast: bool = False, **defaults: Any):
    """Give a command the flags of the generation knobs `names` (and, with `fast`, fast mode's);
    the command is called with `options=GenerationOptions(...)` built from them, checked (a pair
    that does not go together, such as t_max <= t_min, is an `error:` line and exit 1).
    `defaults` are the command's own defaults for some knobs (`max_tokens=1024`)."""
    sampler_keys = set(GenerationOptions.__dataclass_fields__["sampler"].default.__dataclass_fields__)

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "options"]
        added = [knob_flag(n, defaults.get(n)) for n in names] + (FAST_FLAGS if fast else []) + MLX_LM_ONLY_FLAGS

        @functools.wraps(command)
        def wrapper(**kwargs):
            for p in MLX_LM_ONLY_FLAGS:  # refused by their callbacks when given
                kwargs.pop(p.name)
            knobs = {n: kwargs.pop(n) for n in names}
            path = [kwargs.pop(p.name) for p in FAST_FLAGS] if fast else None
            with handle_errors(kwargs.get("debug", False)):
                # A command without fast mode's flags (the canvas verbs) runs the exact path.
                techniques = fast_options(*path) if path else None
                sampler = {k: knobs.pop(k) for k in list(knobs) if k in sampler_keys and knobs[k] is not None}
                options = GenerationOptions.from_kwargs(**{k: v for k, v in knobs.items() if v is not None},
                                                        **sampler, mode="exact" if techniques is None else "fast",
                                                        fast=techniques)
            return command(options=options, **kwargs)

        parameters = own + added
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
