"""Every generation knob, declared once with its range and help, and validated in one place.

`GenerationOptions` holds what a caller may set for one generation: the reply length, the seed,
thinking, the sampler's six knobs (`SamplerOptions`, `None` meaning "the checkpoint's
generation_config.json"), fast mode (`FastOptions`, None for the exact reference path) and the
engine's performance knobs. Each field's metadata (`Knob`) carries its help and its bounds: the
command line derives its flags from it (as mlx-lm derives its flags from `TrainingArgs`), the
server and the chat's slash commands check request values with `check_knob`, and every value is
checked again when an options object is built. One seed range, one source of fresh seeds, one
place for the step bounds.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..model.args import PREFILL_CHUNK, GenerationDefaults

MAX_STEPS = 1024  # denoising steps per block, and steps of history for the stop test
MAX_BLOCKS = 4096  # canvases per reply (the noise keys are split this many ways)
SEED_MAX = 2**64 - 1  # what `mx.random.key` takes
MAX_TOP_K = 4096
MAX_BOUND_WINDOW = 256  # the released canvas: a wider window already reaches every frozen position


class KnobError(ValueError):
    """A knob's value is out of its range or of the wrong type; `name` says which knob."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Knob:
    """What a knob takes: `kind` int, float or bool; `low` / `high` inclusive bounds, `above` an
    exclusive lower bound; floats are always finite. `flag` names the command-line flag
    (`--steps` for `max_denoising_steps`), `help` its help text. `takes`, when given, words what
    the knob takes for every refusal (the seed's bounds read badly as numbers)."""

    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    above: float | None = None
    flag: str | None = None
    takes: str | None = None


def knob(default: Any, kind: type, help: str, **bounds: Any) -> Any:
    """A dataclass field with its `Knob` (see the module docstring)."""
    return field(default=default, metadata={"knob": Knob(kind, help, **bounds)})


def check_knob(name: str, value: Any, spec: Knob) -> Any:
    """`value` checked against `spec` (None passes: "the default"); returns it as `spec.kind`."""
    if value is None:
        return None
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise KnobError(name, f"{name} must be true or false, got {value!r}")
        return value

    def refused(what: str) -> KnobError:
        return KnobError(name, f"{name} must be {spec.takes or what}, got {value!r}")

    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise refused("a whole number")
        value = int(value)
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise refused("a finite number")
        value = float(value)
    low, high = spec.low, spec.high
    if spec.takes is not None and not ((low is None or value >= low) and (high is None or value <= high)):
        raise refused(spec.takes)
    if low is not None and high is not None and not low <= value <= high:
        raise KnobError(name, f"{name} must be between {low:g} and {high:g}")
    if low is not None and high is None and value < low:
        bound = "at least" if spec.kind is int else ">="
        raise KnobError(name, f"{name} must be {bound} {low:g}, got {value:g}")
    if spec.above is not None and value <= spec.above:
        raise KnobError(name, f"{name} must be > {spec.above:g}")
    return value


def knobs(cls) -> dict[str, Knob]:
    """The knobs a dataclass declares, by field name."""
    return {f.name: f.metadata["knob"] for f in fields(cls) if "knob" in f.metadata}


def _check_fields(obj) -> None:
    for name, spec in knobs(type(obj)).items():
        object.__setattr__(obj, name, check_knob(name, getattr(obj, name), spec))


def check_seed(seed: Any) -> int:
    """A seed is a whole number in [0, 2**64 - 1] (what `mx.random.key` takes)."""
    spec = GENERATION_KNOBS["seed"]
    if seed is None:
        raise KnobError("seed", f"seed must be {spec.takes}, got None")
    return check_knob("seed", seed, spec)


def fresh_seed() -> int:
    """A new random seed, for a generation that was given none (it is recorded in the result)."""
    return int.from_bytes(os.urandom(4), "little")


@dataclass(frozen=True)
class SamplerOptions:
    """The reference sampler's knobs; `None` means "the checkpoint's default" (generation_config.json).

    The checks follow the reference (`DiffusionGemmaGenerationConfig.validate`): t_min >= 0,
    t_max > t_min (t_min = 0 is fine: every step's temperature is then still > 0). Beyond it: every
    value must be a finite number (an infinite temperature turns every distribution uniform and the
    reply into noise), and the step counts are bounded. `confidence_threshold` may be any finite
    number (<= 0: the adaptive stop never fires)."""

    max_denoising_steps: int | None = knob(None, int, "Max denoising steps per block (default: the checkpoint's).",
                                           low=1, high=MAX_STEPS, flag="--steps")
    entropy_bound: float | None = knob(None, float, "Sampler: entropy budget accepted per step.", above=0)
    t_min: float | None = knob(None, float, "Sampler: final temperature (>= 0, below --t-max).", low=0)
    t_max: float | None = knob(None, float, "Sampler: first temperature.", above=0)
    stability_threshold: int | None = knob(None, int, "Sampler: steps the draft must stay unchanged to stop.",
                                           low=0, high=MAX_STEPS)
    confidence_threshold: float | None = knob(None, float,
                                              "Sampler: mean entropy under which a stable block stops.")

    def __post_init__(self):
        _check_fields(self)
        if self.t_min is not None and self.t_max is not None:
            _check_temperatures(self.t_min, self.t_max)

    def resolve(self, defaults: GenerationDefaults) -> "SamplerOptions":
        """Every `None` filled from the checkpoint's defaults, and the pair of temperatures checked."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: (v if v is not None else getattr(defaults, k)) for k, v in out.items()}
        return SamplerOptions(**out)


def _check_temperatures(t_min: float, t_max: float) -> None:
    if t_max <= t_min:
        raise ValueError(f"t_max must be greater than t_min (got t_max {t_max}, t_min {t_min})")


@dataclass(frozen=True)
class FastOptions:
    """Which fast-mode techniques are on (`diffusion/fast.py`, docs/fast-mode.md). `FastOptions()`
    is fast mode as it runs by default: within a few prompts of the exact path on every family of
    the demo model and of the many-step instrument (long free-choice answers, 20-40 passes per
    canvas, as real text takes). `FastOptions.few_steps()` is the earlier setting, tuned where
    canvases settle in 2-6 steps; `FastOptions.none()` the fast loop computing the exact path."""

    freeze: bool = knob(True, bool, "Freeze settled positions: the decoder computes live rows only.")
    eos_stop: bool = knob(True, bool, "Drop the positions after a settled end token.")
    top_k: int | None = knob(64, int, "Sampler math on the top-k processed logits (None: the whole vocabulary).",
                             low=1, high=MAX_TOP_K)
    bucket: bool = knob(True, bool, "Pad the live rows to a few shapes (fewer compilations).")
    commit_gap: float | None = knob(3.0, float, "Commit a canvas once every live row's top-2 gap reaches this "
                                    "(None: off).", above=0)
    eos_tail_gap: float | None = knob(8.0, float, "Freeze a certain end-of-text tail at first sight (None: off).",
                                      above=0)
    stop_mean_over_canvas: bool = knob(True, bool, "The stop test's mean counts frozen positions as certain.")
    # The turbo engine's techniques (mlx-vlm's diffusion_turbo): measured on the many-step
    # instrument (docs/fast-mode.md), none paid alone at equal validity there; the refreshed
    # forward set is on with the bound window below (they were measured together).
    monotone: bool = knob(False, bool, "Monotone commit: a position the entropy bound accepts is frozen at once "
                          "at its sampled token.")
    refresh_frozen: bool = knob(True, bool, "Positions frozen at a token their K/V were not computed from run "
                                "once more (the turbo forward set: live plus just-frozen rows).")
    refresh_every: int | None = knob(None, int, "Every this many steps, every frozen position runs through the "
                                     "decoder once more, its logits discarded, so the live rows attend to fresh "
                                     "K/V (None: never).", low=1, high=MAX_STEPS)
    # What keeps long free-choice answers valid on the many-step instrument (docs/fast-mode.md):
    # without them frozen positions count as certain in the entropy bound, which then accepts
    # more positions per step than the exact path, side by side on locally plausible tokens.
    bound_window: int | None = knob(4, int, "Frozen positions within this distance of a live one run "
                                    "through the decoder at every step and count in the entropy bound with their "
                                    "current entropy, as held tokens do on the exact path (None: frozen positions "
                                    "count as certain).", low=1, high=MAX_BOUND_WINDOW)
    thaw: bool = knob(True, bool, "With bound_window: a frozen position the entropy bound does not accept is "
                      "live again, renoised, as a held token the bound rejects is on the exact path.")
    confidence_commit: float | None = knob(None, float, "Freeze a position at its argmax once its top "
                                           "probability reaches this (None: off).", low=0.0, high=1.0, above=0.0)
    confidence_commit_late: float | None = knob(None, float, "Two-stage threshold: the value used after "
                                                "--confidence-switch-step steps (None: the same).",
                                                low=0.0, high=1.0, above=0.0)
    confidence_switch_step: int = knob(8, int, "Steps that use the first confidence threshold.", low=1,
                                       high=MAX_STEPS)
    flush_after: int | None = knob(None, int, "Commit the draft (every live position at its argmax) after this "
                                   "many steps of a block (None: off).", low=1, high=MAX_STEPS)
    repair: bool = knob(False, bool, "A final decoder pass over the whole committed canvas, which then takes "
                        "its argmax (the turbo repair pass).")

    def __post_init__(self):
        _check_fields(self)
        if self.confidence_commit_late is not None and self.confidence_commit is None:
            raise ValueError("confidence_commit_late needs confidence_commit (the first stage's threshold)")
        if self.thaw and self.bound_window is None:
            raise ValueError("thaw needs bound_window (the frozen rows whose entropy the bound sees)")

    @classmethod
    def none(cls) -> "FastOptions":
        """Every technique off: the fast loop computing the exact path."""
        return cls(freeze=False, eos_stop=False, top_k=None, bucket=False, commit_gap=None, eos_tail_gap=None,
                   stop_mean_over_canvas=False, refresh_frozen=False, bound_window=None, thaw=False)

    @classmethod
    def few_steps(cls) -> "FastOptions":
        """The setting tuned on the demo model, whose canvases settle in 2-6 steps (the default
        before the many-step instrument): no bound window, an earlier commit. Faster there (2.2x
        the exact path's tokens/s against 1.8x), but on long free-choice answers it keeps none of
        50 valid where the exact path keeps 43 (docs/fast-mode.md)."""
        return cls(commit_gap=1.5, refresh_frozen=False, bound_window=None, thaw=False)

    def confidence_at(self, step: int) -> float | None:
        """The confidence threshold of 1-based `step` (the first stage up to `confidence_switch_step`)."""
        if self.confidence_commit is None or step <= self.confidence_switch_step:
            return self.confidence_commit
        return self.confidence_commit if self.confidence_commit_late is None else self.confidence_commit_late


# The user-facing names of the two paths ("exact" | "fast"), converted to `fast` once at each face.
# Fast mode is the default of every face that generates text (the CLI, the Python API, the
# server): within a few prompts of the exact path on every family of both instruments
# (docs/fast-mode.md). "exact" gives the reference sampler token for token.
MODES = ("exact", "fast")
DEFAULT_MODE = "fast"


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """Every knob of one generation (see the module docstring); built and checked once at each face."""

    max_tokens: int | None = knob(None, int, "Most tokens per reply (default: the checkpoint's max_new_tokens).",
                                  low=1)
    seed: int | None = knob(None, int, "Random seed, 0 to 2^64-1 (default: fresh each run).", low=0, high=SEED_MAX,
                            takes="a whole number from 0 to 2**64 - 1")
    thinking: bool = knob(False, bool, "Thinking mode (the chat template's enable_thinking).", flag="--think")
    sampler: SamplerOptions = SamplerOptions()
    fast: FastOptions | None = FastOptions()  # None: the exact reference sampler (mode "exact")
    # Read the stop decision from the device every k steps (1: every step, as the reference). With
    # k > 1, steps after a stop are computed with the block's state frozen on the device (as the
    # reference does for finished batch rows) and then discarded: identical tokens, 1/k host
    # synchronisations per step, up to k - 1 wasted decoder passes per block. The exact path only
    # (fast mode reads its live rows from the host at every step).
    stop_check_interval: int = knob(1, int, "Read the stop decision every k steps (same tokens).", low=1)
    # None: exact self-conditioning (softmax over the whole vocabulary @ E). k: the top-k
    # probabilities only, by an embedding gather (error bounded by the uncaptured mass).
    self_conditioning_top_k: int | None = knob(None, int, "Self-conditioning from the top-k probabilities only.",
                                               low=1)
    prefill_chunk: int = knob(PREFILL_CHUNK, int, "Prompt rows encoded per encoder call.", low=1)

    def __post_init__(self):
        _check_fields(self)
        if not isinstance(self.sampler, SamplerOptions):
            raise TypeError(f"sampler must be a SamplerOptions, got {type(self.sampler).__name__}")
        if self.fast is not None and not isinstance(self.fast, FastOptions):
            raise TypeError(f"fast must be a FastOptions (or None for the exact path), got {self.fast!r}")
        if self.fast is not None and (self.stop_check_interval != 1 or self.self_conditioning_top_k is not None):
            # Fast mode reads its live rows every step and sets its own self-conditioning
            # (FastOptions.top_k): refused rather than silently ignored.
            raise ValueError("stop_check_interval and self_conditioning_top_k apply to the exact path: "
                             "add mode='exact' (fast mode is the default)")

    @property
    def mode(self) -> str:
        return "exact" if self.fast is None else "fast"

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "GenerationOptions":
        """Options from the flat keywords the Python API takes: the fields above, the sampler's
        knobs by name, and `mode` ("exact" | "fast", default `DEFAULT_MODE`; in fast mode `fast`
        may give the techniques, default `FastOptions()`). Anything else is a TypeError."""
        kwargs = dict(kwargs)
        mode = kwargs.pop("mode", None)
        fast = kwargs.pop("fast", None)
        if mode is not None and mode not in MODES:
            raise KnobError("mode", f"mode must be 'exact' or 'fast', got {mode!r}")
        if (mode or DEFAULT_MODE) == "fast" or (mode is None and fast is not None):
            fast = fast if fast is not None else FastOptions()
        else:
            fast = None
        sampler_keys = {f.name for f in fields(SamplerOptions)}
        sampler = {k: kwargs.pop(k) for k in list(kwargs) if k in sampler_keys}
        own = {f.name for f in fields(cls)} - {"sampler", "fast"}
        unknown = sorted(set(kwargs) - own)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}")
        return cls(sampler=SamplerOptions(**sampler), fast=fast, **kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        """The flat keywords `from_kwargs` takes back (sampler knobs by name, `mode` and `fast`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sampler", "fast")}
        out.update({f.name: getattr(self.sampler, f.name) for f in fields(SamplerOptions)})
        return out | {"mode": self.mode, "fast": self.fast}

    def updated(self, **changes: Any) -> "GenerationOptions":
        """A copy with some options changed, given as `from_kwargs` takes them; a new `fast`
        alone switches fast mode on, `mode="fast"` alone keeps the techniques already chosen."""
        base = self.as_kwargs()
        if "fast" in changes and "mode" not in changes:
            base.pop("mode")
        return GenerationOptions.from_kwargs(**{**base, **changes})


GENERATION_KNOBS = {**knobs(GenerationOptions), **knobs(SamplerOptions)}
"""Every knob of `GenerationOptions` and `SamplerOptions` by name, for the faces that check one value
(fast mode's techniques are set as a whole `FastOptions`, which checks its own)."""
