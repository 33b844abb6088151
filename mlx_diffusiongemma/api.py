"""The Python face: `load`, `stream_generate`, `generate` and `ChatSession` (multi-turn with a kept cache).

Options are given as keywords (`max_tokens=`, `seed=`, the sampler's knobs by name, `mode=`, ...)
or as one `GenerationOptions` (`options=`); either way they are checked once, before any work.
Library code never prints; run these on a worker thread in an app (see docs/python-api.md).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx

from . import demo
from .checkpoint import loading
from .diffusion.engine import Request, run
from .diffusion.events import BlockEvent, GenerationResult, StepEvent
from .diffusion.options import GenerationOptions
from .prompts.images import image_processor, prepare_prompt
from .prompts.render import Messages

Event = StepEvent | BlockEvent | GenerationResult


# `wraps` gives `load` the loader's signature (help() and editors list its options); the
# docstring is replaced below, as this face also takes the demo models' names.
@functools.wraps(loading.load)
def load(path_or_repo: str | Path, **options: Any):
    source = demo.folder_for(path_or_repo) or path_or_repo
    return loading.load(source, **options)


load.__doc__ = """Load a DiffusionGemma checkpoint: `(model, tokenizer)`.

    `path_or_repo` is a local folder, a Hugging Face repo id (fetched into, or found in, the hub
    cache; `offline=True` uses the cache only), or a demo model's name: "demo" (the trained demo
    model shipped in the package) or "demo-random" (a tiny random model, built on first use).
    The other options are `checkpoint.loading.load`'s: `dtype`, `quantize` (a conversion recipe
    applied in memory to an unquantized checkpoint), `adapter_path` (fine-tuned adapters from
    `dgemma finetune`, mlx-lm's format), `text_only` (leave the vision tower out). The model
    carries `model.generation` (generation_config.json) and `model.source` (the resolved folder).
    """


def options_of(options: GenerationOptions | None, kwargs: dict[str, Any]) -> GenerationOptions:
    """One `GenerationOptions` from an options object and/or keywords (keywords win)."""
    if options is None:
        return GenerationOptions.from_kwargs(**kwargs)
    return options.updated(**kwargs) if kwargs else options


def stream_generate(
    model,
    tokenizer,
    prompt: str | Messages | Sequence[int] | mx.array,
    *,
    images: Sequence[Any] | None = None,
    options: GenerationOptions | None = None,
    **kwargs: Any,
) -> Iterator[Event]:
    """Generate and yield a `StepEvent` per denoising step, a `BlockEvent` per committed block and
    finally one `GenerationResult`.

    Options (see `GenerationOptions`): `max_tokens` (default: the checkpoint's `max_new_tokens`,
    256 when it has none), `seed`, `thinking`, the sampler's knobs (`max_denoising_steps`,
    `entropy_bound`, `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`: they
    override the checkpoint's generation_config.json for this call), `mode="fast"` (the default:
    fewer decoder rows per committed token, see docs/fast-mode.md; `fast` takes a `FastOptions`
    to switch its techniques one by one) or `mode="exact"` (the reference sampler, token for
    token), `prefill_chunk`; with `mode="exact"` also `stop_check_interval` (k > 1 reads the
    stop decision every k steps: same tokens, fewer host synchronisations, up to k - 1 wasted
    passes per block) and `self_conditioning_top_k` (the cheaper approximate self-conditioning),
    which fast mode refuses. An unknown option is a TypeError.
    `images` (file paths, bytes, PIL images or uint8 arrays) go at the start of the user
    message; messages may also carry `{"type": "image", "image": ...}` content parts. Bad images
    raise `ImageError` before any model work. Close the generator to cancel."""
    opts = options_of(options, kwargs)
    ids, processed = prepare_prompt(model, tokenizer, prompt, opts.thinking, images)
    yield from run(model, Request.of(ids, opts, images=processed), detokenizer=tokenizer.detokenizer)


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
    `options` (or keywords, as `stream_generate` takes them) apply to every turn; a turn may
    override some of them.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, options: GenerationOptions | None = None,
                 **kwargs: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.options = options_of(options, kwargs)
        self.reset()

    @property
    def thinking(self) -> bool:
        return self.options.thinking

    @thinking.setter
    def thinking(self, on: bool) -> None:
        self.options = self.options.updated(thinking=on)

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
        opts = self.options.updated(**options) if options else self.options
        turn: dict[str, Any] = {"role": "user", "content": message}
        if images:
            turn["images"] = image_processor(self.model).process_all(list(images))  # decoded once, kept for re-encoding
        history = self.messages + [turn]
        full, processed = prepare_prompt(self.model, self.tokenizer, history, opts.thinking)
        keep = _common_prefix(self.cached_ids, full)
        digests = [p.digest for p in processed]
        held = len(self.cached_images)
        if (self.cache is None or keep < len(self.cached_ids) or keep == len(full)
                or digests[:held] != self.cached_images):
            cache, new_ids, base, new_images = None, full, [], processed
        else:
            cache, new_ids, base, new_images = self.cache.copy(), full[keep:], self.cached_ids, processed[held:]
        request = Request.of(new_ids, opts, images=new_images)
        # Work on a fork so that a cancelled turn leaves the session's cache as it was.
        work_cache = cache if cache is not None else self.model.make_cache()
        for event in run(self.model, request, cache=work_cache, detokenizer=self.tokenizer.detokenizer):
            if isinstance(event, GenerationResult):
                # The turn is complete: record it before handing the result out, so a caller that
                # stops reading at the result still has the reply in the history. The cache holds
                # the prompt and every committed canvas but the last.
                encoded = [t for canvas in event.encoded_canvases for t in canvas]
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
