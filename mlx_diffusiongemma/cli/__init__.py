"""The `dgemma` command line: typer commands (`app.py` gathers them; one module per command or two),
their flags (`flags.py`, the generation knobs derived from `GenerationOptions`), errors
(`errors.py`) and the terminal views of engine events (`views.py`)."""
