"""Write a generated block into a docs page between two HTML-comment markers.

Scripts that measure something (`bench_demo.py --update-docs`, `eval_editing.py --write-docs`)
own only the text between their markers; the prose around it is written by hand and stays.
`write_results` is the common end of a benchmark: raw results, their table, and the docs block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_block(path: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between `begin` and `end` (markers kept) with `body`; a page without the
    markers gets the block appended at its end."""
    text = path.read_text()
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_results(out: Path, results: dict[str, Any], md: str, docs: tuple[Path, str, str] | None = None,
                  indent: int = 1) -> None:
    """Write `OUT/results.json` (every raw number) and `OUT/results.md` (the table `md`), print the
    table, and with `docs=(page, begin, end)` put it into that page's block."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=indent, default=str))
    (out / "results.md").write_text(md + "\n")
    print(md)
    if docs is not None:
        write_block(docs[0], docs[1], docs[2], md)
