"""Shared by the server tests: run the app on a free loopback port; a model that writes a script."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import mlx.core as mx


@contextmanager
def running(app, host: str = "127.0.0.1"):
    """Serve `app` on a port the OS picks; yields the base URL (see `serving`)."""
    with serving(app, host) as (url, _):
        yield url


@contextmanager
def serving(app, host: str = "127.0.0.1"):
    """Serve `app` as `dgemma serve` runs it (serving.make_server: uvicorn, the head deadline, the
    shutdown hook) on a port the OS picks (bound before the thread starts, so no race); yields the
    base URL and the server; shuts the server (and the engine thread) down afterwards."""
    from mlx_diffusiongemma.server.serving import make_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = make_server(app, log_level="warning")
    server.config.timeout_graceful_shutdown = 2
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


class ScriptedModel:
    """The demo model, except that every decoder pass puts all its mass on a script: canvas
    position i of block b predicts `script[b * C + i]` (then the end-of-turn token). The real
    sampler, engine and server run unchanged; the output is known text, so reasoning, tool calls
    and marker splits across blocks can be tested on a model with random weights.

    The script starts after the last prompt that ended with the generation prompt."""

    def __init__(self, model, tokenizer, script: str, end_id: int):
        self._model = model
        self.script = list(tokenizer.encode(script))
        self._gen_prompt = list(tokenizer.encode("<|turn>model\n"))
        self._end = end_id
        self._start = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def extend(self, cache, token_ids, **kw):
        ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, mx.array) else token_ids)]
        out = self._model.extend(cache, token_ids, **kw)
        if ids[-len(self._gen_prompt):] == self._gen_prompt:
            self._start = cache.length
        return out

    def denoise(self, canvas_ids, cache, self_conditioning=None, **kw):
        c, v = self._model.canvas_length, self._model.vocab_size
        offset = cache.length - self._start
        target = [self.script[i] if i < len(self.script) else self._end for i in range(offset, offset + c)]
        onehot = mx.array(target)[:, None] == mx.arange(v)[None, :]
        return mx.where(onehot, 30.0, -30.0)[None].astype(mx.float32)

    def denoise_batch(self, canvases, caches, self_conditioning, top_k):
        return _one_by_one(self, canvases, caches, self_conditioning, top_k)

    def denoise_rows(self, canvas_ids, rows, cache, canvas_kv, soft=None):
        """Fast mode's rows: the script at those positions (padding rows read position 0)."""
        full = self.denoise(canvas_ids, cache)
        return mx.concatenate([full, full[:, :1]], axis=1)[:, rows]

    def denoise_rows_batch(self, canvases, rows, caches, canvas_kvs, softs):
        return _rows_one_by_one(self, canvases, rows, caches, canvas_kvs, softs)


def _one_by_one(model, canvases, caches, self_conditioning, top_k):
    """`denoise_batch` of a stand-in model: its own `denoise` per request."""
    return mx.concatenate([model.denoise(c, k, s, self_conditioning_top_k=t)
                           for c, k, s, t in zip(canvases, caches, self_conditioning, top_k)], axis=0)


def _rows_one_by_one(model, canvases, rows, caches, canvas_kvs, softs):
    """`denoise_rows_batch` of a stand-in model: its own `denoise_rows` per request."""
    return [model.denoise_rows(*call) for call in zip(canvases, rows, caches, canvas_kvs, softs)]


class EndlessModel:
    """The demo model with its end tokens' logits far below the rest (finite: the engine rejects
    non-finite logits): they are never drawn and a reply runs to max_tokens, so a test that
    cancels a request in flight does not race a reply that ends on its own."""

    def __init__(self, model):
        self._model = model
        self._ends = mx.array(list(model.generation.eos_token_ids), dtype=mx.int32)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _no_end(self, logits):
        is_end = (mx.arange(logits.shape[-1])[:, None] == self._ends[None, :]).any(axis=-1)
        return mx.where(is_end, -1e4, logits)  # softcapped logits stay within +-30

    def denoise(self, canvas_ids, cache, self_conditioning=None, **kw):
        return self._no_end(self._model.denoise(canvas_ids, cache, self_conditioning, **kw))

    def denoise_batch(self, canvases, caches, self_conditioning, top_k):
        return _one_by_one(self, canvases, caches, self_conditioning, top_k)

    def denoise_rows(self, *args):
        return self._no_end(self._model.denoise_rows(*args))

    def denoise_rows_batch(self, *args):
        return [self._no_end(logits) for logits in self._model.denoise_rows_batch(*args)]


class GatedModel:
    """A model whose decoder passes wait for `gate` (a threading.Event): the engine thread stops
    at its first decoder pass until the test opens it, so a test can queue requests behind a
    running one without racing it. Everything else (its memory plan included) is the model's."""

    def __init__(self, model, gate):
        self._model = model
        self.gate = gate

    PASSES = ("denoise", "denoise_batch", "denoise_rows", "denoise_rows_batch")  # every kind of decoder pass

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if name not in self.PASSES:
            return attr

        def gated(*args, **kw):
            if not self.gate.wait(timeout=60):
                raise RuntimeError("the test's gate was never opened")
            return attr(*args, **kw)

        return gated
