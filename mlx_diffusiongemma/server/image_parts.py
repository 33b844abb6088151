"""Images in chat requests: OpenAI's `image_url` content parts (and `{"type": "image", ...}`).

Data URLs only by default; a local file only when the server runs with `--image-dir DIR` and
the path lies inside DIR (resolved, so `..` and links cannot leave it); a network URL never
(nothing is fetched). Each image is decoded and checked by the CLI's processor (the same size,
pixel and format limits: `prompts/processor.py`) before any model work; what fails is a 400.
An image part is replaced in its message by the image token's text, the conversation is rendered
as any other, and each image token is then expanded to `<boi>` + its soft tokens + `<eoi>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DiffusionGemmaError
from ..prompts.images import image_from_url, image_placeholder, image_processor
from ..prompts.processor import expand_image_tokens
from . import protocol as P

MAX_IMAGES = 16  # per request
IMAGE_PARTS = ("image_url", "image")


def take_images(body: dict, model, tokenizer, image_dir: str | None) -> list[Any]:
    """The request's image sources in prompt order; each image part of `body["messages"]` is
    replaced (in place) by a text part holding the image token. 400 for what cannot be used."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    sources: list[Any] = []
    placeholder = None
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in IMAGE_PARTS):
                continue
            where = f"messages[{i}].content[{j}]"
            if not model.has_vision:
                raise P.bad(f"{where}: this model has no vision tower; it cannot read images", param="messages")
            url = part.get("image_url") if part.get("type") == "image_url" else part.get("image")
            url = url.get("url") if isinstance(url, dict) else url
            sources.append(_source(url, where, image_dir))
            if placeholder is None:
                placeholder = _placeholder(model, tokenizer)
            content[j] = {"type": "text", "text": placeholder}
    if len(sources) > MAX_IMAGES:
        raise P.bad(f"{len(sources)} images; at most {MAX_IMAGES} per request", param="messages")
    return sources


def _placeholder(model, tokenizer) -> str:
    try:
        return image_placeholder(model, tokenizer)
    except DiffusionGemmaError as e:
        raise P.bad(str(e), param="messages") from None


def _source(url: Any, where: str, image_dir: str | None) -> Any:
    if not isinstance(url, str) or not url:
        raise P.bad(f"{where}: an image part needs a URL string (a data: URL)", param="messages")
    if url.startswith(("http://", "https://")):
        raise P.bad(f"{where}: images are not fetched from the network; send a data: URL", param="messages")
    if url.startswith("data:"):
        return _read(url, where)
    if image_dir is None:
        raise P.bad(f"{where}: local image files are refused (the server reads them only with --image-dir); "
                    "send a data: URL", param="messages")
    # Confined first, then read: a path is resolved inside --image-dir before anything looks at the
    # disk, so a client learns nothing about files elsewhere (not even whether they exist).
    local = url.removeprefix("file://")
    root = Path(image_dir).resolve()
    path = (root / local).resolve()
    if not path.is_relative_to(root):
        raise P.bad(f"{where}: {local!r} is outside the server's --image-dir", param="messages")
    return _read(str(path), where)


def _read(url: str, where: str) -> Any:
    """image_from_url's bytes (a data URL) or checked path, its refusal as a 400."""
    try:
        return image_from_url(url)
    except DiffusionGemmaError as e:
        raise P.bad(f"{where}: {e}", param="messages") from None


def process(model, ids: list[int], sources: list[Any]) -> tuple[list[int], list[Any]]:
    """Decode and check every image (on a threadpool thread), then expand the prompt's image tokens;
    (expanded ids, processed images). 400 for a bad image or a prompt whose image tokens do not
    match the images (an image token typed as text)."""
    try:
        processed = image_processor(model).process_all(sources)
    except DiffusionGemmaError as e:
        raise P.bad(f"an image cannot be used: {e}", param="messages") from None
    a = model.args
    if sum(1 for t in ids if t == a.image_token_id) != len(processed):
        raise P.bad("the prompt's image tokens do not match its images (is the image token typed as text?)",
                    param="messages")
    return expand_image_tokens(ids, [p.num_soft_tokens for p in processed], a.image_token_id, a.boi_token_id,
                               a.eoi_token_id), processed
