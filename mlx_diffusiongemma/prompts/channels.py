"""Committed text -> thought channel, answer, tool calls and stop strings, incrementally.

Gemma 4 writes its thought channel as `<|channel>thought ... <channel|>` and each tool call as
`<|tool_call>call:name{...}<tool_call|>`. Text reaches a front end in pieces (one per committed
block, or per emitted prefix when streaming inside a canvas), so a marker, a stop string or a call
can be cut between two pieces: the end of the text that could still be the start of one is held
back until the next piece (or the end) shows what it is. A tool call is handed out only once its
end marker arrives, parsed by mlx-lm's own Gemma 4 parser. `TextStream` is the one splitter: the
terminal and the HTTP server both read committed text through it; `split_thinking` splits a
whole text at once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from mlx_lm.tool_parsers import gemma4

THOUGHT_OPEN = "<|channel>thought"
THOUGHT_CLOSE = "<channel|>"
TOOL_OPEN = gemma4.tool_call_start
TOOL_CLOSE = gemma4.tool_call_end
_MARKERS = (THOUGHT_OPEN, THOUGHT_CLOSE, TOOL_OPEN, TOOL_CLOSE)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thought channel or None, answer) for text in Gemma 4's channel format."""
    start = text.find(THOUGHT_OPEN)
    if start < 0:
        return None, text
    body_start = start + len(THOUGHT_OPEN)
    end = text.find(THOUGHT_CLOSE, body_start)
    if end < 0:  # still thinking (or cut by the length budget)
        return text[body_start:].lstrip("\n"), text[:start]
    thought = text[body_start:end].strip("\n")
    return thought, (text[:start] + text[end + len(THOUGHT_CLOSE):]).lstrip("\n")


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
    text is cut before it and everything after is ignored). `split_channels=False` passes all
    text through as content (plain completions); `parse_tools=False` keeps tool calls as the
    model wrote them, in the content (the terminal shows them as text)."""

    def __init__(self, stop: Sequence[str] = (), *, split_channels: bool = True, parse_tools: bool = True):
        self.stop = [s for s in stop if s]
        self.split = split_channels
        self.parse_tools = parse_tools
        self.raw = ""  # all text received (cut at a stop string)
        self._done = 0  # raw[:_done] has been turned into deltas
        self._state = "answer"  # "answer" | "reasoning" | "tool"
        self._tool = ""  # text of the tool call being received
        self._strip_newlines = True  # drop newlines that open the answer / the thought
        self._reasoning_newlines = ""  # newlines at the end of the thought so far: dropped if it ends there
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
        markers = _MARKERS if self.parse_tools else (THOUGHT_OPEN, THOUGHT_CLOSE)
        needles = (list(markers) if self.split else []) + self.stop
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
            if self._state == "reasoning":
                closers = [THOUGHT_CLOSE]
            else:
                closers = [THOUGHT_OPEN, TOOL_OPEN] if self.parse_tools else [THOUGHT_OPEN]
            found = [(text.find(m), m) for m in closers if text.find(m) >= 0]
            i, marker = min(found) if found else (len(text), None)
            self._emit(out, text[:i])
            if marker is None:
                break
            text = text[i + len(marker):]
            if marker == THOUGHT_OPEN:
                self._state, self._strip_newlines = "reasoning", True
            elif marker == THOUGHT_CLOSE:
                self._state, self._strip_newlines, self._reasoning_newlines = "answer", True, ""
            else:
                self._state, self._tool = "tool", ""
        if final and self._state == "reasoning":
            out.reasoning += self._reasoning_newlines  # the thought was cut off: keep what it wrote
            self._reasoning_newlines = ""
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
            # Newlines that end the thought so far wait for what follows: before the closing
            # marker they are dropped (the thought is shown apart), before more thought kept.
            text = self._reasoning_newlines + text
            body = text.rstrip("\n")
            self._reasoning_newlines = text[len(body):]
            out.reasoning += body
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
