"""mlx-diffusiongemma: Google's DiffusionGemma block-diffusion LM on Apple silicon with MLX.

    from mlx_diffusiongemma import load, stream_generate
    model, tokenizer = load("mlx-community/diffusiongemma-26B-A4B-it-4bit")
    for event in stream_generate(model, tokenizer, "Why is the sky blue?"):
        ...
"""

from .engine import NoiseSource, SamplerOptions
from .errors import CheckpointError, ContextLengthError, DiffusionGemmaError, NumericalError
from .fast import FastOptions
from .events import BlockEvent, GenerationResult, StepEvent, split_thinking
from .editing import (InfillResult, ScoreResult, edit, fill_json, infill, score, stream_edit, stream_fill_json,
                      stream_infill)
from .generate import ChatSession, generate, stream_generate
from .loading import load
from .template import TemplateError

__version__ = "0.1.0"

__all__ = [
    "load", "generate", "stream_generate", "ChatSession",
    "infill", "stream_infill", "fill_json", "stream_fill_json", "edit", "stream_edit", "score",
    "InfillResult", "ScoreResult", "TemplateError",
    "StepEvent", "BlockEvent", "GenerationResult", "split_thinking",
    "SamplerOptions", "NoiseSource", "FastOptions",
    "DiffusionGemmaError", "CheckpointError", "ContextLengthError", "NumericalError",
]
