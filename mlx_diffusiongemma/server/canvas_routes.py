"""The canvas over HTTP: `suffix` on `/v1/completions`, `response_format` on both OpenAI routes,
llama.cpp's `/infill` (the request editor plugins such as llama.vim and llama.vscode send) and
`/v1/edits` (OpenAI's legacy edit request: a selection rewritten, warm-started from itself, with
the text around it pinned).

A request that asks for a canvas verb gets a plan (`editing.infill.CanvasPlan`) on its `Params`;
the worker runs the plan's canvases after the prompt, on the same queue and batching as any
request, and sends the verb's reply (the middle alone, the JSON object). What cannot be done is
a 400 before any work: a schema that cannot be pinned, a suffix longer than the context, ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import mlx.core as mx
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..editing.complete import complete_plan
from ..editing.edit import edit_prompt, span_edit_plan
from ..editing.schema import json_plan
from ..editing.template import TemplateError
from ..errors import DiffusionGemmaError
from ..prompts.channels import Delta, TextStream
from ..prompts.render import prompt_ids
from . import protocol as P

MAX_EDIT_SLACK = 256  # positions a selection may grow by
MAX_EXTRA_CHUNKS = 256  # input_extra entries of one /infill request (llama.vim sends up to 16 or so)


@dataclass
class Server:
    """What the canvas routes use of the app (create_app's closures)."""

    model: Any
    tokenizer: Any
    config: Any
    read: Callable  # (request) -> the authorised request's body
    parse: Callable  # (body, kind) -> Params for the served model
    check_request: Callable
    submit: Callable
    items: Callable  # (job, request, poll) -> the job's items
    chat_prompt: Callable  # async (OpenAI chat body, params): sets the prompt ids, images, has_tools
    auth: Callable  # (request) -> None, or the 401
    read_body: Callable  # (request) -> the body, without the bearer check (routes with their own)


def response_format(body: dict) -> tuple[str, dict | None] | None:
    """("json_schema", schema), ("json_object", None) or None (text) from `response_format`."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise P.bad("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}",
                    param="response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return "json_object", None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise P.bad("'response_format.json_schema.schema' must be a JSON schema object",
                    param="response_format")
    return "json_schema", schema


async def attach_plan(server: Server, body: dict, params: P.Params) -> None:
    """Give `params` the canvas verb its request asks for (a suffix, a JSON schema), checked
    before any work; json_object only marks the reply to be checked (it has no schema to pin)."""
    suffix = body.get("suffix") if params.kind == "completion" else None
    if suffix is not None and not isinstance(suffix, str):
        raise P.bad("'suffix' must be a string", param="suffix")
    fmt = response_format(body)
    if suffix and fmt is not None:
        raise P.bad("'suffix' and 'response_format' cannot be combined", param="suffix")
    if fmt is not None and fmt[0] == "json_object":
        params.json_object = True
        return
    if not suffix and fmt is None:
        return
    if params.in_canvas:
        raise P.bad("in-canvas streaming is not available with a suffix or a JSON schema (the reply is "
                    "pinned text and holes)", param="stream_options")
    exact_unless_asked(body, params)
    options = params.options.updated(max_tokens=None)
    param = "suffix" if suffix else "response_format"
    try:
        if suffix:
            plan = await run_in_threadpool(_built, complete_plan, server.model, server.tokenizer, params.prompt_ids,
                                           suffix, params.max_tokens, options)
        else:
            plan = await run_in_threadpool(_built, json_plan, server.model, server.tokenizer, params.prompt_ids,
                                           fmt[1], options)
            params.stop = []  # a stop string would cut the object
    except TemplateError as e:
        code = "context_length_exceeded" if "context" in str(e) else None
        raise P.bad(f"{param}: {e}", param=param, code=code) from None
    params.plan = plan
    params.options = params.options.updated(max_tokens=plan.request.max_tokens)


def exact_unless_asked(body: dict, params: P.Params) -> None:
    """A canvas verb runs the exact path unless its request sends a "mode", as the Python API's
    verbs do: their accuracy is measured there (docs/editing.md), not on fast mode's instruments."""
    if body.get("mode") is None:
        params.options = params.options.updated(mode="exact")


def _built(build: Callable, *args, **kwargs):
    """A plan built on this (threadpool) thread with its arrays evaluated here: MLX evaluates an
    array on the stream of the thread that made it, and the engine thread has a stream of its own."""
    plan = build(*args, **kwargs)
    mx.eval([x for state in plan.request.canvases or () if state is not None
             for x in vars(state).values() if isinstance(x, mx.array)])
    return plan


def json_object_error(text: str) -> P.APIError | None:
    """The error for a json_object reply that does not parse as an object (None when it does)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return None
    return P.APIError(500, "the model's reply is not a JSON object (json_object has no schema to pin: send a "
                           "json_schema to have the object's shape pinned on the canvas)",
                      type="server_error", code="invalid_json_output")


# -- llama.cpp's /infill ------------------------------------------------------------------------------


def infill_body(body: dict, model_id: str) -> tuple[dict, str, str]:
    """llama.cpp's fields -> (the OpenAI-style body our checks read, the prefix text, the suffix).

    The prefix is the extra context (`input_extra`: files as name and text, then a blank line),
    then `input_prefix`, then `prompt` (the text typed at the cursor, after llama.cpp's FIM_MID)."""
    for name in ("input_prefix", "input_suffix", "prompt"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise P.bad(f"'{name}' must be a string", param=name)
    extra = body.get("input_extra") or []
    if not isinstance(extra, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text", ""), str) and isinstance(c.get("filename", ""), str)
            for c in extra):
        raise P.bad("'input_extra' must be a list of {\"filename\": string, \"text\": string}", param="input_extra")
    if len(extra) > MAX_EXTRA_CHUNKS:
        raise P.bad(f"'input_extra' has {len(extra)} chunks; at most {MAX_EXTRA_CHUNKS}", param="input_extra")
    context = "".join(f"{c.get('filename', '')}\n{c.get('text', '')}\n\n" for c in extra)
    prefix = context + (body.get("input_prefix") or "") + (body.get("prompt") or "")
    if not prefix:
        raise P.bad("give 'input_prefix' (or 'prompt'): the text before the cursor", param="input_prefix")
    out = {k: v for k, v in body.items() if k not in ("input_prefix", "input_suffix", "input_extra", "prompt")}
    out.setdefault("model", model_id)
    n = body.get("n_predict")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n < 0:  # -1: no limit of its own
        n = None
    if n is not None:
        out["max_tokens"] = n
    out.pop("n_predict", None)
    return out, prefix, body.get("input_suffix") or ""


# -- edits ---------------------------------------------------------------------------------------------


def edit_request(body: dict) -> tuple[str, str, tuple[int, int], float, int, bool]:
    """(text, instruction, selection, strength, slack, include_text) of a `/v1/edits` body, checked.
    By default the prompt is the instruction alone: the canvas carries the text (pinned around the
    selection); `include_text: true` also puts the text in the prompt (`edit`'s default)."""
    text, instruction = body.get("input"), body.get("instruction")
    if not isinstance(text, str) or not text:
        raise P.bad("'input' must be a non-empty string: the text to edit", param="input")
    if not isinstance(instruction, str) or not instruction:
        raise P.bad("'instruction' must be a non-empty string", param="instruction")
    sel = body.get("selection", [0, len(text)])
    if (not isinstance(sel, list) or len(sel) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in sel)
            or not 0 <= sel[0] < sel[1] <= len(text)):
        raise P.bad(f"'selection' must be [start, end] character offsets with 0 <= start < end <= {len(text)}",
                    param="selection")
    strength = body.get("strength", 0.5)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise P.bad("'strength' must be a number from 0 to 1 (the fraction of the selection renoised)",
                    param="strength")
    slack = body.get("slack", 4)
    if isinstance(slack, bool) or not isinstance(slack, int) or not 0 <= slack <= MAX_EDIT_SLACK:
        raise P.bad(f"'slack' must be an integer from 0 to {MAX_EDIT_SLACK}", param="slack")
    include_text = body.get("include_text", False)
    if not isinstance(include_text, bool):
        raise P.bad("'include_text' must be true or false", param="include_text")
    start = sel[0]
    while start > 0 and text[start - 1] in " \t":  # tokenizers attach a space to the next word
        start -= 1
    return text, instruction, (start, sel[1]), float(strength), slack, include_text


def routes(server: Server) -> list[Route]:
    async def infill(request: Request) -> Response:
        body, prefix, suffix = infill_body(await server.read(request), server.config.model_id)
        params = server.parse(body, "completion")
        params.prompt_ids = list(server.tokenizer.encode(prefix))
        if suffix:
            await attach_plan(server, {"suffix": suffix}, params)
        server.check_request(params)
        job = server.submit(params)
        if params.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_infill_sse(server, job, request, params), media_type="text/event-stream",
                                     headers=headers)
        content, info = "", {}
        async for d, data in reply_deltas(server, job, request, params, poll=True):
            content += d.content
            info = data or info
        return JSONResponse(_infill_object(params, content, info, stop=True))

    async def edits(request: Request) -> Response:
        body = await server.read(request)
        body.setdefault("model", server.config.model_id)
        params = server.parse(body, "completion")
        text, instruction, (start, end), strength, slack, include_text = edit_request(body)
        if params.stream:
            raise P.bad("'stream' is not supported on /v1/edits (the edit is one canvas verb)", param="stream")
        params.stop = []
        exact_unless_asked(body, params)
        prompt = edit_prompt(instruction, text, include_text)
        try:
            params.prompt_ids = await run_in_threadpool(prompt_ids, server.tokenizer, prompt, params.options.thinking)
            plan = await run_in_threadpool(_built, span_edit_plan, server.model, server.tokenizer, params.prompt_ids,
                                           text, [(start, end)], slack=slack, strength=strength,
                                           options=params.options.updated(max_tokens=None))
        except (TemplateError, DiffusionGemmaError) as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise P.bad(str(e), param="input", code=code) from None
        params.plan = plan
        params.options = params.options.updated(max_tokens=plan.request.max_tokens)
        server.check_request(params)
        job = server.submit(params)
        content, info = "", {}
        async for d, data in reply_deltas(server, job, request, params, poll=True):
            content += d.content
            info = data or info
        tail = len(text) - end
        return JSONResponse({
            "object": "edit", "created": P.now(), "model": params.model,
            "choices": [{"index": 0, "text": content, "replacement": content[start:len(content) - tail],
                         "selection": [start, len(content) - tail], "finish_reason": "stop"}],
            "usage": P.usage(info.get("prompt_tokens", 0), info.get("completion_tokens", 0),
                             info.get("cached_tokens")),
            "seed": info.get("seed"),
        })

    return [Route("/infill", infill, methods=["POST"]), Route("/v1/edits", edits, methods=["POST"]),
            Route("/edits", edits, methods=["POST"])]


async def reply_deltas(server: Server, job, request: Request, params: P.Params, poll: bool) -> AsyncIterator:
    """(Delta, None) per piece of a job's reply (thought, answer and tool calls apart for a chat
    reply that is not a canvas verb's), then (Delta(), info) at the end; an error is raised as an
    APIError. For the routes that answer in other APIs' shapes (/infill, /v1/edits, ollama.py)."""
    text = TextStream(params.stop, split_channels=params.kind == "chat" and params.plan is None)
    info: dict[str, Any] = {"completion_tokens": 0, "finish_reason": "length"}
    calls = 0
    async for kind, data in server.items(job, request, poll):
        if kind == "error":
            raise data if isinstance(data, P.APIError) else P.APIError(
                500, f"generation failed: {type(data).__name__}: {data}", type="server_error")
        d = Delta()
        if kind == "prefill":
            info.update(data)
        elif kind == "text":
            info["completion_tokens"] += data["tokens"]
            d = text.feed(data["text"])
        elif kind == "done":
            info.update(data)
            d = text.finish()
        calls += len(d.tool_calls)
        if d:
            yield d, None
        if text.stopped:
            info["finish_reason"] = "stop"
            info["stop_string"] = True
            job.cancel()
            break
    if calls and info["finish_reason"] == "stop":
        info["finish_reason"] = "tool_calls"
    yield Delta(), info


async def _infill_sse(server: Server, job, request: Request, params: P.Params) -> AsyncIterator[str]:
    try:
        async for d, info in reply_deltas(server, job, request, params, poll=False):
            body = _infill_object(params, d.content, info, stop=True) if info else {"content": d.content, "stop": False}
            yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    except P.APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"


def _infill_object(params: P.Params, content: str, info: dict, stop: bool) -> dict[str, Any]:
    """llama.cpp's /completion answer (the fields llama.vim and llama.vscode read)."""
    predicted = info.get("completion_tokens", 0)
    gen_s = info.get("generation_time", 0.0)
    return {
        "content": content, "stop": stop, "model": params.model,
        "stop_type": "eos" if info.get("finish_reason") == "stop" else "limit",
        "tokens_predicted": predicted, "tokens_evaluated": info.get("prompt_tokens", 0),
        "tokens_cached": info.get("cached_tokens", 0), "truncated": False,
        "timings": {"prompt_n": info.get("prompt_tokens", 0), "prompt_ms": 1000 * info.get("prefill_time", 0.0),
                    "predicted_n": predicted, "predicted_ms": 1000 * gen_s,
                    "predicted_per_second": predicted / gen_s if gen_s > 0 else 0.0},
    }
