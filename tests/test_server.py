"""`dgemma serve`: the OpenAI-compatible server on loopback, through the official `openai` client
(streaming and not, chat and completions, tools, reasoning) and raw HTTP for the error cases.

The demo model (random weights, canvas 32, char-level tokenizer with the Gemma 4 template) runs
in-process behind uvicorn on a free loopback port. Where known text is needed (reasoning, tool
calls, markers cut between blocks) `ScriptedModel` makes every decoder pass predict a script,
and the real sampler, engine and server do the rest.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

pytest.importorskip("starlette", reason="the [server] extra is not installed")
openai = pytest.importorskip("openai", reason="the [server-test] extra is not installed")

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.demo.files import SPECIAL_TOKENS, TURN_END
from mlx_diffusiongemma.demo.random import ensure_demo
from mlx_diffusiongemma.server import ServerConfig, create_app
from mlx_diffusiongemma.prompts.channels import TextStream

from helpers_server import EndlessModel, ScriptedModel, running

CANVAS = 32
FAST = {"max_denoising_steps": 4}  # keeps every request short on a CPU


@contextlib.contextmanager
def _home(home):
    """MLX_DIFFUSIONGEMMA_HOME set to `home` (where `--model demo` lives) for a while."""
    saved = os.environ.get("MLX_DIFFUSIONGEMMA_HOME")
    os.environ["MLX_DIFFUSIONGEMMA_HOME"] = str(home)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MLX_DIFFUSIONGEMMA_HOME"]
        else:
            os.environ["MLX_DIFFUSIONGEMMA_HOME"] = saved


def demo_folder(home):
    from mlx_diffusiongemma.demo.random import demo_dir

    with _home(home):
        return demo_dir()


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """A home for the demo checkpoint, shared by the in-process tests and `dgemma serve`."""
    home = tmp_path_factory.mktemp("home")
    ensure_demo(demo_folder(home))
    return home


@pytest.fixture(scope="module")
def demo(demo_home):
    return dg.load(demo_folder(demo_home))


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    with running(create_app(model, tok, ServerConfig(model_id="demo", max_tokens_limit=4096))) as url:
        yield url


def client(url: str, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=300, **kw)


def chat(c, content="Tell me a story", **kw):
    kw.setdefault("extra_body", {}).update(FAST)
    return c.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}], **kw)


def raw(url: str, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    if isinstance(body, str):
        body = body.encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    res = conn.getresponse()
    data = res.read().decode()
    conn.close()
    try:
        return res.status, json.loads(data)
    except json.JSONDecodeError:
        return res.status, data


def health(url):
    return raw(url, "GET", "/health")[1]


def wait_idle(url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(url)
        if h["active"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {health(url)}")


# ----------------------------------------------------------------------------------- chat and completions


def test_models_and_health(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["demo"]
    assert health(server)["status"] == "ok"


def test_chat_non_streaming(server):
    r = chat(client(server), max_tokens=40, seed=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "demo"
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Same seed, same text (the cache reused for the same prompt changes nothing).
    again = chat(client(server), max_tokens=40, seed=3)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens


def test_chat_streaming_matches_non_streaming_and_reports_usage(server):
    c = client(server)
    for seed in range(5, 15):  # a reply of more than one block (random weights: EOS comes anywhere)
        whole = chat(c, max_tokens=70, seed=seed)
        if whole.usage.completion_tokens > CANVAS + 4:
            break
    chunks = list(chat(c, max_tokens=70, seed=seed, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == (whole.choices[0].message.content or "")
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    # include_usage: one last chunk with no choices and the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    # More than one block of text: text arrives block by block, not at the end only.
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2


def test_completions_streaming_and_not(server):
    c = client(server)
    whole = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=50, seed=2, extra_body=FAST)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    parts = list(c.completions.create(model="demo", prompt="Once upon a time", max_tokens=50, seed=2,
                                      stream=True, extra_body=FAST))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    # Token ids as the prompt give the same as the string they encode to.
    status, body = raw(server, "POST", "/v1/completions", json.dumps(
        {"model": "demo", "prompt": "Once upon a time", "max_tokens": 50, "seed": 2, **FAST}))
    assert status == 200 and body["choices"][0]["text"] == whole.choices[0].text


def test_drafts_stream_extension(server, demo):
    model, _ = demo
    c = client(server)
    plain = chat(c, max_tokens=64, seed=9)
    chunks = list(chat(c, max_tokens=64, seed=9, stream=True, stream_options={"include_drafts": True}))
    drafts = [ch.model_extra["draft"] for ch in chunks if ch.model_extra.get("draft")]
    assert drafts, "no draft chunks"
    for d in drafts:
        assert len(d["pieces"]) == len(d["accepted"]) == len(d["eos"]) == CANVAS
        assert 1 <= d["step"] <= d["max_steps"] == 4
    # Steps count up inside each block; blocks come in order.
    keys = [(d["block"], d["step"]) for d in drafts]
    assert keys == sorted(keys) and keys[0] == (0, 1)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == (plain.choices[0].message.content or "")


def test_fast_mode_over_http(server, demo):
    """`mode: "fast"` runs fast mode: the tokens of the engine's fast path for the same prompt and
    seed, streamed or not, and alongside an exact request each keeps its solo result."""
    from mlx_diffusiongemma.diffusion.engine import Request, run
    from mlx_diffusiongemma.diffusion.options import FastOptions, SamplerOptions

    model, tok = demo
    eos = set(model.generation.eos_token_ids)
    c = client(server)
    ids = tok.encode("Sort these numbers: 42 7 19")
    kw = dict(model="demo", prompt=ids, max_tokens=70, seed=4)
    fast = c.completions.create(**kw, extra_body={**FAST, "mode": "fast"})
    exact = c.completions.create(**kw, extra_body={**FAST, "mode": "exact"})
    assert fast.model_extra["timings"]["mode"] == "fast" and exact.model_extra["timings"]["mode"] == "exact"
    for mode, answer in (("fast", fast), ("exact", exact)):
        ref = list(run(model, Request(ids, max_tokens=70, seed=4, fast=FastOptions() if mode == "fast" else None,
                                      sampler=SamplerOptions(max_denoising_steps=4))))[-1]
        assert answer.usage.completion_tokens == len(ref.tokens)
        assert answer.choices[0].text == tok.decode([t for t in ref.tokens if t not in eos])
    assert fast.model_extra["timings"]["steps_per_block"] != exact.model_extra["timings"]["steps_per_block"] or (
        fast.choices[0].text != exact.choices[0].text)  # the two paths really differ here
    streamed = "".join(p.choices[0].text for p in c.completions.create(
        **kw, stream=True, extra_body={**FAST, "mode": "fast"}))
    assert streamed == fast.choices[0].text
    # In-canvas streaming pins what it emits; fast mode keeps pins, so the stream completes whole.
    parts = list(c.completions.create(**kw, stream=True, stream_options={"in_canvas": True},
                                      extra_body={**FAST, "mode": "fast", "in_canvas_stability": 1}))
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    assert len("".join(p.choices[0].text for p in parts)) > 0
    # A fast request and an exact one at once: each gives its solo text.
    got, errors = {}, []

    def one(mode):
        try:
            got[mode] = client(server).completions.create(**kw, extra_body={**FAST, "mode": mode}).choices[0].text
        except Exception as e:  # collected: an assert in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=one, args=(m,)) for m in ("fast", "exact")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == {"fast": fast.choices[0].text, "exact": exact.choices[0].text}


def test_server_default_mode(demo):
    model, tok = demo
    with pytest.raises(ValueError, match="default_mode"):
        create_app(model, tok, ServerConfig(default_mode="quick"))
    assert ServerConfig().default_mode == "fast"  # fast mode by default, as the CLI and the Python API
    for mode in ("fast", "exact"):
        with running(create_app(model, tok, ServerConfig(model_id="demo", default_mode=mode))) as url:
            c = client(url)
            r = c.completions.create(model="demo", prompt="Hi", max_tokens=8, seed=1, extra_body=FAST)
            assert r.model_extra["timings"]["mode"] == mode
            other = "exact" if mode == "fast" else "fast"  # a request's own "mode" wins
            r = c.completions.create(model="demo", prompt="Hi", max_tokens=8, seed=1, extra_body={**FAST, "mode": other})
            assert r.model_extra["timings"]["mode"] == other
            # A canvas verb (a suffix: infill) runs the exact path unless the request asks, as in Python.
            r = c.completions.create(model="demo", prompt="Hi", suffix=" end", max_tokens=8, seed=1, extra_body=FAST)
            assert r.model_extra["timings"]["mode"] == "exact"
            r = c.completions.create(model="demo", prompt="Hi", suffix=" end", max_tokens=8, seed=1,
                                     extra_body={**FAST, "mode": "fast"})
            assert r.model_extra["timings"]["mode"] == "fast"


def test_concurrent_streams_each_equal_their_solo_result(server):
    """Batched denoising changes no request's tokens: each of 4 concurrent streams equals the
    same request made alone."""
    c = client(server)
    solo = {s: chat(c, f"prompt {s}", max_tokens=64, seed=s).choices[0].message.content or "" for s in range(4)}
    got: dict[int, str] = {}
    errors = []

    def one(s):
        try:
            got[s] = "".join(ch.choices[0].delta.content or "" for ch in chat(
                client(server), f"prompt {s}", max_tokens=64, seed=s, stream=True) if ch.choices)
        except Exception as e:  # collected: an assert in a thread would be lost
            errors.append(e)

    before = health(server)["batch_sizes"]
    threads = [threading.Thread(target=one, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == solo
    # And they were denoised together: decoder passes over more than one request happened.
    after = health(server)["batch_sizes"]
    assert any(int(n) > 1 and after[n] > before.get(n, 0) for n in after), after


def test_stop_strings_cut_the_text(server):
    c = client(server)
    full = chat(c, max_tokens=64, seed=4).choices[0].message.content
    stop = full[20:23]
    cut = full[: full.find(stop)]
    r = chat(c, max_tokens=64, seed=4, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = list(chat(c, max_tokens=64, seed=4, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------- reasoning and tools

CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture
def scripted(demo):
    """A server over ScriptedModel; call it with the script."""
    model, tok = demo
    end = SPECIAL_TOKENS.index(TURN_END)
    stack = []

    def start(script: str):
        app = create_app(ScriptedModel(model, tok, script, end), tok, ServerConfig(model_id="demo", prompt_cache_size=0))
        ctx = running(app)
        stack.append(ctx)
        return ctx.__enter__()

    yield start
    for ctx in stack:
        ctx.__exit__(None, None, None)


def test_reasoning_and_tool_call_split_across_blocks(scripted, demo):
    _, tok = demo
    # A thought, an answer, then a tool call whose string delimiter <|"|> (five tokens here)
    # straddles a block boundary.
    head = "<|channel>thought\nHm.<channel|>Ok."
    call_at = len(tok.encode(CALL[: CALL.index('<|"|>') + 2]))
    pad = -(len(tok.encode(head)) + call_at) % CANVAS or CANVAS
    script = head + "x" * pad + CALL
    url = scripted(script)
    c = client(url)
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=TOOLS, max_tokens=160, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "Hm." == msg.model_extra["reasoning"]
    assert msg.content == "Ok." + "x" * pad
    [call] = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    # The same through the stream: reasoning deltas, content deltas, one tool-call delta.
    chunks = list(c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=TOOLS, max_tokens=160, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.model_extra.get("reasoning", "") or "" for d in deltas) == "Hm."
    assert "".join(d.content or "" for d in deltas) == msg.content
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_thought_spanning_two_blocks_in_the_stream(scripted, demo):
    _, tok = demo
    head = "<|channel>thought\n"
    fill = CANVAS - len(tok.encode(head))
    c = client(scripted(head + "a" * fill + "b" * 5 + "<channel|>The answer."))
    chunks = list(c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "?"}],
                                            max_tokens=96, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas if d.model_extra.get("reasoning_content")]
    assert reasoning == ["a" * fill, "b" * 5]  # block by block, as it is committed
    assert "".join(d.content or "" for d in deltas) == "The answer."
    assert chunks[-1].choices[0].finish_reason == "stop"


FULL = "<|channel>thought\nplan<channel|>Hello <|tool_call>call:f{a:<|\"|>x}y<|\"|>}<tool_call|> end"


@pytest.mark.parametrize("pieces", [2, 3])
def test_text_stream_is_independent_of_where_text_is_cut(pieces):
    """Every way of cutting the text into 2 or 3 pieces gives the same content, reasoning and calls."""
    def run(parts, stop=()):
        ts = TextStream(stop)
        outs = [ts.feed(p) for p in parts] + [ts.finish()]
        return ("".join(o.content for o in outs), "".join(o.reasoning for o in outs),
                [(c["function"]["name"], c["function"]["arguments"]) for o in outs for c in o.tool_calls])

    whole = run([FULL])
    assert whole == ("Hello  end", "plan", [("f", '{"a": "x}y"}')])
    n = len(FULL)
    cuts = [(i,) for i in range(1, n)] if pieces == 2 else [(i, j) for i in range(1, n, 3) for j in range(i + 1, n, 2)]
    for cut in cuts:
        bounds = (0, *cut, n)
        parts = [FULL[a:b] for a, b in zip(bounds, bounds[1:])]
        assert run(parts) == whole, parts
        assert run(parts, stop=["o <"]) == ("Hell", "plan", []), parts


def test_text_stream_unparsable_call_is_kept_as_text():
    ts = TextStream()
    out = [ts.feed("<|tool_call>not a call<tool_call|>!"), ts.finish()]
    assert "".join(o.content for o in out) == "<|tool_call>not a call!" and not any(o.tool_calls for o in out)


# ----------------------------------------------------------------------------------- sessions


def test_kv_cache_reused_when_the_conversation_goes_on(server):
    """Turn 2 reuses the cache up to turn 1's prompt, though the client sends back only the
    answer (not what the last canvas or the thought held), and gives the same tokens as a
    server without a cache."""
    c = client(server)
    first = [{"role": "user", "content": "Hello there, a first message."}]
    r1 = c.chat.completions.create(model="demo", messages=first, max_tokens=40, seed=1, extra_body=FAST)
    history = first + [{"role": "assistant", "content": r1.choices[0].message.content or ""},
                       {"role": "user", "content": "And a second one."}]
    r2 = c.chat.completions.create(model="demo", messages=history, max_tokens=40, seed=2, extra_body=FAST)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens // 2


def test_cached_and_fresh_prefill_give_the_same_reply(demo, server):
    model, tok = demo
    c = client(server)
    first = [{"role": "user", "content": "Something else to say."}]
    r1 = c.chat.completions.create(model="demo", messages=first, max_tokens=40, seed=1, extra_body=FAST)
    history = first + [{"role": "assistant", "content": r1.choices[0].message.content or ""},
                       {"role": "user", "content": "More."}]
    warm = c.chat.completions.create(model="demo", messages=history, max_tokens=64, seed=7, extra_body=FAST)
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    with running(create_app(model, tok, ServerConfig(model_id="demo", prompt_cache_size=0))) as url:
        cold = client(url).chat.completions.create(model="demo", messages=history, max_tokens=64, seed=7,
                                                   extra_body=FAST)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == warm.choices[0].message.content


# ----------------------------------------------------------------------------------- errors and safety

CHAT = "/v1/chat/completions"


def body(**kw):
    return json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **FAST, **kw})


@pytest.mark.parametrize("payload, status, param", [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    (body(model="gpt-4"), 404, "model"),
    (body(model=""), 400, "model"),
    (body(model=7), 400, "model"),
    (body(messages=[]), 400, "messages"),
    (body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages"),
    (body(max_tokens=0), 400, "max_tokens"),
    (body(max_tokens=10**9), 400, "max_tokens"),
    (body(max_tokens="ten"), 400, "max_tokens"),
    (body(n=2), 400, "n"),
    (body(entropy_bound=-1), 400, "entropy_bound"),
    (body(entropy_bound=0), 400, "entropy_bound"),  # the knob's own check (> 0), as on the CLI
    (body(t_min=5, t_max=0.1), 400, None),  # t_max <= t_min; t_min = 0 is valid (reference, issue 14)
    (body(max_denoising_steps=1.5), 400, "max_denoising_steps"),
    (body(stop=[1]), 400, "stop"),
    (body(stream_options={"include_usage": True}), 400, "stream_options"),
    (body(tools="nope"), 400, "tools"),
    (body(seed=-1), 400, "seed"),
    (body(mode="quick"), 400, "mode"),
    (body(mode=1), 400, "mode"),
])
def test_bad_requests_get_openai_errors(server, payload, status, param):
    got, answer = raw(server, "POST", CHAT, payload)
    assert got == status, answer
    err = answer["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_prompt_over_the_context(server, demo):
    model, _ = demo
    limit = model.text.max_position_embeddings
    got, answer = raw(server, "POST", "/v1/completions", json.dumps(
        {"model": "demo", "prompt": [7] * (limit - 10), "max_tokens": 64}))
    assert got == 400 and answer["error"]["code"] == "context_length_exceeded"
    got, answer = raw(server, "POST", "/v1/completions", json.dumps({"model": "demo", "prompt": [10**7]}))
    assert got == 400 and answer["error"]["param"] == "prompt"


def test_routes_methods_and_sizes(demo):
    model, tok = demo
    with running(create_app(model, tok, ServerConfig(model_id="demo", max_body_bytes=2000))) as url:
        got, answer = raw(url, "GET", "/v1/nothing")
        assert got == 404 and "error" in answer
        got, answer = raw(url, "GET", CHAT)
        assert got == 405 and "error" in answer
        got, answer = raw(url, "POST", CHAT, body(messages=[{"role": "user", "content": "x" * 5000}]))
        assert got == 413 and answer["error"]["code"] == "request_too_large"
        # The server keeps serving after every error above.
        got, answer = raw(url, "POST", CHAT, body())
        assert got == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_api_key(demo):
    model, tok = demo
    with running(create_app(model, tok, ServerConfig(model_id="demo", api_key="s3cret"))) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        got, answer = raw(url, "POST", CHAT, body())
        assert got == 401 and answer["error"]["code"] == "invalid_api_key"
        assert raw(url, "GET", "/health")[0] == 200  # health and the page stay open
        assert raw(url, "GET", "/")[0] == 200
        r = chat(client(url, api_key="s3cret"), max_tokens=8)
        assert r.choices[0].message.role == "assistant"


def _open_stream(url: str, payload: str) -> socket.socket:
    """Send a streaming request and read until the first event; returns the open socket."""
    u = urllib.parse.urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    data = payload.encode()
    s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data:" not in got:
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    return s


def test_full_queue_answers_503_and_disconnects_cancel(demo):
    model, tok = demo
    long = body(max_tokens=CANVAS * 40, stream=True, max_denoising_steps=16)
    # A reply of random weights can end early, before the server sees the client gone (it polls
    # every 0.25 s): the model here never ends a reply, so each request is still running then.
    endless = EndlessModel(model)
    with running(create_app(endless, tok, ServerConfig(model_id="demo", max_active=1, max_queue=1))) as url:
        a = _open_stream(url, long)  # being denoised
        b = _open_stream(url, long)  # waiting (its first event, the role chunk, comes at once)
        deadline = time.monotonic() + 10
        while health(url)["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        got, answer = raw(url, "POST", CHAT, body())
        assert got == 503 and answer["error"]["code"] == "queue_full"
        with pytest.raises(openai.APIStatusError) as e:
            chat(client(url), max_tokens=8)
        assert e.value.status_code == 503
        # Both clients go away: their work stops (a 1280-token reply would take far longer).
        a.close()
        b.close()
        h = wait_idle(url, timeout=20)
        assert h["cancelled"] == 2 and h["completed"] == 0
        # A non-streaming client that disconnects is cancelled too.
        u = urllib.parse.urlparse(url)
        s = socket.create_connection((u.hostname, u.port))
        data = body(max_tokens=CANVAS * 40, max_denoising_steps=16).encode()
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        deadline = time.monotonic() + 10
        while health(url)["active"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.close()
        assert wait_idle(url, timeout=20)["cancelled"] == 3
        assert raw(url, "POST", CHAT, body())[0] == 200


def test_web_page_is_served(server):
    got, page = raw(server, "GET", "/")
    assert got == 200 and "<title>DiffusionGemma chat</title>" in page and "include_drafts" in page


def test_cli_serve(demo_home):
    env = {**os.environ, "MLX_DIFFUSIONGEMMA_HOME": str(demo_home)}
    bad = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma.cli.app", "serve", "--model", "demo",
                          "--chat-template-args", "{nope"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --chat-template-args")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_diffusiongemma.cli.app", "serve", "--model", "demo",
                             "--port", str(port), "--log-level", "WARNING", "--fast"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if raw(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        assert [m.id for m in client(url).models.list().data] == ["demo"]
        # --fast: a request that names no mode runs fast mode.
        r = client(url).completions.create(model="demo", prompt="Hi", max_tokens=8, seed=1, extra_body=FAST)
        assert r.model_extra["timings"]["mode"] == "fast"
        # SIGTERM with a stream open: the stream ends with [DONE] (an error event before it when
        # the reply was still running), and the process exits.
        stream = _open_stream(url, body(max_tokens=2048, stream=True, max_denoising_steps=16))
        proc.terminate()
        got = b""
        while chunk := stream.recv(65536):
            got += chunk
        stream.close()
        assert re.findall(rb"^data: (.*?)\r?$", got, re.M)[-1] == b"[DONE]", got[-300:]
        assert proc.wait(timeout=20) == -15  # uvicorn ends with the signal it stopped for
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------------- streaming inside a canvas


def test_prefix_streamer_pins_what_it_emits(demo):
    """On the engine directly, with scripted (certain) predictions and a stop test that needs 3
    stable steps: the prefix is settled (stable over 2 steps) at step 2, emitted and pinned then,
    before the block stops; every block commits exactly what was emitted first."""
    from mlx_diffusiongemma.diffusion.engine import Request, run
    from mlx_diffusiongemma.diffusion.options import SamplerOptions
    from mlx_diffusiongemma.diffusion.events import BlockEvent, StepEvent
    from mlx_diffusiongemma.server.in_canvas import PrefixStreamer

    model, tok = demo
    script = "Settled text leaves early, pinned. " * 2
    scripted = ScriptedModel(model, tok, script, SPECIAL_TOKENS.index(TURN_END))
    ids = tok.encode("<|turn>user\nhello<turn|>\n<|turn>model\n")
    streamer = PrefixStreamer(model.generation.eos_token_ids, 96, stability=2, max_entropy=0.5)
    emitted: dict[int, list[tuple[int, int]]] = {}
    blocks = []
    for event in run(scripted, Request(ids, max_tokens=96, seed=0, hooks=(streamer,),
                                       sampler=SamplerOptions(max_denoising_steps=8, stability_threshold=3))):
        if isinstance(event, StepEvent):
            got = streamer.take()
            if got:
                emitted.setdefault(event.block, []).append((event.step, len(got)))
        elif isinstance(event, BlockEvent):
            assert event.steps > 2  # the block went on after the emission
            assert event.tokens[: len(streamer.emitted_in(event.block))] == streamer.emitted_in(event.block)
            blocks.append(event.tokens)
    # Each block: the whole canvas (or up to the end of turn) settles at step 2, in one piece.
    assert sorted(emitted) == list(range(len(blocks)))
    assert all(e[0][0] == 2 for e in emitted.values())
    assert tok.decode([t for b in blocks for t in b if t != SPECIAL_TOKENS.index(TURN_END)]) == script


def test_in_canvas_stream_over_http(scripted, demo):
    """Scripted (certain) predictions with stability 1: each block's text leaves after its first
    step, before the block commits at its second; the text is the block-only text. On the exact
    path: fast mode commits so certain a canvas at its first step (the early commit)."""
    _, tok = demo
    script = "In-canvas streaming sends settled text early. " * 2
    c = client(scripted(script))
    kw = dict(model="demo", messages=[{"role": "user", "content": "?"}], max_tokens=96, stream=True,
              extra_body={"mode": "exact"})
    plain = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw) if ch.choices)
    chunks = list(c.chat.completions.create(
        **{**kw, "extra_body": {"in_canvas_stability": 1, "in_canvas_max_entropy": 0.1, "mode": "exact"}},
        stream_options={"in_canvas": True, "include_drafts": True}))
    order = []  # ("draft", block, step) and ("text", n chars) in arrival order
    for ch in chunks:
        d = ch.model_extra.get("draft")
        if d:
            order.append(("draft", d["block"], d["step"], sum(d["pinned"] or [])))
        elif ch.choices and ch.choices[0].delta.content:
            order.append(("text", len(ch.choices[0].delta.content)))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain == script
    # Block 0: step 1's draft, then its text (emitted and pinned), then step 2 shows it pinned.
    assert order[:3] == [("draft", 0, 1, 0), ("text", CANVAS), ("draft", 0, 2, CANVAS)]


def test_in_canvas_parameters_are_checked(server):
    got, answer = raw(server, "POST", CHAT, body(stream=True, stream_options={"in_canvas": "yes"}))
    assert got == 400 and answer["error"]["param"] == "in_canvas"
    got, answer = raw(server, "POST", CHAT, body(in_canvas_stability=0))
    assert got == 400 and answer["error"]["param"] == "in_canvas_stability"


# ----------------------------------------------------------------------------------- batched decoder


def test_batched_decoder_rows_equal_single_passes(demo_home):
    """Model.denoise_batch over requests with different prefixes (shorter and longer than the
    sliding window), with and without self-conditioning and top-k: each row equals that request's
    own decoder pass to float32 tolerance, and gives the same argmax."""
    import mlx.core as mx

    from mlx_diffusiongemma.checkpoint.loading import load_model

    model, _ = load_model(demo_folder(demo_home), dtype=mx.float32)
    assert model.text.sliding_window < 100
    key = mx.random.key(3)
    calls = []  # (canvas, cache, self-conditioning, top_k) of each request
    for r, (n, sc, top_k) in enumerate([(5, False, None), (100, True, None), (40, True, 16), (1, True, None)]):
        cache = model.make_cache()
        model.extend(cache, [(7 * i + r) % model.vocab_size for i in range(n)])
        k1, k2, key = mx.random.split(key, 3)
        canvas = mx.random.randint(0, model.vocab_size, (1, CANVAS), key=k1)
        cond = mx.random.normal((1, CANVAS, model.vocab_size), key=k2) * 3 if sc else None
        calls.append((canvas, cache, cond, top_k))
    batched = model.denoise_batch(*zip(*calls))
    for r, (canvas, cache, cond, top_k) in enumerate(calls):
        alone = model.denoise(canvas, cache, cond, self_conditioning_top_k=top_k)
        assert mx.allclose(batched[r : r + 1], alone, atol=1e-4, rtol=1e-4).item()
        assert (batched[r].argmax(-1) == alone[0].argmax(-1)).all().item()


def test_batched_fast_rows_equal_single_passes(demo_home):
    """Model.denoise_rows_batch (fast mode's passes of several requests in one) over requests with
    different prefixes, different live rows (padding included) and with or without
    self-conditioning: each request's logits, and the canvas K/V it writes, equal its own
    denoise_rows pass to float32 tolerance, with the same argmax."""
    import mlx.core as mx

    from mlx_diffusiongemma.checkpoint.loading import load_model

    model, _ = load_model(demo_folder(demo_home), dtype=mx.float32)
    key = mx.random.key(5)
    calls, alone_kv = [], []
    for r, (n, rows, soft) in enumerate([(5, [0, 3, 4, CANVAS], False), (100, list(range(CANVAS)), True),
                                         (40, [7, 1, 30, 31, CANVAS, CANVAS], True)]):
        cache = model.make_cache()
        model.extend(cache, [(5 * i + r) % model.vocab_size for i in range(n)])
        k1, k2, key = mx.random.split(key, 3)
        canvas = mx.random.randint(0, model.vocab_size, (1, CANVAS), key=k1)
        kvs = []
        for _ in range(2):  # the same canvas K/V for the batched and the solo pass
            kv = model.make_canvas_kv()
            model.denoise_rows(canvas, mx.arange(CANVAS), cache, kv)  # a first pass fills every row
            kvs.append(kv)
        cond = mx.random.normal((1, len(rows), model.text.hidden_size), key=k2) if soft else None
        calls.append((canvas, mx.array(rows, dtype=mx.int32), cache, kvs[0], cond))
        alone_kv.append(kvs[1])
    batched = model.denoise_rows_batch(*zip(*calls))
    assert len(batched) == len(calls)
    for (canvas, rows, cache, kv, cond), solo_kv, got in zip(calls, alone_kv, batched):
        alone = model.denoise_rows(canvas, rows, cache, solo_kv, cond)
        assert got.shape == alone.shape == (1, rows.shape[0], model.vocab_size)
        assert mx.allclose(got, alone, atol=1e-4, rtol=1e-4).item()
        assert (got[0].argmax(-1) == alone[0].argmax(-1)).all().item()
        for a, b in zip(kv.keys + kv.values, solo_kv.keys + solo_kv.values):
            assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()


# ----------------------------------------------------------------------------------- bounded load


def test_load_concurrent_streams_complete_and_memory_is_flat(demo):
    """3 rounds of 6 concurrent streaming clients (more than the 4 denoised at once, so some
    wait): every stream complete and well formed (scripts/server_load.py checks each chunk), and
    MLX's active memory and the process's resident memory no higher after round 3 than after
    round 1 (the prompt cache is bounded, finished requests leave nothing behind)."""
    import mlx.core as mx

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from server_load import rss_mb, run_level

    model, tok = demo
    config = ServerConfig(model_id="demo", max_active=4, max_queue=8, prompt_cache_size=2)
    base = {"model": "demo", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 64, **FAST}
    with running(create_app(model, tok, config)) as url:
        memory = []
        for _ in range(3):
            level = run_level(url, 6, 1, base, timeout=120)
            assert level["errors"] == [] and level["responses"] == 6 and level["tokens"] > 0
            wait_idle(url)
            memory.append((mx.get_active_memory() / 2**20, rss_mb(os.getpid())))
        h = health(url)
    assert h["completed"] >= 18 and h["failed"] == 0
    assert max(int(n) for n in h["batch_sizes"]) > 1
    (active1, rss1), _, (active3, rss3) = memory
    assert active3 <= active1 + 2, memory  # MB
    assert rss3 <= rss1 + 40, memory
