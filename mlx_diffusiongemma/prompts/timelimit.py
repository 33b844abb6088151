"""A wall-clock limit on Python code that may not end, such as a checkpoint's chat template.

A chat template is Jinja code from the checkpoint: rendered in transformers' sandbox it cannot
read files or run commands, but nested loops over `range(100000)` still never end. Threads cannot
be killed and signals reach only the main thread, so the limit is enforced with a trace function
(`sys.settrace`, this thread only) that checks the clock on every call and on every line of the
compiled template, and raises out of the running code when the time is up. It is set only while
the guarded code runs (a template renders in milliseconds), and the previous tracer (a debugger,
coverage) is put back afterwards.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from ..errors import CheckpointError

# Jinja compiles templates made from strings under this file name.
_TEMPLATE_FILE = "<template>"


class _Expired(BaseException):
    """Raised inside the guarded code; a BaseException so that no `except Exception` on the way
    (Jinja re-raises what a template raises) can swallow it."""


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Run the block with a limit of `seconds`; past it, raise a CheckpointError about `what`."""
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Expired
        return on_line

    def on_call(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Expired
        # Line events only in template code: the rest of the call pays one clock read per call.
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    except _Expired:
        raise CheckpointError(
            f"{what} took more than {seconds:g} s and was stopped; the checkpoint's chat template "
            "is broken or hostile (replace chat_template.jinja or the chat_template in tokenizer_config.json)"
        ) from None
    finally:
        sys.settrace(previous)
