"""Anthropic's Messages API: `POST /v1/messages`, for the clients and agents that speak it.

A request becomes the fields the OpenAI routes check (`system` and content blocks -> messages,
`tool_use` / `tool_result` blocks -> tool calls and tool messages, `tools[].input_schema` ->
function parameters, `thinking.type` -> `enable_thinking`, `stop_sequences` -> `stop`) and runs
on the same queue and batching. The reply is Anthropic's: content blocks in order (`thinking`,
`text`, `tool_use` with `input` as an object), `stop_reason` (`end_turn`, `max_tokens`,
`stop_sequence`, `tool_use`) and `usage`; streamed, the named events (`message_start`,
`content_block_start` / `_delta` / `_stop` per block, `message_delta`, `message_stop`). Errors
are Anthropic's `{"type": "error", "error": {"type", "message"}}` with the same statuses.
Image blocks with a base64 source go through the chat route's checks (`image_parts.py`); URL
sources are not fetched (400). `x-api-key` is accepted besides the bearer
token when the server has an API key.
"""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import canvas_routes as C, protocol as P

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 503: "overloaded_error"}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise P.bad(message, param="messages")


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text blocks."""
    if isinstance(content, str):
        return content
    _check(isinstance(content, list), f"{where}: content must be a string or a list of blocks")
    out = []
    for block in content:
        _check(isinstance(block, dict), f"{where}: each block must be an object")
        _check(block.get("type") == "text" and isinstance(block.get("text"), str),
               f"{where}: only text blocks are supported here, got {json.dumps(block.get('type'))}")
        out.append(block["text"])
    return "".join(out)


def openai_messages(body: dict) -> list[dict[str, Any]]:
    """Anthropic's system and messages -> OpenAI's messages (the chat template's input)."""
    out: list[dict[str, Any]] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    messages = body.get("messages")
    _check(isinstance(messages, list) and bool(messages), "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        _check(isinstance(m, dict) and m.get("role") in ("user", "assistant"),
               f"{where} must be an object with role 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        _check(isinstance(content, list), f"{where}: content must be a string or a list of blocks")
        text, calls = [], []
        for block in content:
            _check(isinstance(block, dict), f"{where}: each block must be an object")
            kind = block.get("type")
            if kind == "text":
                _check(isinstance(block.get("text"), str), f"{where}: a text block needs a string 'text'")
                text.append(block["text"])
            elif kind == "image" and m["role"] == "user":
                source = block.get("source")
                _check(isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str),
                       f"{where}: an image block needs a base64 source (URLs are not fetched)")
                text.append({"type": "image_url", "image_url": {"url": "data:image;base64," + source["data"]}})
            elif kind == "tool_use" and m["role"] == "assistant":
                _check(isinstance(block.get("name"), str) and isinstance(block.get("input", {}), dict),
                       f"{where}: a tool_use block needs a name and an input object")
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block["name"], "arguments": block.get("input", {})}})
            elif kind == "tool_result" and m["role"] == "user":
                result = block.get("content", "")
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _text(result, where) if result is not None else ""})
            elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
                continue  # earlier thoughts: the chat template drops them from history
            else:
                raise P.bad(f"{where}: {json.dumps(kind)} blocks are not supported in a {m['role']} message",
                            param="messages")
        if text or calls or not any(b.get("type") == "tool_result" for b in content):
            if any(isinstance(t, dict) for t in text):  # images: content parts, in order
                body_parts: Any = [t if isinstance(t, dict) else {"type": "text", "text": t} for t in text]
            else:
                body_parts = "".join(text)
            msg: dict[str, Any] = {"role": m["role"], "content": body_parts}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def openai_body(body: dict, model_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {k: body[k] for k in ("model", "max_tokens", "stream", "seed", *P.SAMPLER_FIELDS)
                           if k in body}
    out.setdefault("model", model_id)
    if "max_tokens" not in out:
        raise P.bad("'max_tokens' is required", param="max_tokens")
    if body.get("stop_sequences") is not None:
        out["stop"] = body["stop_sequences"]
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
            raise P.bad("'thinking' must be {\"type\": \"enabled\" | \"disabled\", ...}", param="thinking")
        out["enable_thinking"] = thinking["type"] != "disabled"
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
            raise P.bad("'tools' must be a list of {name, description, input_schema}", param="tools")
        out["tools"] = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                          "parameters": t.get("input_schema", {})}} for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        out["tool_choice"] = "none"
    return out


def _blocks(delta) -> list[tuple[str, Any]]:
    """A Delta's pieces as (block type, value), in the order a reply writes them."""
    out: list[tuple[str, Any]] = []
    if delta.reasoning:
        out.append(("thinking", delta.reasoning))
    if delta.content:
        out.append(("text", delta.content))
    out += [("tool_use", call) for call in delta.tool_calls]
    return out


def _tool_use(call: dict) -> dict[str, Any]:
    try:
        args = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError:
        args = {}
    return {"type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex[:24],
            "name": call["function"]["name"], "input": args}


def _usage(info: dict) -> dict[str, Any]:
    return {"input_tokens": info.get("prompt_tokens", 0), "output_tokens": info.get("completion_tokens", 0),
            "cache_read_input_tokens": info.get("cached_tokens") or 0}


def _stop_reason(info: dict) -> str:
    if info.get("stop_string"):
        return "stop_sequence"
    return STOP_REASONS.get(info["finish_reason"], "end_turn")


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


def routes(server: C.Server) -> list[Route]:
    config = server.config

    def error(e: P.APIError) -> Response:
        kind = _ERROR_TYPES.get(e.status, "api_error")
        return JSONResponse({"type": "error", "error": {"type": kind, "message": e.message}}, status_code=e.status)

    def auth(request: Request) -> None:
        key = request.headers.get("x-api-key")
        if config.api_key is not None and key is not None:
            if not hmac.compare_digest(key.encode(), config.api_key.encode()):
                raise P.APIError(401, "invalid API key", type="authentication_error")
            return
        server.auth(request)

    async def messages(request: Request) -> Response:
        try:
            auth(request)
            body = await server.read_body(request)
            oai = openai_body(body, config.model_id)
            oai["messages"] = openai_messages(body)
            params = server.parse(oai, "chat")
            await server.chat_prompt(oai, params)
            server.check_request(params)
            job = server.submit(params)
        except P.APIError as e:
            return error(e)
        mid = "msg_" + uuid.uuid4().hex[:24]
        head = {"id": mid, "type": "message", "role": "assistant", "model": params.model}
        if params.stream:
            return StreamingResponse(_stream(server, job, request, params, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        content: list[dict[str, Any]] = []
        try:
            async for d, info in C.reply_deltas(server, job, request, params, poll=True):
                for kind, value in _blocks(d):
                    if kind == "tool_use":
                        content.append(_tool_use(value))
                    elif content and content[-1]["type"] == kind:
                        content[-1][kind] += value
                    else:
                        content.append({"type": kind, kind: value, **({"signature": ""} if kind == "thinking" else {})})
                if info:
                    return JSONResponse({**head, "content": content,
                                         "stop_reason": _stop_reason(info),
                                         "stop_sequence": None, "usage": _usage(info)})
        except P.APIError as e:
            return error(e)
        return error(P.APIError(500, "the reply ended without its last item", type="server_error"))

    return [Route("/v1/messages", messages, methods=["POST"])]


async def _stream(server: C.Server, job, request: Request, params: P.Params, head: dict) -> AsyncIterator[str]:
    yield _event("message_start", {"message": {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": {"input_tokens": 0, "output_tokens": 0}}})
    index, open_kind = -1, None

    def close():
        return _event("content_block_stop", {"index": index}) if open_kind is not None else ""

    try:
        async for d, info in C.reply_deltas(server, job, request, params, poll=False):
            for kind, value in _blocks(d):
                if kind != open_kind or kind == "tool_use":
                    yield close()
                    index += 1
                    open_kind = kind
                    if kind == "tool_use":
                        block = _tool_use(value)
                        yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                        yield _event("content_block_delta", {"index": index, "delta": {
                            "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
                        continue
                    start = {"type": kind, kind: ""}
                    if kind == "thinking":
                        start["signature"] = ""
                    yield _event("content_block_start", {"index": index, "content_block": start})
                key = "thinking_delta" if kind == "thinking" else "text_delta"
                yield _event("content_block_delta", {"index": index, "delta": {"type": key, kind: value}})
            if info:
                yield close()
                open_kind = None
                yield _event("message_delta", {"delta": {"stop_reason": _stop_reason(info),
                                                         "stop_sequence": None}, "usage": _usage(info)})
                yield _event("message_stop", {})
    except P.APIError as e:
        kind = _ERROR_TYPES.get(e.status, "api_error")
        yield _event("error", {"error": {"type": kind, "message": e.message}})
