"""Ollama's API: `/api/chat`, `/api/generate`, `/api/tags`, `/api/show` (and `/api/version`), for
the Mac apps and agents that speak it.

A request is translated into the OpenAI-style fields the server already checks (`options.
num_predict` is `max_tokens`, `think` is `enable_thinking`, `format` is `response_format`, a
`suffix` on generate is the canvas completion), then runs on the same queue, batching and canvas
verbs. Replies are Ollama's: one JSON object, or newline-delimited JSON objects when streamed
(Ollama's default), with `thinking` and `tool_calls` (arguments as objects) apart from
`content`. Errors are Ollama's `{"error": "message"}` with the same statuses. Fields with no
meaning here (`keep_alive`, `context`, `temperature`, ...) are accepted and ignored. `images`
(base64) go through the chat route's checks (`image_parts.py`).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import canvas_routes as C, protocol as P

SAMPLER_FIELDS = P.SAMPLER_FIELDS


def _check(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise P.bad(message, param=param)


def openai_body(body: dict, model_id: str) -> dict[str, Any]:
    """Ollama's common fields -> the OpenAI-style body `parse_common` and the canvas checks read."""
    options = body.get("options") or {}
    _check(isinstance(options, dict), "'options' must be an object", "options")
    out: dict[str, Any] = {"model": body.get("model") or model_id, "stream": body.get("stream", True)}
    n = options.get("num_predict")
    if n is not None and not (isinstance(n, (int, float)) and not isinstance(n, bool) and n < 0):  # -1, -2: none
        out["max_tokens"] = n
    for name in ("seed", "stop", *SAMPLER_FIELDS):
        if name in options:
            out[name] = options[name]
        elif name in body and name != "stop":
            out[name] = body[name]
    think = body.get("think")
    if think is not None:
        _check(isinstance(think, (bool, str)), "'think' must be true, false or a level", "think")
        out["enable_thinking"] = think if isinstance(think, bool) else think != "none"
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    else:
        _check(fmt in (None, ""), "'format' must be \"json\" or a JSON schema object", "format")
    return out


def _with_images(text: Any, images: Any, where: str) -> Any:
    """A message's content with its `images` (base64 strings) as image parts before the text."""
    if not images:
        return text
    _check(isinstance(images, list) and all(isinstance(i, str) for i in images),
           f"{where}: 'images' must be a list of base64 strings", "images")
    parts = [{"type": "image_url", "image_url": {"url": "data:image;base64," + i}} for i in images]
    return parts + [{"type": "text", "text": text if isinstance(text, str) else ""}]


def chat_messages(body: dict) -> list[dict[str, Any]]:
    """Ollama's messages -> OpenAI's (tool calls' arguments are objects in both)."""
    messages = body.get("messages")
    _check(isinstance(messages, list) and bool(messages), "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        _check(isinstance(m, dict), f"messages[{i}] must be an object", "messages")
        msg = {k: m[k] for k in ("role", "content") if k in m}
        if m.get("images"):
            msg["content"] = _with_images(m.get("content", ""), m["images"], f"messages[{i}]")
        calls = m.get("tool_calls")
        if calls:
            _check(isinstance(calls, list), f"messages[{i}]: 'tool_calls' must be a list", "messages")
            msg["tool_calls"] = [{"type": "function", "function": c.get("function") if isinstance(c, dict) else None}
                                 for c in calls]
        if isinstance(m.get("tool_name"), str):
            msg["name"] = m["tool_name"]
        out.append(msg)
    return out


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _calls(delta_calls: list[dict]) -> list[dict]:
    """OpenAI-style tool calls (arguments as a JSON string) -> Ollama's (arguments as an object)."""
    out = []
    for c in delta_calls:
        try:
            args = json.loads(c["function"]["arguments"] or "{}")
        except json.JSONDecodeError:
            args = {}
        out.append({"function": {"name": c["function"]["name"], "arguments": args}})
    return out


def _final(info: dict, started: float) -> dict[str, Any]:
    finish = info.get("finish_reason", "stop")
    return {"done": True, "done_reason": "length" if finish == "length" else "stop",
            "total_duration": _ns(time.perf_counter() - started), "load_duration": 0,
            "prompt_eval_count": info.get("prompt_tokens", 0), "prompt_eval_duration": _ns(info.get("prefill_time", 0.0)),
            "eval_count": info.get("completion_tokens", 0), "eval_duration": _ns(info.get("generation_time", 0.0))}


def routes(server: C.Server) -> list[Route]:
    config = server.config

    def error(e: P.APIError) -> Response:
        return JSONResponse({"error": e.message}, status_code=e.status)

    async def run(request: Request, params: P.Params, chat: bool) -> Response:
        if params.json_object:
            raise P.bad("'format': \"json\" has no schema to pin on the canvas: send a JSON schema object",
                        param="format")
        server.check_request(params)
        job = server.submit(params)
        started = time.perf_counter()

        def piece(d) -> dict[str, Any]:
            head = {"model": params.model, "created_at": _now()}
            if chat:
                msg: dict[str, Any] = {"role": "assistant", "content": d.content}
                if d.reasoning:
                    msg["thinking"] = d.reasoning
                if d.tool_calls:
                    msg["tool_calls"] = _calls(d.tool_calls)
                return {**head, "message": msg}
            out = {**head, "response": d.content}
            if d.reasoning:
                out["thinking"] = d.reasoning
            return out

        if params.stream:
            async def lines() -> AsyncIterator[str]:
                try:
                    async for d, info in C.reply_deltas(server, job, request, params, poll=False):
                        yield json.dumps({**piece(d), **(_final(info, started) if info else {"done": False})},
                                         ensure_ascii=False) + "\n"
                except P.APIError as e:
                    yield json.dumps({"error": e.message}) + "\n"
            return StreamingResponse(lines(), media_type="application/x-ndjson")
        total = None
        async for d, info in C.reply_deltas(server, job, request, params, poll=True):
            if total is None:
                total = d
            else:
                total.content += d.content
                total.reasoning += d.reasoning
                total.tool_calls += d.tool_calls
            if info:
                return JSONResponse({**piece(total), **_final(info, started)})
        raise P.APIError(500, "the reply ended without its last item", type="server_error")

    async def chat(request: Request) -> Response:
        try:
            body = await server.read(request)
            oai = openai_body(body, config.model_id)
            oai["messages"] = chat_messages(body)
            if body.get("tools") is not None:
                oai["tools"] = body["tools"]
            params = server.parse(oai, "chat")
            await server.chat_prompt(oai, params)
            await C.attach_plan(server, oai, params)
            return await run(request, params, chat=True)
        except P.APIError as e:
            return error(e)

    async def generate(request: Request) -> Response:
        try:
            body = await server.read(request)
            oai = openai_body(body, config.model_id)
            prompt, system, suffix = body.get("prompt", ""), body.get("system"), body.get("suffix")
            _check(isinstance(prompt, str), "'prompt' must be a string", "prompt")
            _check(system is None or isinstance(system, str), "'system' must be a string", "system")
            _check(suffix is None or isinstance(suffix, str), "'suffix' must be a string", "suffix")
            raw = body.get("raw", False)
            _check(isinstance(raw, bool), "'raw' must be true or false", "raw")
            if not prompt:  # Ollama loads the model and answers done (a warm-up call)
                return JSONResponse({"model": oai["model"], "created_at": _now(), "response": "", "done": True,
                                     "done_reason": "load"})
            _check(not (body.get("images") and (raw or suffix)), "images need the chat template (not raw or suffix)",
                   "images")
            if raw or suffix:  # the prompt as written (a suffix: the text before the cursor)
                params = server.parse(oai, "completion")
                params.prompt_ids = list(server.tokenizer.encode(prompt))
                await C.attach_plan(server, {**oai, "suffix": suffix}, params)
            else:
                oai["messages"] = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": _with_images(prompt, body.get("images"), "the request")}]
                params = server.parse(oai, "chat")
                await server.chat_prompt(oai, params)
                await C.attach_plan(server, oai, params)
            return await run(request, params, chat=False)
        except P.APIError as e:
            return error(e)

    def details() -> dict[str, Any]:
        return {"format": "safetensors", "family": "diffusion_gemma", "families": ["diffusion_gemma"],
                "parameter_size": "", "quantization_level": "", "parent_model": ""}

    async def tags(request: Request) -> Response:
        try:
            server.auth(request)
        except P.APIError as e:
            return error(e)
        return JSONResponse({"models": [{"name": config.model_id, "model": config.model_id, "modified_at": _now(),
                                         "size": 0, "digest": "", "details": details()}]})

    async def show(request: Request) -> Response:
        try:
            body = await server.read(request)
            name = body.get("model") or body.get("name")
            if name not in (None, config.model_id, "default_model"):
                raise P.APIError(404, f"model '{name}' not found", type="not_found_error")
        except P.APIError as e:
            return error(e)
        return JSONResponse({
            "modelfile": "", "parameters": "", "template": "", "details": details(), "modified_at": _now(),
            "model_info": {"general.architecture": "diffusion_gemma",
                           "diffusion_gemma.context_length": server.model.text.max_position_embeddings,
                           "diffusion_gemma.canvas_length": server.model.canvas_length},
            "capabilities": ["completion", "tools", "thinking", "insert"],
        })

    async def version(request: Request) -> Response:
        return JSONResponse({"version": "0.0.0-mlx-diffusiongemma"})

    return [Route("/api/chat", chat, methods=["POST"]), Route("/api/generate", generate, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]), Route("/api/show", show, methods=["POST"]),
            Route("/api/version", version, methods=["GET"])]
