"""mlx-diffusiongemma: Google's DiffusionGemma block-diffusion LM on Apple silicon with MLX.

    from mlx_diffusiongemma import load, stream_generate
    model, tokenizer = load("mlx-community/diffusiongemma-26B-A4B-it-4bit")
    for event in stream_generate(model, tokenizer, "Why is the sky blue?"):
        ...

The package's wings and the rules between them are mapped in docs/architecture.md.
"""

from .api import ChatSession, generate, load, stream_generate
from .diffusion.events import BlockEvent, GenerationResult, StepEvent
from .diffusion.noise import NoiseSource
from .diffusion.options import FastOptions, GenerationOptions, SamplerOptions
from .editing.complete import complete, stream_complete
from .editing.edit import edit, stream_edit
from .editing.infill import InfillResult, infill, stream_infill
from .editing.schema import fill_json, stream_fill_json
from .editing.score import ScoreResult, score
from .editing.template import TemplateError
from .errors import CheckpointError, ContextLengthError, DiffusionGemmaError, NumericalError
from .prompts.channels import split_thinking

__version__ = "0.1.0"

__all__ = [
    "load", "generate", "stream_generate", "ChatSession",
    "complete", "stream_complete", "infill", "stream_infill", "fill_json", "stream_fill_json", "edit", "stream_edit", "score",
    "InfillResult", "ScoreResult", "TemplateError",
    "StepEvent", "BlockEvent", "GenerationResult", "split_thinking",
    "SamplerOptions", "NoiseSource", "FastOptions", "GenerationOptions",
    "DiffusionGemmaError", "CheckpointError", "ContextLengthError", "NumericalError",
]
