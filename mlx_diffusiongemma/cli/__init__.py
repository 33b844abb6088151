"""The `dgemma` command line: typer commands (app) and rich rendering of engine events (live)."""
