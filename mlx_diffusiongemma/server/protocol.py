"""Request bodies -> validated parameters; OpenAI-style errors and response objects.

Validation is written out by hand (no schema library) so every message names the field and
what was wrong with it, as OpenAI's own 400 answers do. Unknown fields are ignored, as clients
send many (`temperature`, `user`, ...) that mean nothing to a diffusion sampler.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..diffusion.options import (
    GENERATION_KNOBS,
    DEFAULT_MODE,
    MODES,
    FastOptions,
    GenerationOptions,
    KnobError,
    SamplerOptions,
    check_knob,
)

# Diffusion knobs accepted as extra request fields (the names of the checkpoint's
# generation_config.json and of the engine, as vLLM's and mlx-vlm's DiffusionGemma options use).
SAMPLER_FIELDS = tuple(SamplerOptions.__dataclass_fields__)
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256
MAX_JSON_DEPTH = 64  # a request's JSON nesting (tool schemas use a handful of levels)
MAX_TEMPLATE_ARG_CHARS = 1024  # a chat_template_kwargs string value (the template's switches are short)


class APIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Params:
    """Everything a generation needs from a request, validated."""

    kind: str  # "chat" | "completion"
    model: str
    options: GenerationOptions  # max_tokens (always set), seed, sampler, fast (the request's "mode")
    prompt_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    include_drafts: bool = False
    in_canvas: bool = False
    in_canvas_stability: int = 2
    in_canvas_max_entropy: float = 0.5
    has_tools: bool = False
    # A canvas verb (editing.infill.CanvasPlan: a suffix, a JSON schema) run instead of a plain
    # reply; the worker runs its request after the prompt and sends its reply (canvas_routes.py).
    plan: Any = None
    json_object: bool = False  # response_format json_object: the reply must parse as an object
    images: list = field(default_factory=list)  # processed images of the prompt (image_parts.py)

    @property
    def max_tokens(self) -> int:
        return self.options.max_tokens


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, nested at most MAX_JSON_DEPTH levels, its strings valid Unicode."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:  # the parser recurses once per level: thousands of levels end here
        raise bad(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json") from None
    except ValueError:  # an integer over Python's 4300-digit conversion limit
        raise bad("the request body holds a number with too many digits", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH (later code, the chat template included, recurses
    over the values) and strings with a lone surrogate (`"\\ud800"` is valid JSON but not text: the
    tokenizer cannot encode it). Walked with a stack, not recursion."""
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", param=field,
                      code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, field or key)
                stack.append((item, depth + 1, field or key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, field) for item in value)
        elif isinstance(value, str):
            _check_text(value, field)


def _check_text(text: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("a string in the request holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                  "it is not text", param=field, code="invalid_json") from None


def _json_number(body: dict, name: str) -> int | float | None:
    """The body's field `name` if it is a JSON number (None when absent or null)."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise bad(f"'{name}' must be a number, got {json.dumps(value)[:40]}", param=name)
    return value


def _number(body: dict, name: str, kind: type, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Any:
    """A request field that is not a generation knob (`n`, the in-canvas streaming settings)."""
    value = _json_number(body, name)
    if value is None:
        return None
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise bad(f"'{name}' must be an integer, got {value}", param=name)
        value = int(value)
    elif not math.isfinite(value):
        raise bad(f"'{name}' must be finite", param=name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise bad(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value}", param=name)
    if hi is not None and value > hi:
        raise bad(f"'{name}' must be <= {hi}, got {value}", param=name)
    return kind(value)


def _knob(body: dict, name: str, knob: str | None = None) -> Any:
    """The generation knob `knob` (default: `name`) from the body's field `name`: a JSON number of
    the right kind, in the knob's range (`diffusion.options`, the one definition the CLI and the
    Python API check against too)."""
    knob = knob or name
    value = _json_number(body, name)
    if value is None:
        return None
    spec = GENERATION_KNOBS[knob]
    if spec.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 512.0 is 512
    try:
        return check_knob(knob, value, spec)
    except KnobError as e:
        raise bad(str(e).replace(knob, name, 1), param=name) from None


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false", param=name)
    return value


def parse_common(body: dict, kind: str, *, default_max_tokens: int, max_tokens_limit: int,
                 default_mode: str = DEFAULT_MODE, served_model: str = "default_model") -> Params:
    """The fields shared by chat and completions (everything but the prompt); a request without a
    "mode" runs in `default_mode` (fast mode; `dgemma serve --exact` makes it the exact path).
    `model` may be left out: one model is served (`served_model`), as mlx_lm.server's documented
    requests assume."""
    model = body.get("model")
    if model is None:
        model = served_model
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string (GET /v1/models lists it) or left out", param="model")
    _refuse_unsupported(body)
    n = _number(body, "n", int, lo=1)
    if n not in (None, 1):
        raise bad("'n' must be 1: one completion per request", param="n")
    max_tokens = _max_tokens(body, "max_completion_tokens", max_tokens_limit)
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens", max_tokens_limit)
    seed = _knob(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters",
                  param="stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", param="stream_options")
    options = options or {}
    if options and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    knobs = {name: _knob(body, name) for name in SAMPLER_FIELDS}
    mode = body.get("mode", default_mode)
    if mode not in MODES:
        raise bad(f"'mode' must be one of {', '.join(repr(m) for m in MODES)}", param="mode")
    try:
        generation = GenerationOptions(max_tokens=max_tokens or default_max_tokens, seed=seed,
                                       sampler=SamplerOptions(**knobs), fast=FastOptions() if mode == "fast" else None)
    except ValueError as e:  # a pair of knobs that do not go together (t_max <= t_min)
        raise bad(str(e)) from None
    return Params(
        kind=kind, model=model, options=generation,
        stop=[s for s in stop if s], stream=stream,
        include_usage=_bool(options, "include_usage"), include_drafts=_bool(options, "include_drafts"),
        in_canvas=_bool(options, "in_canvas"),
        in_canvas_stability=_number(body, "in_canvas_stability", int, lo=1, hi=64) or 2,
        in_canvas_max_entropy=_or(_number(body, "in_canvas_max_entropy", float, lo=0), 0.5),
    )


def _refuse_unsupported(body: dict) -> None:
    """OpenAI fields that would change the reply's shape and that this server cannot honour: a 400
    that says so, rather than a 200 without what was asked for (`false`, `null` and a
    `top_logprobs` of 0 ask for nothing and pass)."""
    why = {"logprobs": "the sampler commits tokens over several denoising steps and keeps no per-token "
                       "log-probability",
           "top_logprobs": "the sampler keeps no per-token log-probability",
           "echo": "send the prompt back yourself"}
    for name, reason in why.items():
        value = body.get(name)
        if value is None or value is False or (name == "top_logprobs" and value == 0 and value is not True):
            continue
        raise bad(f"'{name}' is not supported by this server ({reason})", param=name)


def _max_tokens(body: dict, name: str, limit: int) -> int | None:
    """`max_tokens` (or its newer name `max_completion_tokens`), within the server's limit."""
    value = _knob(body, name, "max_tokens")
    if value is not None and value > limit:
        raise bad(f"'{name}' must be <= {limit}, got {value}", param=name)
    return value


def _or(value, default):
    return default if value is None else value


def _text_content(content: Any, where: str) -> str:
    """OpenAI message content: a string, or a list of parts of which only text is supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise bad(f"{where}: only text content parts are supported", param="messages")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}: a text part needs a string 'text'", param="messages")
            out.append(part["text"])
        return "".join(out)
    raise bad(f"{where}: 'content' must be a string or a list of text parts", param="messages")


def chat_messages(body: dict) -> list[dict[str, Any]]:
    """Messages as the chat template takes them (text content, tool calls' arguments as objects)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", param="messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{where}: unknown role {json.dumps(role)}", param="messages")
        msg: dict[str, Any] = {"role": role, "content": _text_content(m.get("content"), where)}
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise bad(f"{where}: 'tool_calls' must be a list", param="messages")
            msg["tool_calls"] = [_history_call(c, where) for c in calls]
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def _history_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"{where}: each tool call needs a function with a name", param="messages")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise bad(f"{where}: tool call arguments are not valid JSON", param="messages") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def chat_tools(body: dict) -> list[dict[str, Any]] | None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict):  # OpenAI's {"type": "function", "function": {"name": ...}}: force that call
        raise bad("'tool_choice' as an object (forcing a given function) is not supported: the model decides "
                  "whether to call; send 'auto' or 'none'", param="tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad("'tool_choice' must be 'auto' or 'none'", param="tool_choice")
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise bad("'tools' must be a list of {type: function, function: {name, ...}}", param="tools")
    return tools if tools and choice != "none" else None


def check_template_kwargs(extra: Any, allowed: frozenset[str], field: str = "chat_template_kwargs") -> None:
    """`chat_template_kwargs` may set only the chat template's own variables (`allowed`, from
    `prompts.render.template_variables`), each to a JSON scalar or a short string: never another
    template, `tokenize` or `return_tensors` (they would change what the renderer does)."""
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise bad(f"'{field}' must be an object", param=field)
    for key, value in extra.items():
        if key not in allowed:
            raise bad(f"'{field}.{key}' is not accepted: this model's chat template takes "
                      f"{', '.join(sorted(allowed))}", param=field)
        if isinstance(value, str) and len(value) > MAX_TEMPLATE_ARG_CHARS:
            raise bad(f"'{field}.{key}' is longer than {MAX_TEMPLATE_ARG_CHARS} characters", param=field)
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise bad(f"'{field}.{key}' must be true/false, a number or a string", param=field)


def template_kwargs(body: dict, defaults: dict[str, Any]) -> dict[str, Any]:
    """Server --chat-template-args, overridden by the request's `chat_template_kwargs`
    (vLLM's name) and the `enable_thinking` / `reasoning_effort` shorthands. Thinking is off
    unless asked for, as in the CLI and the Python API (the chat template, through mlx-lm's
    tokenizer wrapper, would otherwise turn it on)."""
    extra = body.get("chat_template_kwargs")
    if extra is not None and not isinstance(extra, dict):
        raise bad("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    out = {"enable_thinking": False, **defaults, **(extra or {})}
    if "enable_thinking" in body:
        out["enable_thinking"] = _bool(body, "enable_thinking")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise bad("'reasoning_effort' must be none, minimal, low, medium or high", param="reasoning_effort")
        out["enable_thinking"] = effort not in ("none", "minimal")
    return out


def completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty", param="prompt")
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise bad("'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
              param="prompt")


# -- responses --------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def envelope(kind: str, rid: str, model: str, created: int, stream: bool) -> dict[str, Any]:
    obj = ("chat.completion.chunk" if stream else "chat.completion") if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": "mlx-diffusiongemma"}


def now() -> int:
    return int(time.time())
