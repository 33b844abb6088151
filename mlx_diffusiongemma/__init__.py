"""mlx-diffusiongemma: Google's DiffusionGemma block-diffusion LM on Apple silicon with MLX.

    from mlx_diffusiongemma import load, stream_generate
    model, tokenizer = load("mlx-community/diffusiongemma-26B-A4B-it-4bit")
    for event in stream_generate(model, tokenizer, "Why is the sky blue?"):
        ...
"""

from .engine import NoiseSource, SamplerOptions
from .errors import CheckpointError, ContextLengthError, DiffusionGemmaError
from .fast import FastOptions
from .events import BlockEvent, GenerationResult, StepEvent, split_thinking
from .generate import ChatSession, generate, stream_generate
from .loading import load

__version__ = "0.1.0"

__all__ = [
    "load", "generate", "stream_generate", "ChatSession",
    "StepEvent", "BlockEvent", "GenerationResult", "split_thinking",
    "SamplerOptions", "NoiseSource", "FastOptions",
    "DiffusionGemmaError", "CheckpointError", "ContextLengthError",
]
