"""Committed text -> what an OpenAI client sees: answer content, reasoning, tool calls, stop strings.

Gemma 4 writes its thought channel as `<|channel>thought ... <channel|>` and each tool call as
`<|tool_call>call:name{...}<tool_call|>`. Text reaches us in pieces (one per committed block, or
per emitted prefix when streaming inside a canvas), so a marker, a stop string or a call can be
cut between two pieces: the end of the text that could still be the start of one is held back
until the next piece (or the end) shows what it is. A tool call is handed out only once its end
marker arrives, parsed by mlx-lm's own Gemma 4 parser.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from mlx_lm.tool_parsers import gemma4

from ..events import THOUGHT_CLOSE, THOUGHT_OPEN

TOOL_OPEN = gemma4.tool_call_start
TOOL_CLOSE = gemma4.tool_call_end
_MARKERS = (THOUGHT_OPEN, THOUGHT_CLOSE, TOOL_OPEN, TOOL_CLOSE)


@dataclass
class Delta:
    """What one piece of text adds: answer text, reasoning text, complete tool calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def _held_back(text: str, needles: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of one of `needles`."""
    longest = max((len(n) for n in needles), default=0)
    for n in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(needle.startswith(tail) and needle != tail for needle in needles):
            return n
    return 0


def format_tool_call(parsed: dict[str, Any], index: int) -> dict[str, Any]:
    """One parsed call (`{"name", "arguments"}`) in the OpenAI `tool_calls` shape."""
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": parsed["name"], "arguments": json.dumps(parsed["arguments"], ensure_ascii=False)},
    }


class TextStream:
    """Incremental splitter. `feed(piece)` returns the Delta that is certain so far;
    `finish()` flushes what was held back. `stopped` is set once a stop string was found (the
    text is cut before it and everything after is ignored)."""

    def __init__(self, stop: Sequence[str] = (), *, split_channels: bool = True):
        self.stop = [s for s in stop if s]
        self.split = split_channels
        self.raw = ""  # all text received (cut at a stop string)
        self._done = 0  # raw[:_done] has been turned into deltas
        self._state = "answer"  # "answer" | "reasoning" | "tool"
        self._tool = ""  # text of the tool call being received
        self._strip_newlines = True  # drop newlines that open the answer / the thought
        self.tool_call_count = 0
        self.stopped = False

    def feed(self, piece: str) -> Delta:
        if self.stopped:
            return Delta()
        self.raw += piece
        if self.stop:
            # Search only where a new match can be (a stop string may straddle the old end).
            start = max(0, self._done - max(map(len, self.stop)))
            hits = [i for i in (self.raw.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.raw = self.raw[: min(hits)]
                self.stopped = True
                return self._advance(len(self.raw), final=True)
        needles = (list(_MARKERS) if self.split else []) + self.stop
        return self._advance(len(self.raw) - _held_back(self.raw, needles), final=False)

    def finish(self) -> Delta:
        return self._advance(len(self.raw), final=True)

    # -- the state machine over raw[_done:end] ------------------------------------------------------
    def _advance(self, end: int, final: bool) -> Delta:
        out = Delta()
        text = self.raw[self._done:end]
        self._done = max(self._done, end)
        if not self.split:
            out.content = text
            return out
        while text:
            if self._state == "tool":
                i = text.find(TOOL_CLOSE)
                if i < 0:
                    self._tool += text
                    break
                self._tool += text[:i]
                self._end_tool(out)
                text = text[i + len(TOOL_CLOSE):]
                self._state, self._strip_newlines = "answer", False
                continue
            closers = [THOUGHT_CLOSE] if self._state == "reasoning" else [THOUGHT_OPEN, TOOL_OPEN]
            found = [(text.find(m), m) for m in closers if text.find(m) >= 0]
            i, marker = min(found) if found else (len(text), None)
            self._emit(out, text[:i])
            if marker is None:
                break
            text = text[i + len(marker):]
            if marker == THOUGHT_OPEN:
                self._state, self._strip_newlines = "reasoning", True
            elif marker == THOUGHT_CLOSE:
                self._state, self._strip_newlines = "answer", True
            else:
                self._state, self._tool = "tool", ""
        if final and self._state == "tool":
            # Cut by the length budget (or a stop string) inside a call: hand out what parses.
            self._end_tool(out)
            self._state = "answer"
        return out

    def _emit(self, out: Delta, text: str) -> None:
        if self._strip_newlines:
            stripped = text.lstrip("\n")
            if stripped:
                self._strip_newlines = False
            text = stripped
        if self._state == "reasoning":
            out.reasoning += text
        else:
            out.content += text

    def _end_tool(self, out: Delta) -> None:
        try:
            parsed = gemma4.parse_tool_call(self._tool)
        except (ValueError, json.JSONDecodeError):
            # Not a call this parser understands: keep the model's text rather than lose it.
            out.content += TOOL_OPEN + self._tool
            self._tool = ""
            return
        for call in parsed if isinstance(parsed, list) else [parsed]:
            out.tool_calls.append(format_tool_call(call, self.tool_call_count))
            self.tool_call_count += 1
        self._tool = ""
