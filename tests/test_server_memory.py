"""The server's memory budget (server/memory_budget.py) on the real uvicorn stack and the official
`openai` client, with the tiny checkpoint and a small forced limit (the plan's `limit`): requests
that fit alone but not together both get their answers (the second waits in the queue), a request
that could not fit even alone is refused at once with 400 `context_length_exceeded`, and the
prompt-cache store drops snapshots by bytes so that it and the running requests stay within the
headroom; `/health` says what the server holds."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import mlx.core as mx
import pytest

openai = pytest.importorskip("openai", reason="the [server-test] extra is not installed")

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.diffusion.engine import request_positions
from mlx_diffusiongemma.server import ServerConfig, create_app
from mlx_diffusiongemma.server.prompt_cache import PromptCacheStore

from conftest import invoke
from helpers_server import GatedModel, running

STEPS = {"max_denoising_steps": 2}
MAX_TOKENS = 32  # four canvases of the tiny model's 8


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    _, folder = tiny_checkpoint
    model, tok = dg.load(folder)
    yield model, tok
    mx.clear_cache()


def _cost(model, tok, prompt: str, max_tokens: int = MAX_TOKENS) -> int:
    """What the budget reserves for a completion of `prompt` (the plan's bytes for its positions)."""
    ids = tok.encode(prompt)
    return model.memory_plan.request_bytes(request_positions(model, len(ids), max_tokens))


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _wait_for(url: str, test, what: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        h = _health(url)
        if test(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"the server never reached: {what} (last /health: {h})")


def _two_at_once(model, tok, prompts: list[str], big: str | None = None):
    """Send `prompts` (seeded completions) while the engine thread is held at its first decoder
    pass, then let it go; returns (texts, /health afterwards, seconds the `big` request took to be
    refused while the others were queued or running)."""
    gate = threading.Event()
    app = create_app(GatedModel(model, gate), tok, ServerConfig(model_id="tiny", max_tokens_limit=4096))
    texts: dict[int, str] = {}
    refused_in = None
    with running(app) as url:
        c = _client(url)

        def ask(i: int) -> None:
            r = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=MAX_TOKENS, seed=7 + i,
                                     extra_body=STEPS)
            texts[i] = r.choices[0].text

        threads = []
        for i in range(len(prompts)):
            threads.append(threading.Thread(target=ask, args=(i,)))
            threads[-1].start()
            _wait_for(url, lambda h: h["active"] + h["waiting"] == i + 1, f"{i + 1} requests in")
        if big is not None:  # refused at the door, while the engine thread is busy
            t0 = time.monotonic()
            with pytest.raises(openai.BadRequestError) as e:
                c.completions.create(model="tiny", prompt=big, max_tokens=2048, extra_body=STEPS)
            refused_in = time.monotonic() - t0
            assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
            assert "MLX can use" in e.value.message
        gate.set()
        for t in threads:
            t.join(timeout=60)
        health = _health(url)
    return [texts[i] for i in range(len(prompts))], health, refused_in


def test_requests_that_fit_alone_but_not_together_are_served_one_after_the_other(tiny):
    model, tok = tiny
    plan = model.memory_plan
    prompts = ["hello there", "the second one"]
    costs = [_cost(model, tok, p) for p in prompts]
    # Without a limit both run in one batched decoder pass: the control that the limit is what
    # keeps them apart below.
    saved = plan.limit
    try:
        plan.limit = None
        free, health, _ = _two_at_once(model, tok, prompts)
        assert health["batch_sizes"].get("2", 0) > 0
        assert health["memory"]["headroom"] is None and health["memory"]["waited_for_memory"] == 0

        plan.limit = plan.weights + max(costs) + min(costs) // 2  # each fits alone, not both
        assert plan.request_bytes(request_positions(model, 1, 2048)) > plan.headroom  # the big one never fits
        limited, health, refused_in = _two_at_once(model, tok, prompts, big="x" * 8)
    finally:
        plan.limit = saved
    assert limited == free and all(free)  # both answered, the same text as when batched
    assert refused_in < 1.0
    memory = health["memory"]
    assert memory["waited_for_memory"] == 1 and "2" not in health["batch_sizes"]
    assert health["completed"] == 2 and memory["reserved"] == 0
    assert memory["limit"] == plan.weights + max(costs) + min(costs) // 2 and memory["weights"] == plan.weights
    assert memory["prompt_cache"] <= memory["headroom"]
    assert memory["mlx"]["peak"] >= memory["mlx"]["active"] > 0


def test_the_prompt_cache_store_is_trimmed_to_the_headroom_by_bytes(tiny):
    model, tok = tiny
    plan = model.memory_plan
    prompts = ["first prompt", "another prompt", "a third prompt"]
    cost = max(_cost(model, tok, p) for p in prompts)

    def serve_all() -> list[dict]:
        seen = []
        with running(create_app(model, tok, ServerConfig(model_id="tiny"))) as url:
            c = _client(url)
            for i, p in enumerate(prompts):
                c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, seed=i, extra_body=STEPS)
                seen.append(_health(url))
        return seen

    saved = plan.limit
    try:
        plan.limit = None
        unbounded = serve_all()[-1]
        plan.limit = plan.weights + cost + unbounded["memory"]["prompt_cache"] // 4
        bounded = serve_all()
    finally:
        plan.limit = saved
    # No budget: every snapshot kept (two per request, within the 8 entries).
    assert unbounded["prompt_cache"]["entries"] == 2 * len(prompts)
    assert unbounded["prompt_cache"]["evicted_for_memory"] == 0
    for h in bounded:
        m = h["memory"]
        assert m["reserved"] == 0 and m["prompt_cache"] <= m["headroom"]
    assert bounded[-1]["prompt_cache"]["evicted_for_memory"] > 0
    assert 0 < bounded[-1]["prompt_cache"]["entries"] < 2 * len(prompts)
    assert bounded[-1]["memory"]["prompt_cache"] < unbounded["memory"]["prompt_cache"]


def test_the_store_drops_least_recently_used_snapshots_by_bytes(tiny):
    model, _ = tiny
    caches = []
    for n in (3, 5, 7):
        cache = model.make_cache()
        model.extend(cache, list(range(1, n + 1)))
        mx.eval(cache.state())
        caches.append((list(range(1, n + 1)), cache))
    one = caches[0][1].nbytes
    store = PromptCacheStore(8, max_bytes=2 * one)
    store.insert(*caches[0])
    store.insert(*caches[1])
    assert len(store) == 2 and store.nbytes == 2 * one  # each snapshot's buffers, counted once
    assert store.lookup(caches[0][0] + [99])[1] == 3  # the first is now the most recently used
    store.insert(*caches[2])  # over the bytes: the least recently used (the second) goes
    assert len(store) == 2 and store.evicted == 1
    assert store.lookup(caches[1][0])[1] == 3  # only the first's tokens are left for its prompt
    assert store.trim(0) == 0 and len(store) == 0


def test_prompt_cache_bytes_reaches_the_store_and_a_bad_size_is_a_usage_error(runner, monkeypatch, tiny):
    from mlx_diffusiongemma.cli import serve

    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda **kw: seen.update(kw))
    result = invoke(runner, ["serve", "--model", "demo-random", "--prompt-cache-bytes", "1.5GB"])
    assert result.exit_code == 0, result.output
    assert seen["prompt_cache_bytes"] == 1_500_000_000
    assert invoke(runner, ["serve", "--prompt-cache-bytes", "512MiB"]).exit_code == 0
    assert seen["prompt_cache_bytes"] == 512 * 2**20
    bad = invoke(runner, ["serve", "--prompt-cache-bytes", "lots"])
    assert bad.exit_code == 2 and "'lots' is not a size" in bad.output and "Traceback" not in bad.output
    model, tok = tiny
    app = create_app(model, tok, ServerConfig(prompt_cache_bytes=seen["prompt_cache_bytes"]))
    assert app.state.worker.store.max_bytes == 512 * 2**20
