"""The Python API: `stream_generate`, `generate` and `ChatSession` (multi-turn with a kept cache).

Library code never prints; run these on a worker thread in an app (see docs/python-api.md).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import mlx.core as mx

from .engine import Request, SamplerOptions, run
from .events import BlockEvent, GenerationResult, StepEvent

Event = StepEvent | BlockEvent | GenerationResult
Messages = Sequence[dict[str, Any]]

_SAMPLER_KEYS = {f for f in SamplerOptions.__dataclass_fields__}


def render_messages(tokenizer, messages: Messages, thinking: bool = False) -> list[int]:
    """Token ids of a conversation with the generation prompt, through the checkpoint's template."""
    if getattr(tokenizer, "chat_template", None) is None:
        text = "\n".join(str(m.get("content", "")) for m in messages)
        return list(tokenizer.encode(text))
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


_REQUEST_KEYS = ("max_tokens", "seed", "prefill_chunk", "stop_check_interval", "self_conditioning_top_k",
                 "mode", "fast")


def make_request(ids: list[int], options: dict[str, Any]) -> Request:
    """A Request from keyword options: request fields and sampler knobs; anything else is an error."""
    options = dict(options)
    fields = {k: options.pop(k) for k in _REQUEST_KEYS if k in options}
    sampler = SamplerOptions(**{k: options.pop(k) for k in list(options) if k in _SAMPLER_KEYS})
    if options:
        raise TypeError(f"unknown option(s): {', '.join(sorted(options))}")
    return Request(ids, sampler=sampler, **fields)


def stream_generate(
    model,
    tokenizer,
    prompt: str | Messages | Sequence[int] | mx.array,
    *,
    max_tokens: int = 256,
    seed: int | None = None,
    thinking: bool = False,
    prefill_chunk: int = 512,
    stop_check_interval: int = 1,
    self_conditioning_top_k: int | None = None,
    mode: str = "exact",
    fast: Any = None,
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
    Close the generator to cancel."""
    request = make_request(prompt_ids(tokenizer, prompt, thinking), dict(
        sampler_options, max_tokens=max_tokens, seed=seed, prefill_chunk=prefill_chunk,
        stop_check_interval=stop_check_interval, self_conditioning_top_k=self_conditioning_top_k,
        mode=mode, fast=fast))
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
                 max_tokens: int = 256, seed: int | None = None, **sampler_options: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.thinking = thinking
        self.max_tokens = max_tokens
        self.seed = seed
        self.sampler_options = dict(sampler_options)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.cache = None
        self.cached_ids: list[int] = []
        self.last_result: GenerationResult | None = None

    def stream(self, message: str, **options: Any) -> Iterator[Event]:
        """Send a user message; yields the turn's events. The reply joins the history only when
        the turn completes (closing the generator early leaves the history as it was)."""
        merged = {"max_tokens": self.max_tokens, "seed": self.seed, **self.sampler_options, **options}
        thinking = merged.pop("thinking", self.thinking)
        history = self.messages + [{"role": "user", "content": message}]
        full = render_messages(self.tokenizer, history, thinking)
        keep = _common_prefix(self.cached_ids, full)
        if self.cache is None or keep < len(self.cached_ids) or keep == len(full):
            cache, new_ids, base = None, full, []
        else:
            cache, new_ids, base = self.cache.copy(), full[keep:], self.cached_ids
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
                self.messages = history + [{"role": "assistant", "content": event.text}]
                self.last_result = event
            yield event

    def send(self, message: str, **options: Any) -> GenerationResult:
        for event in self.stream(message, **options):
            pass
        return self.last_result
