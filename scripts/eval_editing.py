"""Measure canvas editing on the trained demo model: the table of docs/editing.md.

    python scripts/eval_editing.py --model demo --n 50 [--write-docs]

- Sudoku (4x4, held-out puzzles): solve rate with the givens pinned (blanks restricted to 1-4,
  and free) against the plain prompt, with decoder passes per puzzle.
- Card template (`Name: ...\\nAge: ...\\nCity: ...`): accuracy per field with holes of the right
  length (`{{name:K}}`), with maximum-length holes (`{{name:..8}}`), and of plain generation.
- JSON (`{"name": string, "age": integer, "city": enum}`) on the card prompts: parse rate, schema
  match rate, accuracy per field.
- Structured read on yes/no questions: agreement of `score` with the answer full generation
  commits, the accuracy of both, and decoder passes of each.

Uses only the public API, so it measures what users run. Prompts come from the demo model's
held-out split (`mlx_diffusiongemma.demo_tasks`) when that module is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_block import write_block  # noqa: E402  (scripts/, the running script's folder)
from mlx_diffusiongemma import fill_json, generate, infill, load, score  # noqa: E402
from mlx_diffusiongemma.demo import tasks as demo_tasks  # noqa: E402
from mlx_diffusiongemma.editing import sudoku  # noqa: E402

CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Quito", "Dublin",
          "Seoul", "Delhi", "Lagos", "Vienna", "Prague", "Austin")


def held_out(family: str, n: int) -> list[tuple[str, str]]:
    return demo_tasks.held_out_set(family, n)


def card_fields(answer: str) -> dict[str, str]:
    out = {}
    for line in answer.strip().split("\n"):
        key, _, value = line.partition(": ")
        out[key.strip().lower()] = value.strip()
    return out


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def eval_sudoku(model, tok, n: int, seed: int) -> list[dict]:
    rows = []
    puzzles = []
    for prompt, answer in held_out("sudoku", n):
        puzzles.append(sudoku.parse_puzzle(prompt.split("\n", 1)[1]))
    for mode in ("plain", "pinned, blanks free", "pinned, blanks 1-4"):
        solved = passes = 0
        t0 = time.perf_counter()
        for i, cells in enumerate(puzzles):
            if mode == "plain":
                r = generate(model, tok, sudoku.prompt(cells), max_tokens=model.canvas_length, seed=seed + i,
                             mode="exact")
                text, p = r.answer, r.decoder_passes
            else:
                out = None
                for out in sudoku.stream_solve(model, tok, cells, digits_only=mode.endswith("1-4"), seed=seed + i):
                    pass
                text, p = out.text, out.result.decoder_passes
            solved += sudoku.is_solution(sudoku.parse_grid(text), cells)
            passes += p
        rows.append({"mode": mode, "solved": solved / len(puzzles), "passes": passes / len(puzzles),
                     "seconds": (time.perf_counter() - t0) / len(puzzles), "n": len(puzzles)})
    return rows


MAX = {"name": 3, "age": 2, "city": 3}  # tokens: above every value's length with the demo tokenizer
MAX_MODE = f"holes of at most {MAX['name']}/{MAX['age']}/{MAX['city']} tokens"


def eval_card(model, tok, n: int, seed: int) -> list[dict]:
    items = held_out("card", n)
    fields = ("name", "age", "city")
    rows = []
    for mode in ("plain generation", "holes of the right length", MAX_MODE, "JSON schema"):
        right = {f: 0 for f in fields}
        parsed = matched = 0
        for i, (prompt, answer) in enumerate(items):
            ref = card_fields(answer)
            if mode == "plain generation":
                got = card_fields(generate(model, tok, prompt, max_tokens=2 * model.canvas_length, seed=seed + i,
                                           mode="exact").answer)
            elif mode == "holes of the right length":
                # The space after the colon goes into the hole (tokenizers that join it to the word).
                k = {f: len(tok.encode(" " + ref[f], add_special_tokens=False)) for f in fields}
                t = f"Name:{{{{name:{k['name']}}}}}\nAge:{{{{age:{k['age']}}}}}\nCity:{{{{city:{k['city']}}}}}"
                got = infill(model, tok, prompt, t, seed=seed + i).holes
            elif mode == MAX_MODE:
                t = f"Name:{{{{name:..{MAX['name']}}}}}\nAge:{{{{age:..{MAX['age']}}}}}\nCity:{{{{city:..{MAX['city']}}}}}"
                got = infill(model, tok, prompt, t, seed=seed + i).holes
            else:
                schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                           "age": {"type": "integer"},
                                                           "city": {"enum": list(CITIES)}}}
                out = fill_json(model, tok, prompt, schema, seed=seed + i)
                try:
                    value = json.loads(out.text)
                    parsed += 1
                    matched += (set(value) == set(fields) and isinstance(value["name"], str)
                                and isinstance(value["age"], int) and value["city"] in CITIES)
                except (ValueError, KeyError):
                    value = {}
                got = {f: str(value.get(f, "")) for f in fields}
            for f in fields:
                right[f] += got.get(f, "").strip() == ref[f]
        row = {"mode": mode, "n": len(items), **{f: right[f] / len(items) for f in fields}}
        if mode == "JSON schema":
            row.update(parse=parsed / len(items), schema=matched / len(items))
        rows.append(row)
    return rows


def eval_read(model, tok, n: int, seed: int) -> dict:
    items = held_out("yesno", n)
    agree = read_ok = gen_ok = 0
    gen_passes = 0
    t_read = t_gen = 0.0
    confidences = []
    for i, (prompt, answer) in enumerate(items):
        t0 = time.perf_counter()
        res = score(model, tok, prompt, ["yes", "no"], seed=seed + i)
        t_read += time.perf_counter() - t0
        t0 = time.perf_counter()
        r = generate(model, tok, prompt, max_tokens=model.canvas_length, seed=seed + i, mode="exact")
        t_gen += time.perf_counter() - t0
        produced = r.answer.strip()
        gen_passes += r.decoder_passes
        agree += res.choice == produced
        read_ok += res.choice == answer
        gen_ok += produced == answer
        confidences.append(res.confidence)
    k = len(items)
    return {"n": k, "agreement": agree / k, "read_accuracy": read_ok / k, "generation_accuracy": gen_ok / k,
            "read_passes": 1.0, "generation_passes": gen_passes / k, "read_seconds": t_read / k,
            "generation_seconds": t_gen / k, "mean_confidence": sum(confidences) / k}


def table(results: dict) -> str:
    lines = [f"Model: `{results['model']}`, {results['n']} held-out prompts per family, seeds {results['seed']}+i.", ""]
    if "sudoku" in results:
        lines += ["**Sudoku 4x4**", "", "| mode | solved | decoder passes / puzzle | s / puzzle |", "|---|---|---|---|"]
    for r in results.get("sudoku", []):
        lines.append(f"| {r['mode']} | {pct(r['solved'])} | {r['passes']:.1f} | {r['seconds']:.2f} |")
    if "card" in results:
        lines += ["", "**Card template** (accuracy per field; JSON: parse and schema-match rates)", "",
                  "| mode | name | age | city | parses | matches schema |", "|---|---|---|---|---|---|"]
    for r in results.get("card", []):
        extra = (pct(r["parse"]), pct(r["schema"])) if "parse" in r else ("-", "-")
        lines.append(f"| {r['mode']} | {pct(r['name'])} | {pct(r['age'])} | {pct(r['city'])} | {extra[0]} | {extra[1]} |")
    if "read" not in results:
        return "\n".join(lines)
    s = results["read"]
    lines += ["", "**Structured read** (yes/no questions)", "",
              "| | agreement with full generation | accuracy | decoder passes | s / question |", "|---|---|---|---|---|",
              f"| `score` (one pass) | {pct(s['agreement'])} | {pct(s['read_accuracy'])} | {s['read_passes']:.0f} | {s['read_seconds']:.3f} |",
              f"| full generation | - | {pct(s['generation_accuracy'])} | {s['generation_passes']:.1f} | {s['generation_seconds']:.3f} |",
              "", f"Mean confidence of `score`: {pct(s['mean_confidence'])}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--write-docs", action="store_true", help="put the table into docs/editing.md")
    ap.add_argument("--only", default="sudoku,card,read", help="sections to run (comma-separated)")
    ap.add_argument("--merge", type=Path, nargs="+", help="no run: the table from earlier --json files")
    args = ap.parse_args(argv)
    if args.merge:
        results = {}
        for path in args.merge:
            part = json.loads(path.read_text())
            results.update({k: v for k, v in part.items() if k != "seconds"})
            results["seconds"] = max(results.get("seconds", 0.0), part.get("seconds", 0.0))
    else:
        model, tok = load(args.model)
        results = {"model": args.model, "n": args.n, "seed": args.seed}
        t0 = time.perf_counter()
        runs = {"sudoku": eval_sudoku, "card": eval_card, "read": eval_read}
        for name in args.only.split(","):
            results[name] = runs[name](model, tok, args.n, args.seed)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
        results["seconds"] = time.perf_counter() - t0
    md = table(results)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write_docs:
        write_block(ROOT / "docs" / "editing.md", "<!-- editing-table:begin -->", "<!-- editing-table:end -->",
                    f"Measured by `python scripts/eval_editing.py --model demo --n {results['n']} --write-docs` "
                    f"({results['seconds']:.0f} s in all on a 2-core CPU).\n\n{md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
