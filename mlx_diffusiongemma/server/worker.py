"""The engine's one thread: a bounded queue of jobs, denoised together one step at a time.

The HTTP side (an asyncio event loop) never touches MLX. It submits a `Job` and reads plain
Python items from the job's asyncio queue; this thread runs every job's engine generator and
hands items over with `call_soon_threadsafe`.

Scheduling: up to `max_active` jobs are admitted in arrival order, each only while its memory
fits beside the running ones' (memory_budget.py; the prompt-cache store yields first). The rest
wait in order; more than `max_queue` waiting: `QueueFull`, HTTP 503. Each round advances every admitted job to its next
decoder pass (the engine runs with `external_decoder=True` and yields the pass it needs there);
the round's passes run through `block.run_calls`, which runs the exact path's whole-canvas
passes as ONE batched decoder pass and fast mode's passes (over each request's own live rows)
as another; each job gets its logits back. The sampler, stop test, commit and encoder passes
stay per request, in the engine's own code, so a request gives the same tokens alone or in a
batch. A job whose block stops simply leaves the round (no row is computed for it), a job still
prefilling takes one prompt chunk per round and joins when it is ready. A job whose client went
away is closed at its next turn (its generator is closed, which stops the engine mid-block).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import mlx.core as mx

from ..diffusion.block import DecoderCall, batches, run_calls
from ..diffusion.engine import Request, run
from ..diffusion.events import BlockEvent, GenerationResult, StepEvent
from ..prompts.labels import TokenLabels
from .in_canvas import PrefixStreamer
from .memory_budget import MemoryBudget
from .prompt_cache import PromptCacheStore
from .protocol import Params

log = logging.getLogger("mlx_diffusiongemma.server")


class QueueFull(Exception):
    pass


@dataclass(eq=False)  # identity: a job is one request
class Job:
    params: Params
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    reserved: int = 0  # bytes of the memory budget this job holds while it runs

    def put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class _Running:
    job: Job
    items: Iterator
    send: Any = None  # what to send into `items` next (the logits of its last decoder call)


class Worker:
    def __init__(self, model, tokenizer, *, max_active: int = 4, max_queue: int = 16,
                 prompt_cache_size: int = 8, prompt_cache_bytes: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_active = max(1, max_active)
        self.max_queue = max(0, max_queue)
        self.store = PromptCacheStore(prompt_cache_size, prompt_cache_bytes)
        self.budget = MemoryBudget(model, self.store)
        self._memory_wait: Job | None = None  # the queue's head while it waits for memory
        self.mlx_memory = {"active": 0, "peak": 0, "cache": 0}  # MLX's counters after the last round
        self.eos_ids = tuple(model.generation.eos_token_ids)
        self.labels = TokenLabels(tokenizer, self.eos_ids)  # the drafts stream's pieces
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[tuple[Job, Iterator]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.batch_sizes: dict[int, int] = {}  # decoder passes by number of requests in them
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
            full = len(self._active) >= self.max_active or self._memory_wait is not None
            if len(self._pending) >= self.max_queue and full:
                raise QueueFull(f"{len(self._pending)} requests are waiting; try again later")
            self._pending.append(job)
            self._cond.notify()

    def abort_all(self, error: Exception) -> None:
        """End every request now (the server is stopping): each gets `error` as its last item; the
        running ones are cancelled (the engine thread closes them at their next turn)."""
        with self._cond:
            jobs = [e.job for e in self._active] + list(self._pending)
            self._pending.clear()
        for job in jobs:
            job.cancel()
            job.put(("error", error))

    def stats(self) -> dict[str, Any]:
        with self._cond:
            waiting, active = len(self._pending), len(self._active)
        return {"active": active, "waiting": waiting, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed,
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "prompt_cache": {"entries": len(self.store), "hits": self.store.hits,
                                 "reused_tokens": self.store.reused_tokens, "evicted_for_memory": self.store.evicted},
                "memory": {**self.budget.stats(), "mlx": dict(self.mlx_memory)}}

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
                self._admit()
                round_ = list(self._active)
            self._round(round_)
            self.mlx_memory = {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(),
                               "cache": mx.get_cache_memory()}
        for entry in self._active:
            entry.items.close()
        for job in [e.job for e in self._active] + list(self._pending):
            job.put(("error", RuntimeError("the server is shutting down")))

    def _admit(self) -> None:
        """Admit queued jobs in order while there is a slot and their memory fits (the caller
        holds the lock); the first that does not fit waits at the head of the queue."""
        waiting, self._memory_wait = self._memory_wait, None
        while self._pending and len(self._active) < self.max_active:
            job = self._pending[0]
            if job.cancelled.is_set():  # its client left while it waited: it holds nobody up
                self._pending.popleft()
                self.cancelled += 1
                continue
            p = job.params
            cost = self.budget.cost(len(p.prompt_ids), p.max_tokens)
            if not self.budget.reserve(cost, alone=not self._active):
                if waiting is not job:
                    self.budget.waited += 1
                    log.info("a request waits for memory (%d bytes reserved, %d needed, %s available)",
                             self.budget.reserved, cost, self.budget.headroom)
                self._memory_wait = job
                return
            self._pending.popleft()
            job.reserved = cost
            self._active.append(_Running(job, self._job_items(job)))

    def _release(self, job: Job) -> None:
        """Give back the job's reservation (once: its generation is over or it left)."""
        with self._cond:
            self.budget.release(job.reserved)
            job.reserved = 0

    def _round(self, running: list["_Running"]) -> None:
        """Advance every job to its next decoder pass, then run the round's passes (at most two
        batched passes: the exact path's and fast mode's)."""
        calls: list[tuple[_Running, DecoderCall]] = []
        for entry in running:
            call = self._advance(entry)
            if call is not None:
                calls.append((entry, call))
        if not calls:
            return
        for batch in batches([c for _, c in calls]):
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        try:
            logits = run_calls(self.model, [c for _, c in calls])
        except Exception as e:
            log.exception("decoder pass failed")
            for entry, _ in calls:
                self._finish(entry, error=e)
            return
        for (entry, _), out in zip(calls, logits):
            entry.send = out

    def _advance(self, entry: "_Running") -> DecoderCall | None:
        """Run one job until it needs the decoder (returns the call) or has done one other unit
        of work (a prompt chunk) or finished; client items found on the way are handed over."""
        job = entry.job
        if job.cancelled.is_set():
            self.cancelled += 1
            self._finish(entry)
            return None
        try:
            item = entry.items.send(entry.send)
            entry.send = None
            while item is not None:
                if item[0] == "denoise":
                    return item[1]
                job.put(item)
                item = next(entry.items)
        except StopIteration:
            self.completed += 1
            self._finish(entry)
        except Exception as e:  # a bug or an engine error: this request fails, the server goes on
            log.exception("generation failed")
            self._finish(entry, error=e)
        return None

    def _finish(self, entry: "_Running", error: Exception | None = None) -> None:
        if error is not None:
            self.failed += 1
            entry.job.put(("error", error))
        entry.items.close()
        self._release(entry.job)
        with self._cond:
            self._active.remove(entry)

    def _job_items(self, job: Job) -> Iterator[tuple[str, Any] | None]:
        """One job as a generator: yields items for the client, ("denoise", call) where it needs
        a decoder pass (and receives the logits), and None after each prompt chunk (its turn ends)."""
        p = job.params
        model = self.model
        ids = p.prompt_ids
        t0 = time.perf_counter()
        # A prompt with images is encoded whole, with their features, and never shared through
        # the prompt cache (its image tokens' ids are the same whatever the image).
        cache, cached = (None, 0) if p.images else self.store.lookup(ids)
        if cache is None or cached == 0:
            cache, cached = model.make_cache(), 0
        new = ids[cached:]
        chunk = p.options.prefill_chunk
        if p.images:
            features = [model.encode_image(im.pixel_values, im.position_ids, im.grid) for im in p.images]
            model.extend(cache, new, chunk_size=chunk, image_features=features)
            yield None
        else:
            for start in range(0, len(new), chunk):
                model.extend(cache, new[start : start + chunk])
                yield None
        mx.eval(cache.state())
        if not p.images:
            self.budget.keep(ids, cache)  # the snapshot after the prompt (see prompt_cache.py)
        yield ("prefill", {"prompt_tokens": len(ids), "cached_tokens": cached,
                           "prefill_time": time.perf_counter() - t0,
                           "queued_time": t0 - job.submitted})
        plan = p.plan
        streamer = None
        if plan is not None:  # a canvas verb: its own canvases and hooks after the prompt
            request = dataclasses.replace(plan.request, prompt_ids=[])
        else:
            if p.in_canvas:
                streamer = PrefixStreamer(self.eos_ids, p.max_tokens, p.in_canvas_stability, p.in_canvas_max_entropy)
            request = Request.of([], p.options, hooks=(streamer,) if streamer else ())
        detok = self.tokenizer.detokenizer
        eos = set(self.eos_ids)

        def text(tokens: list[int], **extra) -> tuple[str, dict[str, Any]]:
            for t in tokens:
                if t not in eos:
                    detok.add_token(t)
            return ("text", {"text": detok.last_segment, "tokens": len(tokens), **extra})

        produced = 0
        committed: list[int] = []  # a canvas verb's tokens so far
        shown: list[int] = []  # the part of its reply already sent
        # Every decoder pass is handed to the worker (one per turn of this job); the engine's
        # calls say which of them can be batched with other jobs'.
        events = run(model, request, cache=cache, external_decoder=True)
        logits = None
        try:
            while True:
                try:
                    event = events.send(logits)
                except StopIteration:
                    break
                logits = None
                if isinstance(event, DecoderCall):
                    logits = yield ("denoise", event)  # the worker sends back this call's logits
                    continue
                if isinstance(event, StepEvent):
                    if p.include_drafts:
                        yield ("draft", self._draft(event))
                    if streamer is not None:
                        emitted = streamer.take()
                        if emitted:  # a settled prefix, pinned: it will be committed as it is
                            yield text(emitted, block=event.block, step=event.step)
                elif isinstance(event, BlockEvent) and plan is not None:
                    committed += event.tokens
                    visible = plan.visible(committed) or []
                    if visible[: len(shown)] != shown:  # a verb's reply only grows
                        raise RuntimeError("a canvas verb's visible reply changed")
                    new, shown = visible[len(shown):], visible
                    yield text(new, block=event.block, steps=event.steps)
                elif isinstance(event, BlockEvent):
                    sent = streamer.emitted_in(event.block) if streamer is not None else []
                    if event.tokens[: len(sent)] != sent:  # pins are committed as given: never
                        raise RuntimeError("the committed block does not start with its streamed prefix")
                    produced += len(event.tokens)
                    if streamer is not None:
                        streamer.room = p.max_tokens - produced
                    yield text(event.tokens[len(sent):], block=event.block, steps=event.steps,
                               reason=event.stop_reason)
                elif isinstance(event, GenerationResult):
                    detok.finalize()
                    tail = detok.last_segment
                    finish, ntokens = event.finish_reason, len(event.tokens)
                    if plan is not None:  # the verb's reply: what was shown, then the rest
                        reply, ntokens, finish = plan.reply(plan.finish(event))
                        if not reply.startswith(detok.text):
                            raise RuntimeError("a canvas verb's reply does not start with its streamed text")
                        tail += reply[len(detok.text):]
                    if tail:
                        yield ("text", {"text": tail, "tokens": 0})
                    encoded = [t for canvas in event.encoded_canvases for t in canvas]
                    self._release(job)  # the generation is over: its cache is now only what is kept
                    if not p.images:
                        self.budget.keep(list(ids) + encoded, cache)
                    yield ("done", {
                        "finish_reason": finish,
                        "completion_tokens": ntokens,
                        "steps_per_block": list(event.steps_per_block),
                        "tokens_per_forward": event.tokens_per_forward,
                        "generation_time": event.generation_time,
                        "generation_tps": event.generation_tps,
                        "seed": event.seed,
                        "mode": event.mode,
                    })
        finally:
            events.close()

    def _draft(self, event: StepEvent) -> dict[str, Any]:
        ids = event.argmax.tolist()
        labels = self.labels
        return {"block": event.block, "step": event.step, "max_steps": event.max_steps,
                "pieces": ["" if labels.is_eos(t) else labels(t) for t in ids],
                "accepted": [int(a) for a in event.accepted.tolist()],
                "eos": [int(labels.is_eos(t)) for t in ids], "mean_entropy": event.mean_entropy,
                "pinned": None if event.pinned is None else [int(x) for x in event.pinned.tolist()]}
