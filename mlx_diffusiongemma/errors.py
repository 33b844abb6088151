"""Errors the user can act on. The CLI prints their message in one line and exits non-zero."""


class DiffusionGemmaError(Exception):
    """Base class for every error this package raises on bad input."""


class CheckpointError(DiffusionGemmaError):
    """A checkpoint folder is missing, incomplete, of another model, or inconsistent."""


class ContextLengthError(DiffusionGemmaError):
    """A request cannot fit the model's context."""


class NumericalError(DiffusionGemmaError):
    """The model produced NaN or infinite values (broken weights or an overflow)."""


class MemoryLimitError(ContextLengthError):
    """A checkpoint, or a request's context, needs more memory than this machine lets MLX use.
    A `ContextLengthError`: a request refused for its memory is refused like a too-long one."""
