"""Measure the canvas over HTTP on the trained demo model: the table of docs/server.md.

    python scripts/eval_server_canvas.py --model demo --n 30 [--write-docs]

- Completion with a suffix, on two task families where the suffix says where the middle ends:
  the prefix is the chat prompt, the middle the reply's start (the first half of a sorted list,
  a card's `Name: ...` line) and the suffix the reply's rest. A case is right when the middle is
  the reference's; the same middles with the suffix left out (`complete(prefix, "")`) show what
  it brings. (The demo model saw replies start on a canvas only: a prefix that ends inside the
  reply is a situation it was never trained on, so the tasks keep the reply on the canvas.)
- `response_format` json_schema on the card prompts (name string, age integer, city enum):
  parse rate, schema match rate, accuracy per field.
- `/v1/edits` on card answers whose prompt now names another age: the selection is the age's
  value (warm-started from itself, `--strength` of it renoised), the rest pinned; right when the
  new age is written.
- Every HTTP reply (the official `openai` client against `dgemma serve`'s app, in-process
  behind uvicorn) is compared with the Python call for the same seed, and a few with
  `dgemma complete` (a subprocess): they must be equal.

Prompts are the demo model's held-out split, rendered with thinking off.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_block import write_block  # noqa: E402  (scripts/, the running script's folder)
from mlx_diffusiongemma import complete, edit, fill_json, load  # noqa: E402
from mlx_diffusiongemma.demo import tasks  # noqa: E402
from mlx_diffusiongemma.prompts.render import render_messages  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}, "city": {"enum": list(tasks.CITIES)}}}


def serve(app):
    """Run `app` on a free loopback port in a thread; returns (url, server)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def chat_text(tok, prompt: str) -> str:
    """The prompt as the chat template writes it (thinking off), as raw text for /v1/completions."""
    return tok.decode(render_messages(tok, [{"role": "user", "content": prompt}], False))


def middle_cases(n: int) -> list[tuple[str, str, str, str]]:
    """(family, prompt, reference middle, suffix) on held-out prompts: the reply's start is the
    middle, its rest the suffix (the demo model was trained on replies that start on a canvas)."""
    out = []
    for prompt, answer in tasks.held_out_set("sort", n):
        nums = answer.split()
        k = (len(nums) + 1) // 2
        out.append(("sort", prompt, " ".join(nums[:k]), " " + " ".join(nums[k:])))
    for prompt, answer in tasks.held_out_set("card", n):
        first, rest = answer.split("\n", 1)
        out.append(("card", prompt, first, "\n" + rest))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", type=int, default=30, help="held-out prompts per family")
    ap.add_argument("--slack", type=int, default=2, help="room for the middle: its reference tokens + this")
    ap.add_argument("--cli", type=int, default=3, help="cases also run through `dgemma complete`")
    ap.add_argument("--strength", type=float, default=1.0, help="edits: fraction of the selection renoised")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    import openai

    from mlx_diffusiongemma.server import ServerConfig, create_app

    t_start = time.perf_counter()
    model, tok = load(args.model)
    url, server = serve(create_app(model, tok, ServerConfig(model_id="demo")))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    mismatches = []

    stats: dict[str, dict[str, int]] = {}
    cli_left = args.cli
    for i, (family, prompt, middle, suffix) in enumerate(middle_cases(args.n)):
        prefix = chat_text(tok, prompt)
        room = len(tok.encode(middle, add_special_tokens=False)) + args.slack
        s = stats.setdefault(family, {"n": 0, "with": 0, "without": 0})
        s["n"] += 1
        got = complete(model, tok, prefix, suffix, max_tokens=room, seed=i).text
        alone = complete(model, tok, prefix, "", max_tokens=room, seed=i).text
        s["with"] += got == middle
        s["without"] += alone == middle
        http = client.completions.create(model="demo", prompt=prefix, suffix=suffix, max_tokens=room,
                                         seed=i).choices[0].text
        if http != got:
            mismatches.append(("http", prompt, got, http))
        if cli_left > 0:
            cli_left -= 1
            with tempfile.TemporaryDirectory() as d:
                Path(d, "p").write_text(prefix)
                Path(d, "s").write_text(suffix)
                run = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma.cli.app", "complete", "--model",
                                      args.model, "--prefix-file", f"{d}/p", "--suffix-file", f"{d}/s",
                                      "--max-tokens", str(room), "--seed", str(i), "--json"],
                                     capture_output=True, text=True, check=True)
            if json.loads(run.stdout)["text"] != got:
                mismatches.append(("cli", prompt, got, run.stdout))

    js = {"n": 0, "parses": 0, "matches": 0, "name": 0, "age": 0, "city": 0}
    for i, (prompt, answer) in enumerate(tasks.held_out_set("card", args.n)):
        name, age, city = (line.split(": ", 1)[1] for line in answer.split("\n"))
        messages = [{"role": "user", "content": prompt}]
        py = fill_json(model, tok, messages, SCHEMA, seed=i).text
        reply = client.chat.completions.create(
            model="demo", messages=messages, seed=i, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
            response_format={"type": "json_schema", "json_schema": {"name": "card", "schema": SCHEMA}},
        ).choices[0].message.content
        if reply != py:
            mismatches.append(("json", prompt, py, reply))
        js["n"] += 1
        try:
            value = json.loads(reply)
        except json.JSONDecodeError:
            continue
        js["parses"] += 1
        js["matches"] += (set(value) == set(SCHEMA["properties"]) and isinstance(value["name"], str)
                          and type(value["age"]) is int and value["city"] in tasks.CITIES)
        js["name"] += value.get("name") == name
        js["age"] += value.get("age") == int(age)
        js["city"] += value.get("city") == city
    # Edits: a card whose age changed; the selection is the age's value, the rest pinned.
    ed = {"n": 0, "right": 0, "kept": 0}
    for i, (prompt, answer) in enumerate(tasks.held_out_set("card", args.n)):
        name, age, city = (line.split(": ", 1)[1] for line in answer.split("\n"))
        new_age = str((int(age) + 7) % 80 + 18)
        instruction = prompt.replace(age, new_age)
        start = answer.index("Age: ") + 4  # the space before the value is the tokenizer's word start
        end = start + 1 + len(age)
        py = edit(model, tok, answer, instruction, spans=[(start, end)], warm_spans=True, strength=args.strength,
                  include_text=False, seed=i).text
        body = {"model": "demo", "input": answer, "instruction": instruction, "selection": [start, end],
                "strength": args.strength, "seed": i}
        http = client.post("/edits", body=body, cast_to=object)["choices"][0]["text"]
        if http != py:
            mismatches.append(("edit", prompt, py, http))
        ed["n"] += 1
        ed["right"] += http == answer.replace(f"Age: {age}", f"Age: {new_age}")
        ed["kept"] += http.startswith(answer[:start]) and http.endswith(answer[end:])
    server.should_exit = True
    elapsed = time.perf_counter() - t_start

    def pct(a, b):
        return f"{100 * a / b:.0f}%" if b else "-"

    lines = [
        f"Measured by `python scripts/eval_server_canvas.py --model {args.model} --n {args.n} --write-docs` "
        f"({elapsed:.0f} s on a 2-core CPU), held-out prompts, the checkpoint's default sampler, seed = case index; "
        f"room for the middle: its reference length + {args.slack} tokens.",
        "",
        "| task | cases | with the suffix (canvas) | same middle without the suffix |",
        "|---|---|---|---|",
    ]
    for family, s in stats.items():
        what = "first half of a sorted list" if family == "sort" else "first line of a card (`Name: ...`)"
        lines.append(f"| {what} | {s['n']} | {pct(s['with'], s['n'])} | {pct(s['without'], s['n'])} |")
    lines += [
        "",
        "| `response_format` json_schema (card: name, age, city enum) | cases | parses | matches the schema | name | age | city |",
        "|---|---|---|---|---|---|---|",
        f"| chat completions | {js['n']} | {pct(js['parses'], js['n'])} | {pct(js['matches'], js['n'])} | "
        f"{pct(js['name'], js['n'])} | {pct(js['age'], js['n'])} | {pct(js['city'], js['n'])} |",
        "",
        "| `/v1/edits` (a card's age changed in the instruction; the selection is the age) | cases | new age written "
        "| text outside the selection unchanged |",
        "|---|---|---|---|",
        f"| warm start, strength {args.strength} | {ed['n']} | {pct(ed['right'], ed['n'])} | {pct(ed['kept'], ed['n'])} |",
        "",
        f"HTTP against Python for the same seed: {len(mismatches)} differences in "
        f"{sum(s['n'] for s in stats.values()) + js['n'] + ed['n']} requests; `dgemma complete` against Python: "
        f"{sum(m[0] == 'cli' for m in mismatches)} differences in {args.cli}.",
    ]
    table = "\n".join(lines)
    print(table)
    for m in mismatches:
        print("MISMATCH", m, file=sys.stderr)
    if args.write_docs:
        write_block(ROOT / "docs" / "server.md", "<!-- canvas-http:begin -->", "<!-- canvas-http:end -->", table)
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
