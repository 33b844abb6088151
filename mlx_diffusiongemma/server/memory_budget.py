"""The server's memory budget: what its running requests and kept prompt caches may hold together.

Every request is checked alone against the model's memory plan at the door (`engine.check_fits`:
400 `context_length_exceeded` when it could not fit even alone). The server runs several at once
and keeps prompt-cache snapshots, so the engine thread also keeps a budget:

- the **headroom** is the plan's limit minus the weights (`MemoryPlan.headroom`);
- a running request **reserves** what the plan says it holds at its peak, its prompt cache for
  the prompt plus every canvas and its own transients (`MemoryPlan.request_bytes`; a batched
  decoder pass holds every request's logits at once, so each request counts its own);
- a queued request is admitted only while the running reservations plus its own fit the headroom;
  the prompt-cache store yields first (least recently used snapshots dropped), the requests
  behind it wait in order;
- after a snapshot is kept, the store is trimmed so that its bytes (each shared buffer once) plus
  the reservations stay within the headroom.

A store's snapshot and a running request may share buffers (a snapshot is a fork), so the sum
over-counts, never under-counts. Without a plan (a model built in memory) or a known limit there
is no budget: only `max_active` and the store's own bounds apply. Used by the engine thread;
`stats` reads plain numbers the engine thread wrote.
"""

from __future__ import annotations

from typing import Any

from ..diffusion.engine import request_positions
from .prompt_cache import PromptCacheStore


class MemoryBudget:
    def __init__(self, model, store: PromptCacheStore):
        self.model = model
        self.store = store
        self.reserved = 0  # bytes the running requests reserve
        self.store_bytes = 0  # the store's bytes after its last change
        self.waited = 0  # requests that waited in the queue for memory

    @property
    def plan(self):
        return getattr(self.model, "memory_plan", None)

    @property
    def headroom(self) -> int | None:
        plan = self.plan
        return None if plan is None else plan.headroom

    def cost(self, prompt_len: int, max_tokens: int) -> int:
        """The bytes a request of `prompt_len` tokens and `max_tokens` reserves while it runs."""
        plan = self.plan
        if plan is None:
            return 0
        return plan.request_bytes(request_positions(self.model, prompt_len, max_tokens))

    def reserve(self, cost: int, alone: bool) -> bool:
        """Reserve `cost` when it fits beside the running reservations (the store trimmed to make
        room); False: it must wait. `alone` (nothing runs) always admits: the request was checked
        alone at the door, and a queue must not stall if the limit moved since."""
        room = self.headroom
        if room is not None:
            if not alone and self.reserved + cost > room:
                return False
            self.store_bytes = self.store.trim(max(0, room - self.reserved - cost))
        self.reserved += cost
        return True

    def release(self, cost: int) -> None:
        self.reserved -= cost

    def keep(self, ids, cache) -> None:
        """Keep a snapshot of `cache` (holding `ids`) in the store, then trim the store to what
        the reservations leave."""
        self.store.insert(ids, cache)
        room = self.headroom
        if room is not None:
            self.store_bytes = self.store.trim(max(0, room - self.reserved))
        else:
            self.store_bytes = self.store.nbytes

    def stats(self) -> dict[str, Any]:
        plan = self.plan
        limit = None if plan is None else plan.limit
        return {"limit": limit, "limit_source": None if plan is None else plan.limit_source,
                "weights": None if plan is None else plan.weights, "headroom": self.headroom,
                "reserved": self.reserved, "prompt_cache": self.store_bytes,
                "waited_for_memory": self.waited}
