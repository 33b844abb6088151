"""Errors and input on the command line: one `error: ...` line and an exit code, never a traceback.

Errors the user can act on (`DiffusionGemmaError`, bad values) print one line on stderr and exit 1;
typer's usage errors keep code 2; `--debug` adds the traceback. Interrupts exit 128 + the signal.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager

import click
import typer


def fail(message: str, code: int = 1):
    """Print `error: message` (on one line) on stderr and exit with `code`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def nothing():
    yield


@contextmanager
def handle_errors(debug: bool):
    """One line on stderr and exit 1 for errors; the traceback too with --debug."""
    from mlx_diffusiongemma.errors import DiffusionGemmaError

    try:
        yield
    except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        signum = getattr(e, "signum", 2)  # convert turns SIGTERM/SIGHUP into an interrupt too
        print("interrupted" if signum == 2 else f"interrupted ({e})", file=sys.stderr)
        raise typer.Exit(128 + signum)
    except BrokenPipeError:
        # The reader went away (`dgemma generate ... | head`): stop quietly, like other CLI tools.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0)
    except (DiffusionGemmaError, ValueError, OSError) as e:
        if debug:
            traceback.print_exc()
        fail(str(e))
    except Exception as e:
        if debug:
            traceback.print_exc()
            fail(f"{type(e).__name__}: {e}")
        fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)")


def read_stdin_text() -> str:
    """All of stdin as text, without the line break(s) at its end (`echo ... |` adds one, which
    the prompt `-p "..."` would not have; the shell's `$(...)` drops them the same way); invalid
    UTF-8 is reported, not passed on (see check_text)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"the prompt on stdin is not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "convert it first, e.g. `iconv -f LATIN1 -t UTF-8`"
            ) from None
    return data.rstrip("\r\n")


def check_text(text: str, what: str) -> None:
    """Undecodable bytes reach Python as lone surrogates (from argv or a non-UTF-8 stream): the
    tokenizer would reject them with an internal message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid UTF-8 text (an undecodable byte at character {e.start}); "
            "convert it to UTF-8 first, e.g. `iconv -f LATIN1 -t UTF-8`"
        ) from None


def is_terminal() -> bool:
    """Whether the user is at a terminal (stdin and stdout both): live views and prompts."""
    return sys.stdin.isatty() and sys.stdout.isatty()
