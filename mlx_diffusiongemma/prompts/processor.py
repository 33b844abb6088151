"""Images -> what the vision tower reads, as the reference Gemma 4 image processor does it.

The reference (transformers 5.23, `Gemma4ImageProcessorPil`): convert to RGB (transparency
composited onto white), resize with bicubic resampling to the largest size that keeps the aspect
ratio, fits the patch budget (`max_soft_tokens * k**2` patches of `patch_size` pixels) and has
sides divisible by `k * patch_size` (k = `pooling_kernel_size`), rescale to [0, 1] (no
normalisation: the tower maps to [-1, 1] itself), cut into row-major patches with (column, row)
position ids. Each image becomes `patches / k**2` soft tokens, written into the prompt as
`<boi>` + that many image tokens + `<eoi>`.

Decoding uses Pillow (the optional `vision` extra), for the formats of `IMAGE_FORMATS` only. Every
check happens here, before any model work: unreadable, truncated, empty, oversized (decompression
bombs included) or oddly typed images, and other formats, raise `ImageError` with a message that
names the image.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DiffusionGemmaError

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
# Bounds on what we agree to decode: a file size and a pixel count far above any photo or
# screenshot, far below what would exhaust memory (a decompression bomb is refused from its header).
MAX_FILE_BYTES = 64 * 2**20
MAX_PIXELS = 64_000_000
# The image formats decoded (Pillow's names). Pillow can open many more, some through external
# programs (EPS and PS run Ghostscript) or with a long record of decoder bugs: only the formats
# photos, scans and screenshots come in. (Pillow opens many cameras' JPEGs as "MPO", through its
# JPEG decoder.)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Pillow modes whose conversion to RGB is well defined (others: 16/32-bit integer or float).
_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}

ImageInput = Any  # a path (str or Path), bytes, a PIL image, or a uint8 numpy / mlx array


class ImageError(DiffusionGemmaError):
    """An image cannot be used: not found, not an image, truncated, empty, too large, bad mode."""


@dataclass
class ProcessedImage:
    """One image ready for the tower: patches `[rows * cols, 3 * patch**2]` float32 in [0, 1]
    (row-major, each patch's pixels row by row, channels last) and their (column, row) ids."""

    pixel_values: np.ndarray
    position_ids: np.ndarray
    grid: tuple[int, int]  # (rows, cols) of patches
    num_soft_tokens: int
    source_size: tuple[int, int]  # (height, width) before resizing
    name: str = "image"
    digest: str = field(default="", repr=False)  # content hash: tells two images apart in a cache


def _require_pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImageError(
            "images need Pillow: pip install 'mlx-diffusiongemma[vision]' (or pip install pillow)"
        ) from None
    return Image


def aspect_preserving_size(height: int, width: int, patch_size: int, max_patches: int, kernel: int) -> tuple[int, int]:
    """The reference's target (height, width): the largest multiples of `kernel * patch_size`
    keeping the aspect ratio within `max_patches` patches; a side that would round to zero gets
    one unit and the other side follows the aspect ratio (capped)."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    unit = kernel * patch_size
    h = int(math.floor(factor * height / unit)) * unit
    w = int(math.floor(factor * width / unit)) * unit
    if h == 0 and w == 0:
        raise ImageError(f"a {height}x{width} image resizes to nothing")
    longest = (max_patches // kernel**2) * unit
    if h == 0:
        h, w = unit, min(int(math.floor(width / height)) * unit, longest)
    elif w == 0:
        w, h = unit, min(int(math.floor(height / width)) * unit, longest)
    if h * w > target_px:
        raise ImageError(f"a {height}x{width} image cannot fit {max_patches} patches of {patch_size} pixels")
    return h, w


class ImageProcessor:
    """Decode and prepare images for one model's vision tower."""

    def __init__(self, patch_size: int = 16, pooling_kernel_size: int = 3,
                 max_soft_tokens: int = DEFAULT_SOFT_TOKENS, max_pixels: int = MAX_PIXELS,
                 max_file_bytes: int = MAX_FILE_BYTES):
        if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
        self.patch_size = patch_size
        self.pooling_kernel_size = pooling_kernel_size
        self.max_soft_tokens = max_soft_tokens
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    # -- decoding ----------------------------------------------------------------------------
    def open(self, image: ImageInput, name: str | None = None):
        """A decoded RGB PIL image, or ImageError. Header checks (size, mode) come before decoding."""
        Image = _require_pil()
        from PIL import UnidentifiedImageError

        label = name or _label(image)
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, (str, os.PathLike)):
            path = Path(image).expanduser()
            if not path.exists():
                raise ImageError(f"{label}: no such file")
            if not path.is_file():
                raise ImageError(f"{label}: not a file")
            size = path.stat().st_size
            if size == 0:
                raise ImageError(f"{label}: empty file")
            if size > self.max_file_bytes:
                raise ImageError(f"{label}: {size / 2**20:.0f} MiB is over the {self.max_file_bytes // 2**20} MiB limit")
            image = path.read_bytes()
            pil = None
        elif isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) == 0:
                raise ImageError(f"{label}: empty data")
            if len(image) > self.max_file_bytes:
                raise ImageError(f"{label}: {len(image) / 2**20:.0f} MiB is over the {self.max_file_bytes // 2**20} MiB limit")
            pil = None
        else:
            return self._from_array(image, label)
        formats = ", ".join(IMAGE_FORMATS)
        bomb = f"{label}: too many pixels for an image (over {self.max_pixels:,}; a decompression bomb?)"
        # Pillow's decompression-bomb check warns from 89M pixels and raises from twice that, with
        # its own error type: both become ImageError (our limit, max_pixels, is lower anyway).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if pil is None:
                try:
                    pil = Image.open(io.BytesIO(bytes(image)), formats=IMAGE_FORMATS)
                except UnidentifiedImageError:
                    raise ImageError(f"{label}: not an image of a supported format ({formats})") from None
                except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                    raise ImageError(bomb) from None
                except (OSError, ValueError, SyntaxError) as e:
                    raise ImageError(f"{label}: cannot be read as an image ({e})") from None
            elif pil.format is not None and pil.format not in IMAGE_FORMATS + ("MPO",):
                raise ImageError(f"{label}: {pil.format} images are not decoded here (supported: {formats})")
            self._check_header(pil, label)
            try:
                pil.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageError(bomb) from None
            except (OSError, ValueError, SyntaxError) as e:
                raise ImageError(f"{label}: truncated or corrupt image data ({e})") from None
        return _to_rgb(pil)

    def _check_header(self, pil, label: str) -> None:
        w, h = pil.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{label}: zero-size image ({w}x{h})")
        if w * h > self.max_pixels:
            raise ImageError(f"{label}: {w}x{h} pixels is over the limit of {self.max_pixels:,} pixels")
        if pil.mode not in _MODES:
            raise ImageError(f"{label}: unsupported image mode {pil.mode!r} (use 8-bit RGB, RGBA, L or P)")

    def _from_array(self, image: Any, label: str):
        Image = _require_pil()
        if type(image).__module__.startswith("mlx"):
            image = np.array(image)
        if not isinstance(image, np.ndarray):
            raise ImageError(
                f"{label}: unsupported image type {type(image).__name__} "
                "(give a file path, bytes, a PIL image or a uint8 array)"
            )
        if image.dtype != np.uint8:
            raise ImageError(f"{label}: arrays must be uint8 (0-255), got {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ImageError(f"{label}: arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ImageError(f"{label}: zero-size image {image.shape}")
        if image.shape[0] * image.shape[1] > self.max_pixels:
            raise ImageError(f"{label}: {image.shape[1]}x{image.shape[0]} pixels is over the limit")
        mode = {2: "L", 3: "RGB", 4: "RGBA"}[image.ndim if image.ndim == 2 else image.shape[-1]]
        return _to_rgb(Image.fromarray(np.ascontiguousarray(image), mode=mode))

    # -- preparation ---------------------------------------------------------------------------
    def __call__(self, image: ImageInput, name: str | None = None) -> ProcessedImage:
        Image = _require_pil()
        label = name or _label(image)
        rgb = self.open(image, label)
        width, height = rgb.size
        p, k = self.patch_size, self.pooling_kernel_size
        th, tw = aspect_preserving_size(height, width, p, self.max_patches, k)
        if (th, tw) != (height, width):
            rgb = rgb.resize((tw, th), resample=Image.Resampling.BICUBIC)
        # Rescale as the reference does: float64 multiply, then float32.
        pixels = (np.asarray(rgb, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
        rows, cols = th // p, tw // p
        patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
        col, row = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        positions = np.stack([col, row], axis=-1).reshape(rows * cols, 2).astype(np.int32)
        digest = hashlib.sha256(np.ascontiguousarray(patches).tobytes()).hexdigest()[:32]
        return ProcessedImage(patches, positions, (rows, cols), rows * cols // k**2, (height, width), label, digest)

    def process_all(self, images: Sequence[ImageInput]) -> list[ProcessedImage]:
        """Every image prepared (and so checked) before the caller does any model work."""
        if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        return [img if isinstance(img, ProcessedImage) else self(img, _label(img, i))
                for i, img in enumerate(images)]


def _to_rgb(pil):
    """RGB, compositing any transparency onto white (as the reference's convert_to_rgb)."""
    Image = _require_pil()
    if "A" in pil.getbands() or pil.info.get("transparency") is not None:
        rgba = pil.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return pil.convert("RGB")


def _label(image: Any, index: int | None = None) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image {index + 1}" if index is not None else "image"


def expand_image_tokens(ids: Sequence[int], soft_tokens: Sequence[int], image_token_id: int,
                        boi_token_id: int, eoi_token_id: int) -> list[int]:
    """Replace the i-th image placeholder token in `ids` by `<boi>` + `soft_tokens[i]` image
    tokens + `<eoi>` (the reference processor's `replace_image_token`)."""
    slots = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(slots) != len(soft_tokens):
        raise ImageError(f"the prompt has {len(slots)} image placeholders for {len(soft_tokens)} images")
    out: list[int] = []
    it = iter(soft_tokens)
    for t in ids:
        if t == image_token_id:
            out += [boi_token_id] + [image_token_id] * next(it) + [eoi_token_id]
        else:
            out.append(int(t))
    return out
