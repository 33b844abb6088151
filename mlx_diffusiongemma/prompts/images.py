"""Images in prompts: image content parts and data URLs -> processed images, and the prompt's image
placeholders expanded to `<boi>` + soft tokens + `<eoi>`. Every image is decoded and checked here,
before any model work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from .processor import ImageError, ImageProcessor, ProcessedImage, expand_image_tokens
from .render import Messages, prompt_ids, render_messages


def image_processor(model) -> ImageProcessor:
    """The image processor of a model's vision tower (its patch and pooling sizes, the checkpoint's
    soft-token budget), or ImageError for a model without one."""
    if not model.has_vision:
        raise ImageError("this model has no vision tower (a text-only checkpoint, or loaded text-only); "
                         "it cannot read images")
    v = model.args.vision
    return ImageProcessor(v.patch_size, v.pooling_kernel_size, model.args.image_soft_tokens)


def image_placeholder(model, tokenizer) -> str:
    """The text of the image token (`<|image|>` in Gemma 4), which the chat template keeps and
    the tokenizer turns into the single id `config.image_token_id`."""
    token_id = model.args.image_token_id
    text = None
    try:
        text = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:  # an id outside the vocabulary, or a tokenizer without the method
        pass
    if not isinstance(text, str) or list(tokenizer.encode(text, add_special_tokens=False)) != [token_id]:
        raise ImageError(f"the tokenizer has no single token for the image token id {token_id}")
    return text


def _image_sources(part: dict) -> Any:
    """The image of a content part: {"type": "image", "image"|"path": X} or OpenAI's
    {"type": "image_url", "image_url": {"url": "data:..." | local path}}."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        return image_from_url(url)
    for key in ("image", "path", "url"):
        if key in part:
            value = part[key]
            return image_from_url(value) if key == "url" else value
    raise ImageError("an image part needs an 'image' (path, bytes, PIL image or array)")


def image_from_url(url: Any) -> Any:
    """A data URL -> its bytes; a file:// URL or plain string -> a path; remote URLs are refused
    (this runtime works offline).

    Local files are read: the Python API trusts its caller as it trusts `open()` (the server
    confines a client's path to its --image-dir before it calls this). A path that is not a readable file gets one message whatever the reason,
    so that an image URL does not tell which files exist."""
    import base64
    import binascii

    if not isinstance(url, str):
        return url
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise ImageError("data URLs of images must be base64-encoded")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the image data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise ImageError(f"{url}: remote images are not fetched (offline runtime); download it and give the file")
    path = Path(url.removeprefix("file://")).expanduser()
    try:
        readable = path.is_file() and os.access(path, os.R_OK)
    except (OSError, ValueError):  # a name too long, a NUL byte
        readable = False
    if not readable:
        raise ImageError("an image_url names no readable local image file (give a data: URL or a file path)")
    return str(path)


def split_images(messages: Messages, placeholder: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with string contents, each image replaced by `placeholder` where it stood (a
    message's `images` list goes before its text), and the images in prompt order."""
    out, images = [], []
    for m in messages:
        m = dict(m)
        text = "".join(placeholder for _ in m.get("images") or ())
        images += list(m.pop("images", None) or ())
        content = m.get("content", "")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, str):
                    text += part
                elif isinstance(part, dict) and part.get("type") == "text":
                    text += str(part.get("text", ""))
                elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                    text += placeholder
                    images.append(_image_sources(part))
                else:
                    raise ImageError(f"unsupported message content part {part!r:.60}")
        else:
            text += str(content)
        m["content"] = text
        out.append(m)
    return out, images


def prepare_prompt(model, tokenizer, prompt, thinking: bool = False,
                   images: Sequence[Any] | None = None) -> tuple[list[int], list[ProcessedImage]]:
    """Prompt ids with each image expanded to <boi> + soft tokens + <eoi>, and the processed
    images. `images` go at the start of the (last) user message; messages may also carry image
    content parts. Every image is decoded and checked here, before any model work."""
    images = list(images or [])
    if isinstance(prompt, mx.array):
        prompt = [int(i) for i in prompt.reshape(-1).tolist()]
    has_parts = (not isinstance(prompt, str) and len(prompt) > 0 and isinstance(prompt[0], dict)
                 and any(isinstance(m.get("content"), list) or m.get("images") for m in prompt))
    if not images and not has_parts:
        return prompt_ids(tokenizer, prompt, thinking), []
    processor = image_processor(model)
    if not isinstance(prompt, str) and not (len(prompt) and isinstance(prompt[0], dict)):
        processed = processor.process_all(images)
        return _expand(model, [int(i) for i in prompt], processed), processed
    placeholder = image_placeholder(model, tokenizer)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if images:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None:
            raise ImageError("images need a user message to go with")
        messages[last]["images"] = images + list(messages[last].get("images") or [])
    flat, sources = split_images(messages, placeholder)
    processed = processor.process_all(sources)
    ids = render_messages(tokenizer, flat, thinking)
    return _expand(model, ids, processed), processed


def _expand(model, ids: list[int], processed: list[ProcessedImage]) -> list[int]:
    a = model.args
    counts = [p.num_soft_tokens for p in processed]
    if sum(1 for t in ids if t == a.image_token_id) == sum(counts) and len(counts) != sum(counts):
        return ids  # already expanded by the caller
    return expand_image_tokens(ids, counts, a.image_token_id, a.boi_token_id, a.eoi_token_id)
