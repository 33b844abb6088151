"""mlx-diffusiongemma: Google's DiffusionGemma block-diffusion LM on Apple silicon with MLX.

    from mlx_diffusiongemma import load, stream_generate
    model, tokenizer = load("mlx-community/diffusiongemma-26B-A4B-it-4bit")
    for event in stream_generate(model, tokenizer, "Why is the sky blue?"):
        ...

The package's wings and the rules between them are mapped in docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The public names and the module of each, imported on first use (PEP 562): `dgemma --help`,
# `--version` and every error found before a model is loaded do not pay for importing MLX's
# model stack, mlx-lm and transformers (docs/performance.md, "Start-up").
_EXPORTS = {
    ".api": ("ChatSession", "generate", "load", "stream_generate"),
    ".diffusion.events": ("BlockEvent", "GenerationResult", "StepEvent"),
    ".diffusion.noise": ("NoiseSource",),
    ".diffusion.options": ("FastOptions", "GenerationOptions", "SamplerOptions"),
    ".editing.complete": ("complete", "stream_complete"),
    ".editing.edit": ("edit", "stream_edit"),
    ".editing.infill": ("InfillResult", "infill", "stream_infill"),
    ".editing.schema": ("fill_json", "stream_fill_json"),
    ".editing.score": ("ScoreResult", "score"),
    ".editing.template": ("TemplateError",),
    ".errors": ("CheckpointError", "ContextLengthError", "DiffusionGemmaError", "NumericalError"),
    ".prompts.channels": ("split_thinking",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # for editors and type checkers: the names as plain imports
    from .api import ChatSession, generate, load, stream_generate  # noqa: F401
    from .diffusion.events import BlockEvent, GenerationResult, StepEvent  # noqa: F401
    from .diffusion.noise import NoiseSource  # noqa: F401
    from .diffusion.options import FastOptions, GenerationOptions, SamplerOptions  # noqa: F401
    from .editing.complete import complete, stream_complete  # noqa: F401
    from .editing.edit import edit, stream_edit  # noqa: F401
    from .editing.infill import InfillResult, infill, stream_infill  # noqa: F401
    from .editing.schema import fill_json, stream_fill_json  # noqa: F401
    from .editing.score import ScoreResult, score  # noqa: F401
    from .editing.template import TemplateError  # noqa: F401
    from .errors import CheckpointError, ContextLengthError, DiffusionGemmaError, NumericalError  # noqa: F401
    from .prompts.channels import split_thinking  # noqa: F401


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__version__ = "0.1.0"

__all__ = [
    "load", "generate", "stream_generate", "ChatSession",
    "complete", "stream_complete", "infill", "stream_infill", "fill_json", "stream_fill_json", "edit", "stream_edit", "score",
    "InfillResult", "ScoreResult", "TemplateError",
    "StepEvent", "BlockEvent", "GenerationResult", "split_thinking",
    "SamplerOptions", "NoiseSource", "FastOptions", "GenerationOptions",
    "DiffusionGemmaError", "CheckpointError", "ContextLengthError", "NumericalError",
]
