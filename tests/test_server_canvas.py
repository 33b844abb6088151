"""The canvas over HTTP: `/v1/completions` with `suffix`, llama.cpp's `/infill` (raw HTTP in the
shape llama.vim sends), `response_format` (json_schema pinned on the canvas, json_object checked), `/v1/edits` (a
selection rewritten from itself, the rest pinned),
Ollama's `/api/chat`, `/api/generate`, `/api/tags`, `/api/show` through the official `ollama`
client and Anthropic's `/v1/messages` through `anthropic` (thinking and tool calls on a scripted
model, the call cut between two canvases), each driven by the official `openai`
client where it has the field, equal to the Python API
(`complete`, `fill_json`, `edit`) and `dgemma complete` for equal seeds; and the hostile inputs of each,
answered with a 4xx before any work while the server keeps serving.

One server on the trained demo model (package data: nothing to build) serves every test here.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest

pytest.importorskip("starlette", reason="the [server] extra is not installed")
openai = pytest.importorskip("openai", reason="the [server-test] extra is not installed")

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.diffusion.options import GenerationOptions
from mlx_diffusiongemma.editing.complete import complete_plan
from mlx_diffusiongemma.prompts.render import render_messages
from mlx_diffusiongemma.server import ServerConfig, create_app

from conftest import invoke
from helpers_server import running

STEPS = 4  # max_denoising_steps: every request short on a CPU
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
CARD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"},
    "city": {"enum": ["Paris", "Rome", "Oslo"]}, "member": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def demo():
    return dg.load("demo")


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    with running(create_app(model, tok, ServerConfig(model_id="demo"))) as url:
        yield url


@pytest.fixture(scope="module")
def prefix(demo):
    """A chat prompt as raw text (what a completions client sends)."""
    _, tok = demo
    return tok.decode(render_messages(tok, [{"role": "user", "content": "Make a card for Ada, 36, from Paris."}], False))


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw(url, path, body, method="POST"):
    """(status, parsed JSON or the text) of one plain HTTP request."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    text = res.read().decode()
    conn.close()
    try:
        return res.status, json.loads(text)
    except json.JSONDecodeError:
        return res.status, text


def served(url, timeout: float = 30) -> int:
    """Requests the engine has finished, failed or cancelled, once it is idle (a 4xx before any
    work adds none)."""
    deadline = time.monotonic() + timeout
    while True:
        h = raw(url, "/health", None, method="GET")[1]
        if h["active"] == h["waiting"] == 0 or time.monotonic() > deadline:
            return h["completed"] + h["failed"] + h["cancelled"]
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- suffix and /infill


def test_suffix_same_middle_over_http_python_and_cli(demo, server, prefix, runner, tmp_path):
    model, tok = demo
    suffix = "\nAge: 36\nCity: Paris"
    py = dg.complete(model, tok, prefix, suffix, max_tokens=8, seed=5, max_denoising_steps=STEPS)
    c = client(server)
    r = c.completions.create(model="demo", prompt=prefix, suffix=suffix, max_tokens=8, seed=5,
                             extra_body={"max_denoising_steps": STEPS})
    assert r.choices[0].text == py.text
    assert r.choices[0].finish_reason == ("stop" if py.details["middle"]["ended"] else "length")
    assert r.usage.completion_tokens == len(py.details["middle"]["tokens"])
    streamed = c.completions.create(model="demo", prompt=prefix, suffix=suffix, max_tokens=8, seed=5, stream=True,
                                    extra_body={"max_denoising_steps": STEPS})
    assert "".join(ch.choices[0].text for ch in streamed) == py.text
    (tmp_path / "p").write_text(prefix)
    (tmp_path / "s").write_text(suffix)
    cli = invoke(runner, ["complete", "--model", "demo", "--prefix-file", str(tmp_path / "p"), "--suffix-file",
                          str(tmp_path / "s"), "--max-tokens", "8", "--seed", "5", "--steps", str(STEPS), "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["text"] == py.text


def test_the_suffix_is_pinned_after_the_middle(demo):
    """The canvas holds the middle's room, then the suffix's tokens pinned (up to the canvas end)."""
    model, tok = demo
    c = model.canvas_length
    suffix = " and then".join(str(i) for i in range(40))
    plan = complete_plan(model, tok, [2, 5], suffix, 10, GenerationOptions())
    state = plan.request.canvases[0]
    ids = tok.encode(suffix, add_special_tokens=False)[: c - 10]
    assert state.pinned.tolist() == [False] * 10 + [True] * len(ids) + [False] * (c - 10 - len(ids))
    assert state.ids.tolist()[10:10 + len(ids)] == ids
    assert plan.request.max_tokens == c and not plan.request.stop_at_eos
    # Room for the middle that fills its canvas: the suffix gets the next canvas.
    plan = complete_plan(model, tok, [2, 5], suffix, c, GenerationOptions())
    assert len(plan.request.canvases) == 2 and plan.request.canvases[1].pinned.tolist()[0]


def test_infill_in_llama_vim_shape(demo, server, prefix):
    model, tok = demo
    extra = [{"filename": "notes.txt", "text": "Ada is 36."}]
    body = {"input_prefix": prefix[:-6], "prompt": prefix[-6:], "input_suffix": "\nAge: 36", "input_extra": extra,
            "n_predict": 6, "seed": 9, "max_denoising_steps": STEPS, "stop": [], "n_indent": 0, "top_k": 40,
            "top_p": 0.99, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1000, "response_fields": ["content", "timings"]}
    status, out = raw(server, "/infill", body)
    assert status == 200, out
    py = dg.complete(model, tok, "notes.txt\nAda is 36.\n\n" + prefix, "\nAge: 36", max_tokens=6, seed=9,
                     max_denoising_steps=STEPS)
    assert out["content"] == py.text and out["stop"] is True
    assert out["tokens_predicted"] == len(py.details["middle"]["tokens"])
    assert out["timings"]["predicted_n"] == out["tokens_predicted"]
    status, text = raw(server, "/infill", {**body, "stream": True})
    assert status == 200
    events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == py.text
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]


# ---------------------------------------------------------------------------------- response_format


def test_json_schema_is_pinned_and_parses(demo, server):
    model, tok = demo
    messages = [{"role": "user", "content": "Make a card for Ada, 36, from Paris."}]
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "card", "schema": CARD, "strict": True}}
    r = c.chat.completions.create(model="demo", messages=messages, seed=3, response_format=fmt,
                                  extra_body={"max_denoising_steps": STEPS, **NO_THINKING})
    value = json.loads(r.choices[0].message.content)
    assert list(value) == list(CARD["properties"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 6 * 8
    assert type(value["age"]) is int and value["city"] in ("Paris", "Rome", "Oslo") and type(value["member"]) is bool
    py = dg.fill_json(model, tok, messages, CARD, seed=3, max_denoising_steps=STEPS)
    assert r.choices[0].message.content == py.text
    streamed = c.chat.completions.create(model="demo", messages=messages, seed=3, response_format=fmt, stream=True,
                                         extra_body={"max_denoising_steps": STEPS, **NO_THINKING})
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == py.text
    # Plain completions take it too (the prompt is raw text there).
    r = c.completions.create(model="demo", prompt="A card:", seed=3,
                             extra_body={"max_denoising_steps": STEPS, "response_format": fmt})
    assert list(json.loads(r.choices[0].text)) == list(CARD["properties"])


def test_json_object_reply_is_checked(server):
    """json_object has no schema to pin: the reply is checked, and one that is not an object is a
    clear error (the demo model never writes JSON unasked), never silent wrong output."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "Is 4 even?"}], "max_tokens": 8, "seed": 1,
            "max_denoising_steps": STEPS, "response_format": {"type": "json_object"}}
    status, out = raw(server, "/v1/chat/completions", body)
    if status == 200:
        assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    else:
        assert status == 500 and out["error"]["code"] == "invalid_json_output"
    status, text = raw(server, "/v1/chat/completions", {**body, "stream": True})
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last or last["choices"][0]["finish_reason"] is not None


# ---------------------------------------------------------------------------------- edits


def test_edit_rewrites_the_selection_with_the_rest_pinned(demo, server):
    model, tok = demo
    text, instruction = "Name: Ada\nAge: 36\nCity: Paris", "Make Ada 40 years old."
    body = {"input": text, "instruction": instruction, "selection": [10, 17], "strength": 0.5, "seed": 2,
            "max_denoising_steps": STEPS}
    status, out = raw(server, "/v1/edits", body)
    assert status == 200, out
    choice = out["choices"][0]
    start, end = choice["selection"]
    assert choice["text"] == text[:10] + choice["replacement"] + text[17:]  # the rest is pinned
    assert (start, end) == (10, 10 + len(choice["replacement"]))
    py = dg.edit(model, tok, text, instruction, spans=[(10, 17)], warm_spans=True, strength=0.5, seed=2,
                 include_text=False, max_denoising_steps=STEPS)
    assert choice["text"] == py.text
    assert out["usage"]["completion_tokens"] == len(py.details["span0"]["tokens"])
    # strength 0 (the selection starts from itself) with the text in the prompt too: the same
    # seed gives Python's text.
    again = raw(server, "/v1/edits", {**body, "strength": 0.0, "include_text": True})[1]["choices"][0]["text"]
    assert again == dg.edit(model, tok, text, instruction, spans=[(10, 17)], warm_spans=True, strength=0.0,
                            seed=2, max_denoising_steps=STEPS).text


# ---------------------------------------------------------------------------------- Ollama's API

CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def test_ollama_chat_generate_tags_show(demo, server):
    ollama = pytest.importorskip("ollama", reason="the [server-test] extra is not installed")
    model, tok = demo
    c = ollama.Client(host=server)
    assert [m.model for m in c.list().models] == ["demo"]
    shown = c.show("demo")
    assert "insert" in shown.capabilities and shown.modelinfo["diffusion_gemma.canvas_length"] == model.canvas_length
    messages = [{"role": "user", "content": "Sort these numbers: 42 7 19 88 3"}]
    options = {"seed": 4, "num_predict": 16, "max_denoising_steps": STEPS}
    reply = c.chat(model="demo", messages=messages, options=options, think=False)
    oai = client(server).chat.completions.create(model="demo", messages=messages, seed=4, max_tokens=16,
                                                 extra_body={"max_denoising_steps": STEPS, **NO_THINKING})
    assert reply.message.content == oai.choices[0].message.content and reply.done
    assert reply.eval_count == oai.usage.completion_tokens
    assert reply.done_reason == ("length" if oai.choices[0].finish_reason == "length" else "stop")
    parts = list(c.chat(model="demo", messages=messages, options=options, think=False, stream=True))
    assert "".join(p.message.content for p in parts) == reply.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    # generate: the prompt as one user message; with a suffix, the canvas completion.
    assert c.generate(model="demo", prompt=messages[0]["content"], options=options, think=False).response == \
        reply.message.content
    middle = c.generate(model="demo", prompt="Name: Ada", suffix="\nCity: Paris", options=options).response
    assert middle == dg.complete(model, tok, "Name: Ada", "\nCity: Paris", max_tokens=16, seed=4,
                                 max_denoising_steps=STEPS).text
    card = c.chat(model="demo", messages=[{"role": "user", "content": "Make a card for Ada, 36, from Paris."}],
                  format=CARD, options={"seed": 4, "max_denoising_steps": STEPS}, think=False).message.content
    assert list(json.loads(card)) == list(CARD["properties"])


@pytest.fixture(scope="module")
def pad(demo):
    """Answer padding that puts the tool call's string delimiter across a canvas boundary."""
    model, tok = demo
    head = "<|channel>thought\nHm.<channel|>Ok."
    call_at = len(tok.encode(CALL[: CALL.index('<|"|>') + 2], add_special_tokens=False))
    return -(len(tok.encode(head, add_special_tokens=False)) + call_at) % model.canvas_length or model.canvas_length


@pytest.fixture(scope="module")
def scripted(demo, pad):
    """A server over a model that writes a thought, an answer and a tool call cut between canvases."""
    from mlx_diffusiongemma.demo.files import SPECIAL_TOKENS, TURN_END

    from helpers_server import ScriptedModel

    model, tok = demo
    script = "<|channel>thought\nHm.<channel|>Ok." + "x" * pad + CALL
    app = create_app(ScriptedModel(model, tok, script, SPECIAL_TOKENS.index(TURN_END)), tok,
                     ServerConfig(model_id="demo", prompt_cache_size=0))
    with running(app) as url:
        yield url


def test_ollama_thinking_and_tool_calls(scripted, pad):
    ollama = pytest.importorskip("ollama", reason="the [server-test] extra is not installed")
    c = ollama.Client(host=scripted)
    ask = {"model": "demo", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
           "think": True, "options": {"num_predict": 128}}
    msg = c.chat(**ask).message
    assert msg.thinking == "Hm." and msg.content == "Ok." + "x" * pad
    [call] = msg.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Paris", "days": 3}
    parts = list(c.chat(**ask, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "Hm."
    assert "".join(p.message.content for p in parts) == "Ok." + "x" * pad
    calls = [tc for p in parts for tc in (p.message.tool_calls or [])]
    assert len(calls) == 1 and dict(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    # The call sent back as history, with its result: the next turn renders and runs.
    history = ask["messages"] + [{"role": "assistant", "content": "Ok.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    assert c.chat(**{**ask, "messages": history}).done


# ---------------------------------------------------------------------------------- Anthropic's API

ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather forecast", "input_schema":
                    TOOLS[0]["function"]["parameters"]}]


def test_anthropic_messages_equal_the_openai_reply(server):
    anthropic = pytest.importorskip("anthropic", reason="the [server-test] extra is not installed")
    c = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    ask = {"model": "demo", "max_tokens": 16, "system": "Be brief.", "thinking": {"type": "disabled"},
           "messages": [{"role": "user", "content": [{"type": "text", "text": "Sort these numbers: 42 7 19 88 3"}]}],
           "extra_body": {"seed": 6, "max_denoising_steps": STEPS}}
    r = c.messages.create(**ask)
    oai = client(server).chat.completions.create(
        model="demo", max_tokens=16, seed=6, messages=[{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Sort these numbers: 42 7 19 88 3"}],
        extra_body={"max_denoising_steps": STEPS, **NO_THINKING})
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == oai.choices[0].message.content
    assert r.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[oai.choices[0].finish_reason]
    assert r.usage.output_tokens == oai.usage.completion_tokens
    with c.messages.stream(**ask) as stream:
        assert "".join(stream.text_stream) == r.content[0].text
        assert stream.get_final_message().stop_reason == r.stop_reason


def test_anthropic_thinking_and_tool_use_blocks(scripted, pad):
    anthropic = pytest.importorskip("anthropic", reason="the [server-test] extra is not installed")
    c = anthropic.Anthropic(base_url=scripted, api_key="unused", max_retries=0)
    ask = {"model": "demo", "max_tokens": 192, "tools": ANTHROPIC_TOOLS,
           "thinking": {"type": "enabled", "budget_tokens": 1024},
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    r = c.messages.create(**ask)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"] and r.stop_reason == "tool_use"
    assert r.content[0].thinking == "Hm." and r.content[1].text == "Ok." + "x" * pad
    assert r.content[2].name == "get_weather" and r.content[2].input == {"city": "Paris", "days": 3}
    with c.messages.stream(**ask) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "Hm." and final.content[2].input == {"city": "Paris", "days": 3}
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert events.count("content_block_start") == events.count("content_block_stop") == 3
    # The tool_use and its tool_result sent back: the next turn renders and runs.
    history = ask["messages"] + [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hm.", "signature": ""},
                                          {"type": "text", "text": "Ok."}, r.content[2].model_dump(
                                              include={"type", "id", "name", "input"})]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r.content[2].id, "content": "sunny"}]}]
    assert c.messages.create(**{**ask, "messages": history}).content


# ---------------------------------------------------------------------------------- images


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)


def _png(size=(30, 44), color=100, mode="RGB") -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def _data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """A server over a tiny random model with a vision tower (test_vision_api.py's), reading
    files from a folder."""
    pytest.importorskip("PIL", reason="the [vision] extra is not installed")
    from conftest import build_reference, save_checkpoint, tiny_text_config
    from mlx_diffusiongemma.demo.files import tokenizer_vocab_size

    config = tiny_text_config(use_bidirectional_attention="vision", vocab_size=tokenizer_vocab_size(True))
    built = build_reference(config, canvas_length=8, seed=5, vision=VISION)
    path = save_checkpoint(built, tmp_path_factory.mktemp("vision") / "ckpt", image_tokens=True)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": 70}}))
    model, tok = dg.load(path)
    folder = tmp_path_factory.mktemp("images")
    (folder / "a.png").write_bytes(_png(color=30))
    (folder.parent / "outside.png").write_bytes(_png())
    with running(create_app(model, tok, ServerConfig(model_id="demo", image_dir=str(folder)))) as url:
        yield model, tok, url, folder


def test_image_url_parts_equal_python(vision):
    model, tok, url, _ = vision
    c = client(url)
    for color in (100, 200):  # two images, same text: no reuse of the other's prompt cache
        data = _png(color=color)
        parts = [{"type": "image_url", "image_url": {"url": _data_url(data)}}, {"type": "text", "text": "What is it?"}]
        r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": parts}], max_tokens=8,
                                      seed=0, extra_body={"max_denoising_steps": STEPS, **NO_THINKING})
        py = dg.generate(model, tok, [{"role": "user", "content": [{"type": "image", "image": data},
                                                                   {"type": "text", "text": "What is it?"}]}],
                         max_tokens=8, seed=0, max_denoising_steps=STEPS)
        assert r.choices[0].message.content == py.text and r.usage.prompt_tokens == py.prompt_tokens
    # A file inside --image-dir is read; the text-only reply differs in its prompt.
    r = c.chat.completions.create(model="demo", max_tokens=8, seed=0, extra_body={"max_denoising_steps": STEPS},
                                  messages=[{"role": "user", "content": [
                                      {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "?"}]}])
    assert r.usage.prompt_tokens > 20  # the template around <boi> + the image's soft tokens + <eoi>


def test_images_through_ollama_and_anthropic(vision):
    import base64

    ollama = pytest.importorskip("ollama", reason="the [server-test] extra is not installed")
    anthropic = pytest.importorskip("anthropic", reason="the [server-test] extra is not installed")
    model, tok, url, _ = vision
    data = _png(color=60)
    parts = [{"type": "image_url", "image_url": {"url": _data_url(data)}}, {"type": "text", "text": "What is it?"}]
    want = client(url).chat.completions.create(model="demo", messages=[{"role": "user", "content": parts}],
                                               max_tokens=8, seed=0,
                                               extra_body={"max_denoising_steps": STEPS, **NO_THINKING})
    got = ollama.Client(host=url).chat(model="demo", think=False, options={
        "seed": 0, "num_predict": 8, "max_denoising_steps": STEPS},
        messages=[{"role": "user", "content": "What is it?", "images": [data]}])
    assert got.message.content == want.choices[0].message.content
    assert got.prompt_eval_count == want.usage.prompt_tokens
    msg = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0).messages.create(
        model="demo", max_tokens=8, thinking={"type": "disabled"}, extra_body={"seed": 0, "max_denoising_steps": STEPS},
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(data).decode()}},
            {"type": "text", "text": "What is it?"}]}])
    assert "".join(b.text for b in msg.content if b.type == "text") == want.choices[0].message.content


@pytest.mark.parametrize("case", ["bomb", "not an image", "bad base64", "remote", "outside", "traversal", "too many"])
def test_hostile_images_are_400(vision, case):
    model, tok, url, folder = vision
    before = served(url)
    good = {"type": "image_url", "image_url": {"url": _data_url(_png())}}
    urls = {"bomb": _data_url(_png((9000, 8000), 0, "1")),  # 72 Mpx in a few kB
            "not an image": _data_url(b"hello"), "bad base64": "data:image/png;base64,%%%",
            "remote": "https://example.com/a.png", "outside": str(folder.parent / "outside.png"),
            "traversal": "../outside.png"}
    parts = [good] * 17 if case == "too many" else [{"type": "image_url", "image_url": {"url": urls[case]}}]
    code, out = raw(url, "/v1/chat/completions", {"model": "demo", "max_tokens": 8, "messages": [
        {"role": "user", "content": parts + [{"type": "text", "text": "?"}]}]})
    assert code == 400, out
    assert out["error"]["param"] == "messages" and out["error"]["message"]
    assert served(url) == before


def test_local_image_files_need_the_flag_and_text_models_refuse_images(demo, server):
    from mlx_diffusiongemma.server.image_parts import take_images

    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}
    code, out = raw(server, "/v1/chat/completions", {"model": "demo", "max_tokens": 8, **body})
    assert code == 400 and "no vision tower" in out["error"]["message"]
    vision_model = type("Vision", (), {"has_vision": True, "args": None})()
    with pytest.raises(Exception, match="--image-dir"):
        take_images(json.loads(json.dumps(body)), vision_model, None, None)


# ---------------------------------------------------------------------------------- hostile inputs


HOSTILE = [
    ("/v1/completions", {"prompt": "x", "suffix": "9 " * 5000}, 400, "suffix"),  # longer than the context
    ("/v1/completions", {"prompt": "x", "suffix": 5}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "suffix": "y", "response_format": {"type": "json_object"}}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "suffix": "y", "stream": True, "stream_options": {"in_canvas": True}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {"response_format": "json"}, 400, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "node", "schema": {
        "type": "object", "properties": {"next": {"$ref": "#"}}}}}}, 400, "response_format"),  # recursive
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {}}}}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 10 ** 12}}}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(300)}}}}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 200} for i in range(30)}}}}}, 400,
     "response_format"),  # more than the context
    ("/infill", {"input_prefix": 7}, 400, "input_prefix"),
    ("/infill", {"input_prefix": "a", "input_extra": "b"}, 400, "input_extra"),
    ("/infill", {"input_prefix": "a", "input_extra": [{"filename": "f", "text": "t"}] * 300}, 400, "input_extra"),
    ("/infill", {"input_prefix": "a", "input_extra": [{"filename": "f", "text": "9 " * 5000}]}, 400, "prompt"),
    ("/infill", {"input_suffix": "a"}, 400, "input_prefix"),
    ("/infill", {"input_prefix": "a", "n_predict": "many"}, 400, "max_tokens"),
    ("/v1/edits", {"instruction": "x"}, 400, "input"),
    ("/v1/edits", {"input": "abc", "instruction": 3}, 400, "instruction"),
    ("/v1/edits", {"input": "abc", "instruction": "x", "selection": [2, 9]}, 400, "selection"),
    ("/v1/edits", {"input": "abc", "instruction": "x", "selection": "all"}, 400, "selection"),
    ("/v1/edits", {"input": "abc", "instruction": "x", "strength": 2}, 400, "strength"),
    ("/v1/edits", {"input": "abc", "instruction": "x", "stream": True}, 400, "stream"),
    ("/v1/edits", {"input": "abc", "instruction": "x", "include_text": "yes"}, 400, "include_text"),
    ("/v1/edits", {"input": "9 " * 5000, "instruction": "x", "selection": [0, 2]}, 400, "input"),
    ("/api/chat", {"model": "demo", "messages": "x"}, 400, None),
    ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, None),
    ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "x"}], "format": "json"}, 400, None),
    ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "x"}], "format": {"type": "array"}},
     400, None),
    ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "x"}], "options": "fast"}, 400, None),
    ("/api/chat", {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, None),
    ("/api/generate", {"model": "demo", "prompt": 5}, 400, None),
    ("/api/generate", {"model": "demo", "prompt": "x", "options": {"num_predict": 10 ** 9}}, 400, None),
    ("/api/generate", {"model": "demo", "prompt": "x", "suffix": "9 " * 5000}, 400, None),
    ("/api/show", {"model": "other"}, 404, None),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x"}]}, 400, None),  # no max_tokens
    ("/v1/messages", {"max_tokens": 8, "messages": []}, 400, None),
    ("/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "aGk="}}]}]}, 400, None),
    ("/v1/messages", {"max_tokens": 8, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("/v1/messages", {"max_tokens": 8, "thinking": "on", "messages": [{"role": "user", "content": "x"}]}, 400, None),
    ("/v1/messages", {"max_tokens": 8, "tools": [{"input_schema": {}}], "messages": [{"role": "user", "content": "x"}]},
     400, None),
    ("/v1/messages", {"max_tokens": 10 ** 9, "messages": [{"role": "user", "content": "x"}]}, 400, None),
]


@pytest.mark.parametrize("path,body,status,param", HOSTILE, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(HOSTILE)])
def test_hostile_inputs_are_4xx_before_any_work(server, path, body, status, param):
    before = served(server)
    if path.startswith("/v1/c"):
        body = {"model": "demo", "max_tokens": 8, **body}
        if "chat" in path:
            body.setdefault("messages", [{"role": "user", "content": "hi"}])
    code, out = raw(server, path, body)
    assert code == status, out
    if path.startswith("/api/"):  # Ollama's error shape
        assert isinstance(out["error"], str) and out["error"]
    elif path == "/v1/messages":  # Anthropic's
        assert out["type"] == "error" and out["error"]["type"] == "invalid_request_error" and out["error"]["message"]
    else:
        assert out["error"]["param"] == param and out["error"]["message"]
    assert served(server) == before  # rejected before the engine saw it


def test_still_serving_after_the_hostile_inputs(server):
    assert raw(server, "/api/generate", {"model": "demo", "prompt": "Is 4 even?", "stream": False,
                                         "options": {"num_predict": 4, "max_denoising_steps": STEPS}})[1]["done"]
    r = client(server).completions.create(model="demo", prompt="Is 4 even?", suffix="?", max_tokens=4, seed=1,
                                          extra_body={"max_denoising_steps": STEPS})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert raw(server, "/health", None, method="GET")[1]["status"] == "ok"
