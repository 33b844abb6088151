"""`dgemma complete`: the text between a prefix and a suffix (code completion at a cursor), on the
path `/v1/completions` with `suffix`, `/infill` and `editing.complete` take: the same seed gives
the same middle."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlx_diffusiongemma.checkpoint.files import DEFAULT_MODEL
from mlx_diffusiongemma.diffusion.options import GenerationOptions

from .errors import handle_errors
from .fill import read_source
from .flags import Debug, Model, Offline, generation_flags


@generation_flags("max_denoising_steps", "seed")
def complete(
    prefix_file: Annotated[str, typer.Option("--prefix-file", help="The text before the cursor ('-': stdin).")],
    suffix_file: Annotated[Optional[str], typer.Option(
        "--suffix-file", help="The text after the cursor, pinned on the canvas after the middle.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m", min=1, help="Room for the middle (tokens).")] = 64,
    model: Model = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print {text, holes, seed, ...} as JSON.")] = False,
    offline: Offline = False,
    debug: Debug = False,
    *,
    options: GenerationOptions,
):
    """Complete the text between a prefix and a suffix; prints the middle alone."""
    from mlx_diffusiongemma.editing.complete import complete as complete_middle

    from .loader import load_model

    with handle_errors(debug):
        if prefix_file == "-" and suffix_file == "-":
            raise ValueError("only one of --prefix-file and --suffix-file can read stdin")
        prefix = read_source(prefix_file, "the prefix")
        suffix = read_source(suffix_file, "the suffix") if suffix_file is not None else ""
        llm, tokenizer = load_model(model, offline, Console(stderr=True, highlight=False))
        out = complete_middle(llm, tokenizer, prefix, suffix, max_tokens=max_tokens, options=options)
        if as_json:
            print(json.dumps(out.to_json(), ensure_ascii=False))
        else:
            sys.stdout.write(out.text + "\n")
