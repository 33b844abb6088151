"""The Python API: `stream_generate`, `generate` and `ChatSession` (multi-turn with a kept cache).

Library code never prints; run these on a worker thread in an app (see docs/python-api.md).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import mlx.core as mx

from .engine import Request, SamplerOptions, run
from .events import BlockEvent, GenerationResult, StepEvent
from .processor import ImageError, ProcessedImage, expand_image_tokens
from .timelimit import time_limit

Event = StepEvent | BlockEvent | GenerationResult
Messages = Sequence[dict[str, Any]]

_SAMPLER_KEYS = {f for f in SamplerOptions.__dataclass_fields__}

# Longest a chat template may take to render (the Gemma 4 template takes milliseconds).
TEMPLATE_TIME_LIMIT = 10.0


def render_messages(tokenizer, messages: Messages, thinking: bool = False) -> list[int]:
    """Token ids of a conversation with the generation prompt, through the checkpoint's template."""
    if getattr(tokenizer, "chat_template", None) is None:
        text = "\n".join(str(m.get("content", "")) for m in messages)
        return list(tokenizer.encode(text))
    with time_limit(TEMPLATE_TIME_LIMIT, "rendering the chat template"):
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, enable_thinking=thinking
        )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def prompt_ids(tokenizer, prompt: str | Messages | Sequence[int] | mx.array, thinking: bool = False) -> list[int]:
    """A string is one user message; a list of dicts is a conversation; ids are used as given."""
    if isinstance(prompt, mx.array):
        return [int(i) for i in prompt.reshape(-1).tolist()]
    if isinstance(prompt, str):
        return render_messages(tokenizer, [{"role": "user", "content": prompt}], thinking)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return render_messages(tokenizer, prompt, thinking)
    return [int(i) for i in prompt]


def image_processor(model):
    """The model's image processor (`load` sets one from the checkpoint's files; a model built
    otherwise gets the vision config's patch sizes and the default budget), or ImageError."""
    processor = getattr(model, "processor", None)
    if processor is None and getattr(model, "has_vision", False):
        from .processor import ImageProcessor

        v = model.args.vision
        processor = ImageProcessor(v.patch_size, v.pooling_kernel_size)
    if processor is None or not getattr(model, "has_vision", False):
        raise ImageError("this model has no vision tower (a text-only checkpoint, or loaded text-only); "
                         "it cannot read images")
    return processor


def _image_placeholder(model, tokenizer) -> str:
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
    (this runtime works offline)."""
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
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith(("http://", "https://")):
        raise ImageError(f"{url}: remote images are not fetched (offline runtime); download it and give the file")
    return url


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
    placeholder = _image_placeholder(model, tokenizer)
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


_REQUEST_KEYS = ("max_tokens", "seed", "prefill_chunk", "stop_check_interval", "self_conditioning_top_k",
                 "mode", "fast", "images")


def make_request(ids: list[int], options: dict[str, Any]) -> Request:
    """A Request from keyword options: request fields and sampler knobs; anything else is an error."""
    options = dict(options)
    fields = {k: options.pop(k) for k in _REQUEST_KEYS if k in options}
    sampler = SamplerOptions(**{k: options.pop(k) for k in list(options) if k in _SAMPLER_KEYS})
    if options:
        raise TypeError(f"unknown option(s): {', '.join(sorted(options))}")
    return Request(ids, sampler=sampler, **fields)


def default_max_tokens(model) -> int:
    """The checkpoint's `max_new_tokens` (generation_config.json), else the reference's 256."""
    return int(getattr(getattr(model, "generation", None), "max_new_tokens", 256) or 256)


def stream_generate(
    model,
    tokenizer,
    prompt: str | Messages | Sequence[int] | mx.array,
    *,
    max_tokens: int | None = None,
    seed: int | None = None,
    thinking: bool = False,
    prefill_chunk: int = 512,
    stop_check_interval: int = 1,
    self_conditioning_top_k: int | None = None,
    mode: str = "exact",
    fast: Any = None,
    images: Sequence[Any] | None = None,
    **sampler_options: Any,
) -> Iterator[Event]:
    """Generate and yield a `StepEvent` per denoising step, a `BlockEvent` per committed block and
    finally one `GenerationResult`. Sampler knobs (`max_denoising_steps`, `entropy_bound`,
    `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`) override the checkpoint's
    generation_config.json for this call. `stop_check_interval` k > 1 reads the stop decision
    every k steps (same tokens, fewer host synchronisations, up to k - 1 wasted passes per
    block); `self_conditioning_top_k` selects the cheaper approximate self-conditioning.
    `mode="fast"` computes fewer decoder rows per committed token (see `fast.py`; `fast` takes a
    `FastOptions` to switch its techniques one by one); `mode="exact"` is the reference sampler.
    `images` (file paths, bytes, PIL images or uint8 arrays) go at the start of the user
    message; messages may also carry `{"type": "image", "image": ...}` content parts. Bad images
    raise `ImageError` before any model work. `max_tokens` defaults to the checkpoint's
    `max_new_tokens` (256 when it has none). Close the generator to cancel."""
    if max_tokens is None:
        max_tokens = default_max_tokens(model)
    ids, processed = prepare_prompt(model, tokenizer, prompt, thinking, images)
    request = make_request(ids, dict(
        sampler_options, max_tokens=max_tokens, seed=seed, prefill_chunk=prefill_chunk,
        stop_check_interval=stop_check_interval, self_conditioning_top_k=self_conditioning_top_k,
        mode=mode, fast=fast, images=processed))
    yield from run(model, request, decode=tokenizer.decode, detokenizer=tokenizer.detokenizer)


def generate(model, tokenizer, prompt, **options: Any) -> GenerationResult:
    """`stream_generate` run to the end; returns the final result."""
    result = None
    for event in stream_generate(model, tokenizer, prompt, **options):
        if isinstance(event, GenerationResult):
            result = event
    return result


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """A conversation that keeps the encoder's KV cache across turns.

    Each turn renders the whole history with the chat template, finds the longest common prefix
    with the tokens the cache holds, and encodes only what is new (the previous reply's last
    block, which is never encoded during generation, and the new user turn). If the history no
    longer extends the cached tokens (an edited history, or a template that re-renders earlier
    turns differently), the cache is rebuilt from scratch: sliding-window layers cannot be rewound.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, thinking: bool = False,
                 max_tokens: int | None = None, seed: int | None = None, **sampler_options: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.thinking = thinking
        self.max_tokens = default_max_tokens(model) if max_tokens is None else max_tokens
        self.seed = seed
        self.sampler_options = dict(sampler_options)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.cache = None
        self.cached_ids: list[int] = []
        self.cached_images: list[str] = []  # digests of the images the cache holds, in order
        self.last_result: GenerationResult | None = None

    def stream(self, message: str, images: Sequence[Any] | None = None, **options: Any) -> Iterator[Event]:
        """Send a user message (with optional `images`: paths, bytes, PIL images or arrays);
        yields the turn's events. The reply joins the history only when the turn completes
        (closing the generator early leaves the history as it was). Images are checked before
        any model work; earlier turns' images stay in the conversation."""
        merged = {"max_tokens": self.max_tokens, "seed": self.seed, **self.sampler_options, **options}
        thinking = merged.pop("thinking", self.thinking)
        turn: dict[str, Any] = {"role": "user", "content": message}
        if images:
            turn["images"] = image_processor(self.model).process_all(list(images))  # decoded once, kept for re-encoding
        history = self.messages + [turn]
        full, processed = prepare_prompt(self.model, self.tokenizer, history, thinking)
        keep = _common_prefix(self.cached_ids, full)
        digests = [p.digest for p in processed]
        held = len(self.cached_images)
        if (self.cache is None or keep < len(self.cached_ids) or keep == len(full)
                or digests[:held] != self.cached_images):
            cache, new_ids, base, new_images = None, full, [], processed
        else:
            cache, new_ids, base, new_images = self.cache.copy(), full[keep:], self.cached_ids, processed[held:]
        merged["images"] = new_images
        request = make_request(new_ids, merged)
        # Work on a fork so that a cancelled turn leaves the session's cache as it was.
        work_cache = cache if cache is not None else self.model.make_cache()
        for event in run(self.model, request, cache=work_cache, decode=self.tokenizer.decode,
                         detokenizer=self.tokenizer.detokenizer):
            if isinstance(event, GenerationResult):
                # The turn is complete: record it before handing the result out, so a caller that
                # stops reading at the result still has the reply in the history. The cache holds
                # the prompt and every committed canvas but the last.
                encoded = [t for canvas in event.extra["encoded_canvases"] for t in canvas]
                self.cache = work_cache
                self.cached_ids = list(base) + list(new_ids) + encoded
                self.cached_images = digests
                self.messages = history + [{"role": "assistant", "content": event.text}]
                self.last_result = event
            yield event

    def send(self, message: str, images: Sequence[Any] | None = None, **options: Any) -> GenerationResult:
        for event in self.stream(message, images, **options):
            pass
        return self.last_result
