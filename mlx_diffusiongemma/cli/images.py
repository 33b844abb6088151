"""Image options of `dgemma generate` and `dgemma chat` (`--image`, `--text-only`, `/image`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mlx_diffusiongemma.prompts.processor import ImageError


def check_image_options(images: Sequence[Path] | None, text_only: bool) -> None:
    """Refuse contradictory options before the model is loaded."""
    if images and text_only:
        raise ImageError("--image needs the vision tower; drop --text-only")
    for path in images or ():
        if not Path(path).expanduser().is_file():
            raise ImageError(f"{path}: no such file")


def preprocess(model, images: Sequence[Path] | None) -> list:
    """Decode and prepare every image (raising ImageError on the first bad one) before any
    model work; a text-only model refuses them."""
    if not images:
        return []
    from mlx_diffusiongemma.prompts.images import image_processor

    return image_processor(model).process_all([str(Path(p).expanduser()) for p in images])
