"""Run every bad input of docs/reliability.md and print the markdown table of what the user sees.

    python scripts/reliability_table.py > /tmp/table.md

Each case is crafted in a temporary folder (from the demo model), run through the CLI (typer's
CliRunner, as a user would) or the Python API, and reported with its exit code and its message.
Nothing touches the network. Takes a minute or two (the chat template case waits for its limit).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["COLUMNS"] = "300"  # typer boxes its usage errors to the width: one line each


def main() -> None:
    import mlx.core as mx
    from typer.testing import CliRunner

    from mlx_diffusiongemma.cli import app as cli
    from mlx_diffusiongemma.demo.random import DEMO_VERSION, ensure_demo

    work = Path(tempfile.mkdtemp(prefix="dgemma-reliability-"))
    home = work / "home"
    os.environ["MLX_DIFFUSIONGEMMA_HOME"] = str(home)
    os.environ["HF_HOME"] = str(work / "hf")
    demo = ensure_demo(home / f"demo-v{DEMO_VERSION}")
    runner = CliRunner()
    rows: list[tuple[str, str, str]] = []
    counter = [0]

    def copy() -> Path:
        counter[0] += 1
        return Path(shutil.copytree(demo, work / f"m{counter[0]}"))

    def run(what: str, args: list[str], input=None) -> None:
        result = runner.invoke(cli.app, args, input=input, prog_name="dgemma")
        lines = [l for l in result.stderr.splitlines() if l.startswith(("error", "interrupted", "usage"))]
        if not lines:  # typer usage errors: the line of the boxed message that says what is wrong
            lines = [l.strip("│ ") for l in result.stderr.splitlines() if "Invalid value" in l]
        rows.append((what, f"exit {result.exit_code}", lines[-1] if lines else result.stderr.strip()))

    def gen(folder: Path) -> list[str]:
        return ["generate", "--model", str(folder), "-p", "hi", "--max-tokens", "8", "--steps", "2"]

    def edit_config(folder: Path, **text) -> Path:
        config = json.loads((folder / "config.json").read_text())
        for k, v in text.items():
            if k == "canvas_length":
                config[k] = v
            else:
                config["text_config"][k] = v
            if k == "num_hidden_layers":
                config["text_config"].pop("layer_types", None)
                config["text_config"].pop("per_layer_config", None)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    # -- checkpoints ------------------------------------------------------------------------------
    f = copy()
    for p in f.glob("tokenizer*.json"):
        p.unlink()
    run("checkpoint without tokenizer.json / tokenizer.model", gen(f))
    for field, value in [("num_hidden_layers", 1_000_000), ("num_hidden_layers", 0), ("hidden_size", -64),
                         ("vocab_size", 10**12), ("vocab_size", "many"), ("canvas_length", -1),
                         ("head_dim", 15), ("num_hidden_layers", 400), ("vocab_size", 5000),
                         ("final_logit_softcapping", None), ("use_bidirectional_attention", "all"),
                         ("attention_bias", "yes")]:
        run(f"config.json `{field}: {json.dumps(value)}`", gen(edit_config(copy(), **{field: value})))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        f = copy()
        (f / name).unlink()
        os.mkfifo(f / name)
        run(f"a FIFO in place of `{name}`", gen(f))
    f = copy()
    cfg = json.loads((f / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    (f / "tokenizer_config.json").write_text(json.dumps(cfg))
    run("chat template with nested huge loops", gen(f))
    for label, target in [("an absolute path", "/etc/x.safetensors"), ("`../x.safetensors`", "../x.safetensors")]:
        f = copy()
        (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": target}}))
        run(f"index `weight_map` naming {label}", gen(f))
    f = copy()
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    run("index `weight_map` that is a list", gen(f))
    for label, header in [("a JSON list", [1, 2]), ("an entry without `data_offsets`",
                                                      {"a": {"dtype": "F32", "shape": [4]}})]:
        f = copy()
        raw = json.dumps(header).encode()
        (f / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
        run(f"safetensors header that is {label}", gen(f))
    f = copy()
    tensors = mx.load(str(f / "model.safetensors"))
    w = tensors["model.decoder.norm.weight"]
    tensors["model.decoder.norm.weight"] = mx.full(w.shape, float("nan"), dtype=w.dtype)
    mx.save_safetensors(str(f / "model.safetensors"), tensors)
    run("NaN weights", gen(f))
    f = copy()
    (f / "generation_config.json").write_text(json.dumps({"t_max": 1e999}).replace("Infinity", "1e999"))
    run("generation_config.json `t_max: Infinity`", gen(f))

    # -- values -------------------------------------------------------------------------------------
    base = ["generate", "--model", "demo", "-p", "hi", "--max-tokens", "8", "--steps", "2"]
    for args in (["--seed", "-1"], ["--seed", str(2**64)], ["--t-max", "inf"], ["--t-min", "5", "--t-max", "0.1"],
                 ["--t-min", "0.9"], ["--steps", "5000"], ["--confidence-threshold", "nan"]):
        run(f"`{' '.join(args)}`", base + args)
    run("invalid UTF-8 on stdin (`-p -`)", base[:4] + ["-"] + base[5:], input=b"caf\xe9\n")
    run("mistyped relative path `models/mine` (offline)",
        ["generate", "--model", "models/mine", "-p", "hi", "--offline"])
    chat = ["chat", "--model", "demo", "--max-tokens", "8", "--steps", "2"]
    for value in ("5000", "²", "abc"):
        result = runner.invoke(cli.app, chat + [], input=f"/steps {value}\nhi\n", prog_name="dgemma")
        msg = next(l for l in result.stderr.splitlines() if l.startswith("usage"))
        rows.append((f"chat `/steps {value}`, then a message",
                     f"session goes on, exit {result.exit_code}", msg))
    result = runner.invoke(cli.app, chat, input=b"caf\xe9\nhi\n", prog_name="dgemma")
    rows.append(("chat: a line of invalid UTF-8, then a message", f"session goes on, exit {result.exit_code}",
                 next(l for l in result.stderr.splitlines() if l.startswith("error"))))

    # -- convert ------------------------------------------------------------------------------------
    run("`convert` of a missing folder", ["convert", str(work / "nope"), "-o", str(work / "out")])
    docs = work / "documents"
    docs.mkdir()
    (docs / "thesis.tex").write_text("x")
    run("`convert --force` onto a folder that is not a model", ["convert", str(demo), "-o", str(docs), "--force"])

    print("| bad input | outcome | message |")
    print("|---|---|---|")
    for what, outcome, message in rows:
        message = message.replace(str(work), "…").replace("|", "\\|")
        print(f"| {what} | {outcome} | {message} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
