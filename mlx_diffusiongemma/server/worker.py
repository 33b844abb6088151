"""The engine's one thread: a bounded queue of jobs, served fairly, one denoising step at a time.

The HTTP side (an asyncio event loop) never touches MLX. It submits a `Job` and reads plain
Python items from the job's asyncio queue; this thread runs every job's engine generator and
hands items over with `call_soon_threadsafe`.

Scheduling (fair queuing, not batching): up to `max_active` jobs are admitted in arrival order;
each round advances every admitted job by one unit of work (one prefill chunk or one denoising
step), so a long reply never starves a short one and every client sees its blocks condense at
the same pace. A job whose client went away is closed at its next turn (its generator is closed,
which stops the engine mid-block). More than `max_queue` jobs waiting: `QueueFull` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import mlx.core as mx

from ..engine import Request, run
from ..events import BlockEvent, GenerationResult, StepEvent
from .prompt_cache import PromptCacheStore
from .protocol import Params

log = logging.getLogger("mlx_diffusiongemma.server")

PREFILL_CHUNK = 512


class QueueFull(Exception):
    pass


@dataclass(eq=False)  # identity: a job is one request
class Job:
    params: Params
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class TokenLabels:
    """Token id -> its text alone, for the drafts stream (cached: drafts repeat tokens)."""

    def __init__(self, tokenizer, eos_ids):
        self._decode = tokenizer.decode
        self._eos = set(eos_ids)
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        label = self._cache.get(token)
        if label is None:
            label = self._cache[token] = "" if token in self._eos else self._decode([token])
        return label


class Worker:
    def __init__(self, model, tokenizer, *, max_active: int = 4, max_queue: int = 16,
                 prompt_cache_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.max_active = max(1, max_active)
        self.max_queue = max(0, max_queue)
        self.store = PromptCacheStore(prompt_cache_size)
        self.eos_ids = tuple(model.generation.eos_token_ids)
        self.labels = TokenLabels(tokenizer, self.eos_ids)
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[tuple[Job, Iterator]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)

    # -- called from the event loop --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue and len(self._active) >= self.max_active:
                raise QueueFull(f"{len(self._pending)} requests are waiting; try again later")
            self._pending.append(job)
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            waiting, active = len(self._pending), len(self._active)
        return {"active": active, "waiting": waiting, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed,
                "prompt_cache": {"entries": len(self.store), "hits": self.store.hits,
                                 "reused_tokens": self.store.reused_tokens}}

    # -- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        # MLX streams belong to threads: this thread evaluates on a stream of its own.
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                while self._pending and len(self._active) < self.max_active:
                    job = self._pending.popleft()
                    self._active.append((job, self._job_items(job)))
                round_ = list(self._active)
            for entry in round_:
                self._advance(*entry)
        for job, items in self._active + [(j, None) for j in self._pending]:
            if items is not None:
                items.close()
            job.put(("error", RuntimeError("the server is shutting down")))

    def _advance(self, job: Job, items: Iterator) -> None:
        done = True
        try:
            if job.cancelled.is_set():
                self.cancelled += 1
                return
            item = next(items)
            done = False
            if item is not None:
                job.put(item)
        except StopIteration:
            self.completed += 1
        except Exception as e:  # a bug or an engine error: this request fails, the server goes on
            log.exception("generation failed")
            self.failed += 1
            job.put(("error", e))
        finally:
            if done:
                items.close()
                with self._cond:
                    self._active.remove((job, items))

    def _job_items(self, job: Job) -> Iterator[tuple[str, Any] | None]:
        """One job as a sequence of small units of work; yields items for the client (or None)."""
        p = job.params
        model = self.model
        ids = p.prompt_ids
        t0 = time.perf_counter()
        cache, cached = self.store.lookup(ids)
        if cache is None or cached == 0:
            cache, cached = model.make_cache(), 0
        new = ids[cached:]
        for start in range(0, len(new), PREFILL_CHUNK):
            model.extend(cache, new[start : start + PREFILL_CHUNK])
            yield None
        mx.eval(cache.state())
        self.store.insert(ids, cache)  # the snapshot after the prompt (see prompt_cache.py)
        yield ("prefill", {"prompt_tokens": len(ids), "cached_tokens": cached,
                           "prefill_time": time.perf_counter() - t0,
                           "queued_time": t0 - job.submitted})
        request = Request([], max_tokens=p.max_tokens, sampler=p.sampler, seed=p.seed)
        detok = self.tokenizer.detokenizer
        eos = set(self.eos_ids)
        events = run(model, request, cache=cache)
        try:
            for event in events:
                if isinstance(event, StepEvent):
                    yield ("draft", self._draft(event)) if p.include_drafts else None
                elif isinstance(event, BlockEvent):
                    for t in event.tokens:
                        if t not in eos:
                            detok.add_token(t)
                    yield ("text", {"text": detok.last_segment, "tokens": len(event.tokens),
                                    "block": event.block, "steps": event.steps, "reason": event.stop_reason})
                elif isinstance(event, GenerationResult):
                    detok.finalize()
                    tail = detok.last_segment
                    if tail:
                        yield ("text", {"text": tail, "tokens": 0})
                    encoded = [t for canvas in event.extra["encoded_canvases"] for t in canvas]
                    self.store.insert(list(ids) + encoded, cache)
                    yield ("done", {
                        "finish_reason": event.finish_reason,
                        "completion_tokens": len(event.tokens),
                        "steps_per_block": list(event.steps_per_block),
                        "tokens_per_forward": event.tokens_per_forward,
                        "generation_time": event.generation_time,
                        "generation_tps": event.generation_tps,
                        "seed": event.extra.get("seed"),
                    })
        finally:
            events.close()

    def _draft(self, event: StepEvent) -> dict[str, Any]:
        ids = event.argmax.tolist()
        return {"block": event.block, "step": event.step, "max_steps": event.max_steps,
                "pieces": [self.labels(t) for t in ids], "accepted": [int(a) for a in event.accepted.tolist()],
                "eos": [int(t in self.labels._eos) for t in ids], "mean_entropy": event.mean_entropy}
