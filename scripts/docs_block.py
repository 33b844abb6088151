"""Write a generated block into a docs page between two HTML-comment markers.

Scripts that measure something (`bench_demo.py --update-docs`, `eval_editing.py --write-docs`)
own only the text between their markers; the prose around it is written by hand and stays.
"""

from __future__ import annotations

from pathlib import Path


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
