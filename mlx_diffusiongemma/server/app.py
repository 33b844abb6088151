"""The ASGI application: OpenAI-compatible routes over one engine worker thread.

Starlette (the toolkit FastAPI is built on; served by uvicorn, as vLLM's server is) without
request models: bodies are validated in protocol.py so errors read like OpenAI's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..diffusion.engine import check_fits
from ..errors import ContextLengthError, DiffusionGemmaError
from ..prompts.channels import Delta, TextStream
from ..prompts.render import render_messages, template_variables
from . import anthropic, canvas_routes, image_parts, ollama, protocol as P
from .guard import middleware
from .worker import Job, QueueFull, Worker

log = logging.getLogger("mlx_diffusiongemma.server")


@dataclass
class ServerConfig:
    model_id: str = "default_model"  # the name /v1/models shows (a folder's name, never its path)
    model_aliases: tuple[str, ...] = ()  # other names requests may use (the path the server was started with)
    api_key: str | None = None
    host: str = "127.0.0.1"  # the address the server is bound to: loopback turns the Host check on (guard.py)
    allowed_origins: tuple[str, ...] = ()  # web pages allowed beside loopback ones ("*": all)
    default_max_tokens: int = 512
    max_tokens_limit: int = 16384
    max_body_bytes: int = 4 * 2**20
    max_active: int = 4  # requests denoised in turn (round robin); the rest wait in the queue
    max_queue: int = 16
    prompt_cache_size: int = 8
    prompt_cache_bytes: int | None = None  # the prompt-cache store's own bound (the memory budget bounds it too)
    chat_template_args: dict[str, Any] = field(default_factory=dict)
    disconnect_poll_s: float = 0.25
    default_mode: str = P.DEFAULT_MODE  # a request's "mode" when it sends none ("exact" or "fast")
    header_timeout_s: float = 10.0  # a request's head must arrive within this (serving.py)
    body_timeout_s: float = 30.0  # and its body within this after the head (408)
    render_threads: int = 2  # chat templates rendered at once (each under the renderer's time limit)
    image_dir: str | None = None  # local image files are read only from here (None: data URLs only)


def _demo_panel(model) -> str:
    """On the trained demo model, the web chat's line of prompts to try, what it has not learnt and
    its notices (docs/demo-model.md); nothing on other models."""
    from ..demo import is_trained_demo
    from ..demo.tasks import FAMILIES, LEARNT, NOT_LEARNT, NOTICES

    if not is_trained_demo(getattr(model, "source", None)):
        return ""
    tries = " · ".join(html.escape(FAMILIES[name].example) for name in LEARNT if "\n" not in FAMILIES[name].example)
    think = html.escape(NOTICES["think"])
    second = html.escape(NOTICES["second"].replace("/reset", "“new chat”"))
    return (f'<div id="demo" data-think="{think}" data-second="{second}">The demo model knows only toy tasks. '
            f"Try: {tries}. Not learnt (its answers there are wrong): {html.escape(NOT_LEARNT)}; "
            "no thinking, no system prompts, one task per conversation.</div>")


class Disconnected(Exception):
    pass


def create_app(model, tokenizer, config: ServerConfig | None = None) -> Starlette:
    """An app serving `model`; the engine thread starts and stops with the app's lifespan."""
    config = config or ServerConfig()
    if config.default_mode not in P.MODES:
        raise ValueError(f"default_mode must be one of {P.MODES}, not {config.default_mode!r}")
    if config.api_key is not None and not config.api_key.strip():
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    template_names = template_variables(tokenizer)  # what chat_template_kwargs may set
    try:
        P.check_template_kwargs(config.chat_template_args, template_names, "chat_template_args")
    except P.APIError as e:
        raise ValueError(e.message) from None
    closing = asyncio.Event()  # set by begin_shutdown: every request ends, new ones get 503
    loop: list[asyncio.AbstractEventLoop] = []  # the app's event loop, once it runs
    render_slots = asyncio.Semaphore(max(1, config.render_threads))
    worker = Worker(model, tokenizer, max_active=config.max_active, max_queue=config.max_queue,
                    prompt_cache_size=config.prompt_cache_size, prompt_cache_bytes=config.prompt_cache_bytes)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    page = page.replace("<!--demo-->", _demo_panel(model))

    # -- plumbing ----------------------------------------------------------------------------------
    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise P.APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                             type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        check_json_type(request)
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise P.APIError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        try:
            with anyio.fail_after(config.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise P.APIError(413, f"request body over {limit} bytes", code="request_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise P.APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s",
                             code="request_timeout") from None
        return P.parse_json(b"".join(chunks))

    def check_json_type(request: Request) -> None:
        """A JSON body, or no Content-Type (as FastAPI decides): a web page's cross-site "simple"
        request (text/plain, a form) is refused before it is read."""
        kind = request.headers.get("content-type")
        if kind is None:
            return
        kind = kind.split(";")[0].strip().lower()
        if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
            raise P.APIError(415, f"the body must be JSON (Content-Type: application/json), not {kind[:60]!r}",
                             code="unsupported_media_type")

    def check_model(params: P.Params) -> None:
        if params.model not in (config.model_id, "default_model", *config.model_aliases):
            raise P.APIError(404, f"the model '{params.model}' does not exist; this server serves "
                                  f"'{config.model_id}'", param="model", code="model_not_found")

    def check_request(params: P.Params) -> None:
        try:
            params.options.sampler.resolve(model.generation)
        except ValueError as e:
            raise P.bad(str(e)) from None
        vocab = model.vocab_size
        if any(not 0 <= t < vocab for t in params.prompt_ids):
            raise P.bad(f"token ids must be in [0, {vocab})", param="prompt")
        try:
            check_fits(model, len(params.prompt_ids), params.max_tokens)
        except ContextLengthError as e:
            raise P.bad(str(e), param="messages" if params.kind == "chat" else "prompt",
                        code="context_length_exceeded") from None

    def submit(params: P.Params) -> Job:
        if closing.is_set():
            raise shutting_down()
        job = Job(params, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as e:
            raise P.APIError(503, f"the server is busy: {e}", type="server_error", code="queue_full") from None
        return job

    async def items(job: Job, request: Request, poll: bool) -> AsyncIterator[tuple[str, Any]]:
        """The job's items until "done" or "error"; with `poll`, a client that went away cancels
        it (streams are cancelled by the server when their client disconnects)."""
        try:
            while True:
                if poll:
                    try:
                        item = await asyncio.wait_for(job.queue.get(), timeout=config.disconnect_poll_s)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise Disconnected() from None
                        continue
                else:
                    item = await job.queue.get()
                yield item
                if item[0] in ("done", "error"):
                    return
        finally:
            job.cancel()  # no-op when finished; stops the engine on a disconnect or a stop string

    # -- generation --------------------------------------------------------------------------------
    async def generate(request: Request, params: P.Params) -> Response:
        check_request(params)
        job = submit(params)
        if params.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(sse(job, request, params), media_type="text/event-stream", headers=headers)
        return await complete(job, request, params)

    async def complete(job: Job, request: Request, params: P.Params) -> Response:
        text = TextStream(params.stop, split_channels=params.kind == "chat" and params.plan is None)
        total = Delta()
        info: dict[str, Any] = {"completion_tokens": 0}
        finish = "length"
        try:
            async for kind, data in items(job, request, poll=True):
                if kind == "error":
                    raise _as_api_error(data)
                d, finish = _consume(kind, data, text, info, finish)
                total.content += d.content
                total.reasoning += d.reasoning
                total.tool_calls += d.tool_calls
                if text.stopped:
                    break
        except Disconnected:
            return Response(status_code=499)
        finally:
            job.cancel()
        if params.json_object and (error := canvas_routes.json_object_error(total.content)):
            raise error
        body = P.envelope(params.kind, P.new_id(params.kind), params.model, P.now(), stream=False)
        finish = _finish_reason(finish, text, total)
        if params.kind == "chat":
            # "" for an empty reply (mlx_lm.server's answer; clients that concatenate need no None check)
            message: dict[str, Any] = {"role": "assistant", "content": total.content}
            if total.reasoning:
                message["reasoning"] = message["reasoning_content"] = total.reasoning
            if total.tool_calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in total.tool_calls]
            body["choices"] = [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]
        else:
            body["choices"] = [{"index": 0, "text": total.content, "finish_reason": finish, "logprobs": None}]
        body["usage"] = P.usage(info.get("prompt_tokens", 0), info["completion_tokens"], info.get("cached_tokens"))
        body["timings"] = _timings(info)
        return JSONResponse(body)

    async def sse(job: Job, request: Request, params: P.Params) -> AsyncIterator[str]:
        rid, created = P.new_id(params.kind), P.now()
        chat = params.kind == "chat"
        text = TextStream(params.stop, split_channels=chat and params.plan is None)
        info: dict[str, Any] = {"completion_tokens": 0}
        finish = "length"
        made_calls = Delta()

        def chunk(delta: Delta | None = None, finish_reason: str | None = None, **extra) -> str:
            body = P.envelope(params.kind, rid, params.model, created, stream=True)
            if chat:
                d: dict[str, Any] = {}
                if delta is not None:
                    if delta.content:
                        d["content"] = delta.content
                    if delta.reasoning:
                        d["reasoning"] = d["reasoning_content"] = delta.reasoning
                    if delta.tool_calls:
                        d["tool_calls"] = delta.tool_calls
                choice = {"index": 0, "delta": d, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta.content if delta else "", "finish_reason": finish_reason,
                          "logprobs": None}
            body["choices"] = [choice]
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if chat:
            first = P.envelope(params.kind, rid, params.model, created, stream=True)
            first["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None, "logprobs": None}]
            yield f"data: {json.dumps(first)}\n\n"
        async for kind, data in items(job, request, poll=False):
            if kind == "error":
                yield f"data: {json.dumps(_as_api_error(data).body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if kind == "draft":
                if params.include_drafts:
                    yield chunk(draft=data)
                continue
            d, finish = _consume(kind, data, text, info, finish)
            made_calls.tool_calls += d.tool_calls
            made_calls.content += d.content
            if d:
                yield chunk(d)
            if text.stopped:
                job.cancel()
                break
        if params.json_object and (error := canvas_routes.json_object_error(made_calls.content)):
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk(None, _finish_reason(finish, text, made_calls), timings=_timings(info))
        if params.include_usage:
            body = P.envelope(params.kind, rid, params.model, created, stream=True)
            body["choices"] = []
            body["usage"] = P.usage(info.get("prompt_tokens", 0), info["completion_tokens"],
                                    info.get("cached_tokens"))
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    # -- routes --------------------------------------------------------------------------------------
    async def read(request: Request) -> dict[str, Any]:
        check_auth(request)
        return await read_body(request)

    def parse(body: dict[str, Any], kind: str) -> P.Params:
        params = P.parse_common(body, kind, default_max_tokens=config.default_max_tokens,
                                max_tokens_limit=config.max_tokens_limit, default_mode=config.default_mode,
                                served_model=config.model_id)
        check_model(params)
        return params

    async def accept(request: Request, kind: str) -> tuple[dict[str, Any], P.Params]:
        """An authorised request's body and its common parameters, for the served model."""
        body = await read(request)
        return body, parse(body, kind)

    async def chat_prompt(body: dict[str, Any], params: P.Params) -> None:
        """An OpenAI chat body's prompt ids (the Ollama and Anthropic routes translate theirs into
        one): its images checked, the template arguments checked, the conversation rendered on
        the time-limited render threads, the image tokens expanded."""
        sources = image_parts.take_images(body, model, tokenizer, config.image_dir)
        messages = P.chat_messages(body)
        tools = P.chat_tools(body)
        params.has_tools = tools is not None
        P.check_template_kwargs(body.get("chat_template_kwargs"), template_names)
        kwargs = P.template_kwargs(body, config.chat_template_args)
        params.prompt_ids = await render(messages, tools, kwargs)
        if sources:
            params.prompt_ids, params.images = await run_in_threadpool(image_parts.process, model, params.prompt_ids,
                                                                       sources)

    async def chat_completions(request: Request) -> Response:
        body, params = await accept(request, "chat")
        await chat_prompt(body, params)
        await canvas_routes.attach_plan(canvas, body, params)
        return await generate(request, params)

    async def completions(request: Request) -> Response:
        body, params = await accept(request, "completion")
        params.prompt_ids = P.completion_prompt(body, tokenizer)
        await canvas_routes.attach_plan(canvas, body, params)
        return await generate(request, params)

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_id, "object": "model", "created": created_at, "owned_by": "mlx-diffusiongemma"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **worker.stats()})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def api_error(request: Request, exc: P.APIError) -> Response:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.APIError(exc.status_code, str(exc.detail), type=kind).body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return JSONResponse(P.APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    async def render(messages, tools, kwargs) -> list[int]:
        """The prompt ids, rendered on a thread of their own, a few at a time: a slow template
        (each render stops at the renderer's time limit) cannot take every thread nor starve the
        event loop of the interpreter's lock. The thread is a daemon and a shutdown does not wait
        for it (anyio's worker threads, which run_in_threadpool uses, would hold the process until
        the render's time limit)."""
        async with render_slots:
            if closing.is_set():
                raise shutting_down()
            done = asyncio.get_running_loop().create_future()

            def settle(result: tuple[bool, Any]) -> None:
                if not done.done():
                    done.set_result(result)

            def work() -> None:
                try:
                    result = (True, _render(tokenizer, messages, tools, kwargs))
                except Exception as e:
                    result = (False, e)
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    done.get_loop().call_soon_threadsafe(settle, result)

            threading.Thread(target=work, name="dgemma-render", daemon=True).start()
            stop = asyncio.ensure_future(closing.wait())
            try:
                await asyncio.wait({done, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if not done.done():
                raise shutting_down()
            ok, value = done.result()
            if not ok:
                raise value
            return value

    created_at = P.now()
    canvas = canvas_routes.Server(model, tokenizer, config, read, parse, check_request, submit, items, chat_prompt,
                                  check_auth, read_body)
    routes = canvas_routes.routes(canvas) + ollama.routes(canvas) + anthropic.routes(canvas) + [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
            Route(f"{prefix}/completions", completions, methods=["POST"]),
            Route(f"{prefix}/models", models, methods=["GET"]),
        ]

    def shutting_down() -> P.APIError:
        return P.APIError(503, "the server is shutting down", type="server_error", code="server_shutting_down")

    def drain() -> None:
        closing.set()
        worker.abort_all(shutting_down())

    def begin_shutdown() -> None:
        """Called by serving.Server when a signal asks it to stop (from any thread, or a signal
        handler): every request ends now (streams with an error event and [DONE]), new ones get 503."""
        if loop:
            loop[0].call_soon_threadsafe(drain)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.append(asyncio.get_running_loop())
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    guard = middleware(bind_host=config.host, allowed_origins=config.allowed_origins,
                       api_key_set=config.api_key is not None)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=guard, exception_handlers={
        P.APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.worker = worker
    app.state.config = config
    app.state.begin_shutdown = begin_shutdown
    return app


def _render(tokenizer, messages, tools, kwargs) -> list[int]:
    """Prompt ids through the one renderer (the chat template, under its time limit); a template
    that refuses the conversation, or runs past the limit, is the client's error."""
    try:
        return render_messages(tokenizer, messages, None, tools=tools, template_kwargs=kwargs)
    except DiffusionGemmaError as e:
        raise P.bad(str(e), param="messages") from None


def _as_api_error(e: Exception) -> P.APIError:
    if isinstance(e, P.APIError):
        return e
    return P.APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


def _consume(kind: str, data: dict, text: TextStream, info: dict, finish: str) -> tuple[Delta, str]:
    """Fold one worker item into the running state; returns the text delta and finish reason."""
    if kind == "prefill":
        info.update(data)
        return Delta(), finish
    if kind == "text":
        info["completion_tokens"] += data["tokens"]
        return text.feed(data["text"]), finish
    if kind == "done":
        info.update({k: v for k, v in data.items() if k != "completion_tokens"})
        info["completion_tokens"] = data["completion_tokens"]
        return text.finish(), data["finish_reason"]
    return Delta(), finish


def _finish_reason(finish: str, text: TextStream, delta: Delta) -> str:
    if text.stopped:
        finish = "stop"
    if delta.tool_calls and finish == "stop":
        return "tool_calls"
    return finish


def _timings(info: dict) -> dict[str, Any]:
    keys = ("prefill_time", "queued_time", "generation_time", "generation_tps", "tokens_per_forward",
            "steps_per_block", "seed", "mode")
    return {k: info[k] for k in keys if k in info}
