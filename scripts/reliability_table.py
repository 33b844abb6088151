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
                 ["--t-min", "0.9"], ["--steps", "5000"], ["--confidence-threshold", "nan"], ["--kv-bits", "3"],
                 ["--kv-bits", "8", "--kv-group-size", "128"]):
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

    # -- canvas commands and their files -------------------------------------------------------------
    text = work / "text.txt"
    text.write_text("some text\n")
    run("`edit --max-tokens 1000000000`", ["edit", "--model", "demo", "--text", str(text), "-i", "shorter",
                                           "--max-tokens", "1000000000"])
    latin1 = work / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 {{x:4}}\n")
    run("`fill --template-file` of invalid UTF-8", ["fill", "--model", "demo", "-p", "hi", "--template-file", str(latin1)])
    fifo = work / "fifo"
    os.mkfifo(fifo)
    run("`edit --text` naming a FIFO", ["edit", "--model", "demo", "--text", str(fifo), "-i", "fix"])
    deep = work / "schema.json"
    deep.write_text("[" * 100_000)
    run("`fill --schema` nested 100000 deep", ["fill", "--model", "demo", "-p", "hi", "--schema", str(deep)])
    for value in ("inf", "1e9"):
        run(f"`sudoku --delay {value}`", ["sudoku", "--delay", value])

    # -- fine-tuning and adapters ---------------------------------------------------------------------
    from mlx_diffusiongemma.checkpoint.adapters import ADAPTER_WEIGHTS, lora_parameters
    from mlx_diffusiongemma.train import lora

    data = work / "data"
    data.mkdir()
    rows_jsonl = "".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in ("a", "b", "c", "d"))
    (data / "train.jsonl").write_text(rows_jsonl)
    (data / "valid.jsonl").write_text(rows_jsonl)
    tune = ["finetune", "--model", str(demo), "--data", str(data), "--iters", "4", "--batch-size", "2",
            "--val-batches", "0"]
    run("`finetune --lora-scale nan`", tune + ["--lora-scale", "nan", "--adapter-path", str(work / "a1")])
    run("`finetune --learning-rate 1e300` (the loss becomes NaN)",
        tune + ["--learning-rate", "1e300", "--adapter-path", str(work / "a2")])
    (data / "train.jsonl").write_text(rows_jsonl + '{"prompt": ' + "[" * 100_000 + "\n")
    run("finetune data: a line nested 100000 deep", tune + ["--adapter-path", str(work / "a3")])

    import mlx_diffusiongemma as dg

    model, _ = dg.load(demo)
    lora.setup_finetune(model, "lora", 2, lora_parameters(rank=4))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora_parameters(rank=4)}
    good = work / "adapters"
    lora.save_adapters(model, good / ADAPTER_WEIGHTS, config)
    weights = mx.load(str(good / ADAPTER_WEIGHTS))
    for label, damage in [("that holds no tensors", lambda w: None),
                          ("missing half its LoRA tensors", lambda w: dict(list(w.items())[: len(w) // 2])),
                          ("of int32 tensors", lambda w: {k: v.astype(mx.int32) for k, v in w.items()})]:
        f = Path(shutil.copytree(good, work / f"adapters{len(rows)}"))
        damaged = damage(weights)
        if damaged:
            mx.save_safetensors(str(f / ADAPTER_WEIGHTS), damaged)
        else:
            (f / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", 8) + b"{}      ")
        run(f"`--adapter-path` with an adapters.safetensors {label}", gen(demo) + ["--adapter-path", str(f)])
    f = Path(shutil.copytree(good, work / "adapters-nan"))
    (f / "adapter_config.json").write_text(json.dumps({**config, "lora_parameters": {**config["lora_parameters"],
                                                                                      "scale": float("nan")}}))
    run("adapter_config.json with a NaN LoRA scale", gen(demo) + ["--adapter-path", str(f)])

    # -- convert ------------------------------------------------------------------------------------
    run("`convert` of a missing folder", ["convert", str(work / "nope"), "-o", str(work / "out")])
    docs = work / "documents"
    docs.mkdir()
    (docs / "thesis.tex").write_text("x")
    run("`convert --force` onto a folder that is not a model", ["convert", str(demo), "-o", str(docs), "--force"])
    os.symlink(work / "loop-b", work / "loop-a")
    os.symlink(work / "loop-a", work / "loop-b")
    run("`convert -o` into a symlink loop", ["convert", str(demo), "-o", str(work / "loop-a" / "out")])

    print("| bad input | outcome | message |")
    print("|---|---|---|")
    for what, outcome, message in rows:
        message = message.replace(str(work), "…").replace("|", "\\|")
        print(f"| {what} | {outcome} | {message} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
