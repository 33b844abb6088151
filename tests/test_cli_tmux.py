"""`dgemma chat` in a real terminal (tmux): the block is redrawn in place, committed text and the
stats line stay, Ctrl-C stops a reply and keeps the session, /quit, Ctrl-C and Ctrl-D exit 0.
Plus the piped mode through a real pipe. Skipped only where tmux is missing outside CI."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
DGEMMA = Path(sys.executable).parent / "dgemma"
STATUS = re.compile(r"block (\d+) · step (\d+)/(\d+) · accepted \d+/\d+")
STATS = re.compile(r"\d+ tokens? · [\d.]+ tok/s · [\d.]+ steps/block · [\d.]+ tokens/forward")
PROMPT = ">>>"


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def _env(home: Path) -> dict:
    return {**os.environ, "MLX_DIFFUSIONGEMMA_HOME": str(home), "HF_HUB_OFFLINE": "1"}


class Terminal:
    """A detached tmux session on a private server, 120x40, running one shell command."""

    def __init__(self, name: str, command: str, env: dict):
        self.server = ["tmux", "-u", "-L", f"dgemma-test-{os.getpid()}", "-f", "/dev/null"]
        self.name = name
        exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("MLX_DIFFUSIONGEMMA_HOME", "HF_HUB_OFFLINE"))
        script = f"env {exports} {command} ; echo EXIT=$? ; sleep 30"
        self._tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", script, env=env)
        self.socket = self._tmux("display-message", "-p", "#{socket_path}").strip()

    def _tmux(self, *args, env=None) -> str:
        return subprocess.run([*self.server, *args], check=True, capture_output=True, text=True,
                              env=env, timeout=10).stdout

    def lines(self) -> list[str]:
        """The pane's rows, without the empty ones at the bottom."""
        rows = self._tmux("capture-pane", "-p", "-t", self.name).split("\n")
        while rows and not rows[-1].strip():
            rows.pop()
        return rows

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.name, "-l", text)
        self.send("Enter")

    def wait(self, predicate, timeout: float, what: str, every: float = 0.05) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.lines()
            if predicate(rows):
                return rows
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; the pane shows:\n" + "\n".join(rows))
            time.sleep(every)

    def at_prompt(self, rows: list[str]) -> bool:
        return bool(rows) and rows[-1].strip() == PROMPT

    def close(self) -> None:
        subprocess.run([*self.server, "kill-server"], capture_output=True)
        if self.socket:
            Path(self.socket).unlink(missing_ok=True)


@pytest.fixture
def terminal():
    if TMUX is None:
        pytest.fail("tmux is required in CI (.ci/run installs it)") if os.environ.get("CI") else pytest.skip(
            "tmux is not installed")
    opened: list[Terminal] = []

    def open_(name, command, env):
        opened.append(Terminal(name, command, env))
        return opened[-1]

    yield open_
    if opened:
        opened[0].close()


def _after(rows: list[str], marker: str) -> list[str]:
    """The rows after the last one that ends with `marker` (the line the message was typed on)."""
    idx = max(i for i, r in enumerate(rows) if r.rstrip().endswith(marker))
    return rows[idx + 1:]


def _reply(term: Terminal, message: str) -> tuple[list[list[str]], list[str]]:
    """Send a message; return the pane captures taken while the block was being refined, and
    the pane once the reply is over (stats line, then the prompt)."""
    term.type(message)
    during: list[list[str]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = term.lines()
        tail = _after(rows, message) if any(r.rstrip().endswith(message) for r in rows) else []
        if any(STATUS.search(r) for r in tail):
            during.append(tail)
        elif any(STATS.search(r) for r in tail) and term.at_prompt(rows):
            return during, tail
        time.sleep(0.02)
    pytest.fail("the reply did not finish; the pane shows:\n" + "\n".join(term.lines()))


def test_live_chat_in_a_terminal(terminal, home, tmp_path):
    # The random demo: it never converges, so every block runs all its steps for the captures.
    cmd = f"{shlex.quote(str(DGEMMA))} chat --model demo-random --max-tokens 96 --steps 12"
    term = terminal("chat", cmd, _env(home))
    rows = term.wait(term.at_prompt, 45, "the prompt")
    assert any("demo model: random weights" in r for r in rows)

    # A reply, captured while it is drawn. The demo model is fast: retry until several steps
    # were caught (each capture is one tmux call; a block is 12 steps).
    seen: set[tuple[int, int]] = set()
    for attempt in range(4):
        during, after = _reply(term, f"hello number {attempt}")
        seen = {(int(m[1]), int(m[2])) for rows in during for r in rows if (m := STATUS.search(r))}
        if len(seen) >= 3:
            break
    assert len(seen) >= 3, f"caught only {sorted(seen)} during the replies"

    heights: dict[int, list[tuple[int, int]]] = {}
    for rows in during:
        status = [r for r in rows if STATUS.search(r)]
        assert len(status) == 1, "\n".join(rows)  # one status line: redrawn, not appended
        assert STATUS.search(rows[-1]), "\n".join(rows)  # at the bottom, under the draft
        m = STATUS.search(status[0])
        assert int(m[3]) == 12
        heights.setdefault(int(m[1]), []).append((int(m[2]), len(rows)))
    for block, pairs in heights.items():
        # The pane does not grow with the steps of a block (the last step's status stays up
        # while the block's text is committed above it: left out).
        hs = [h for step, h in pairs if step < max(s for s, _ in pairs)]
        assert not hs or max(hs) - min(hs) <= 2, f"block {block}: (step, rows) {pairs}"

    # After the reply: the status line is gone, the committed text and the stats line stay.
    assert not any(STATUS.search(r) for r in after)
    assert STATS.search(after[-2]) and after[-1].strip() == PROMPT
    saved = tmp_path / "chat.json"
    term.type(f"/save {saved}")
    term.wait(lambda rows: any("saved" in r for r in rows[-3:]), 10, "/save")
    messages = json.loads(saved.read_text())
    squeeze = lambda s: "".join(s.split())
    assert squeeze("".join(after[:-2])) == squeeze(messages[-1]["content"])

    # Ctrl-C during a long reply: back at the prompt, the process alive, the session intact.
    term.type("/steps 400")
    term.wait(lambda rows: any("steps per block: 400" in r for r in rows[-3:]), 10, "/steps")
    term.type("tell me a very long story")
    term.wait(lambda rows: any(STATUS.search(r) and "/400" in r for r in rows[-3:]), 20, "the long reply")
    term.send("C-c")
    rows = term.wait(lambda rows: term.at_prompt(rows) and any("interrupted" in r for r in rows[-4:]),
                     10, "the prompt after Ctrl-C")
    assert not any(r.startswith("EXIT=") for r in rows)
    term.type(f"/save {saved}")
    term.wait(lambda rows: term.at_prompt(rows) and "saved" in rows[-2], 10, "/save")
    assert json.loads(saved.read_text()) == messages  # the stopped turn was not recorded

    term.type("/quit")
    term.wait(lambda rows: any(r.strip() == "EXIT=0" for r in rows), 10, "EXIT=0")


def test_ctrl_c_and_ctrl_d_at_the_prompt_exit_0(terminal, home):
    from mlx_diffusiongemma.demo.random import DEMO_VERSION, ensure_demo

    ensure_demo(home / f"demo-v{DEMO_VERSION}")  # built once, before both sessions start
    cmd = f"{shlex.quote(str(DGEMMA))} chat --model demo-random"
    ctrl_c = terminal("ctrl-c", cmd, _env(home))
    ctrl_d = terminal("ctrl-d", cmd, _env(home))
    for term, key in ((ctrl_c, "C-c"), (ctrl_d, "C-d")):
        term.wait(term.at_prompt, 45, "the prompt")
        term.send(key)
    for term in (ctrl_c, ctrl_d):
        rows = term.wait(lambda rows: any(r.startswith("EXIT=") for r in rows), 10, "the exit")
        assert "EXIT=0" in [r.strip() for r in rows]
        assert not any("Traceback" in r for r in rows)


def test_piped_chat_prints_only_committed_text(home, tmp_path):
    saved = tmp_path / "t.json"
    cmd = (f"printf 'hi\\n/save {saved}\\n' | "
           f"{shlex.quote(str(DGEMMA))} chat --model demo --max-tokens 32 --steps 3")
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=_env(home), timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b" not in out
    for noise in ("step ", "tok/s", "steps/block", PROMPT, "demo model", "saved"):
        assert noise not in out
    assert out == json.loads(saved.read_text())[-1]["content"] + "\n"  # the reply, and nothing else
    assert "toy tasks" in proc.stderr  # what the demo model is, on stderr


def test_trained_demo_answers_in_a_terminal(terminal, home):
    """The newcomer's path: `dgemma chat --model demo`, /help lists prompts to try, one of them
    gets the right answer on screen."""
    cmd = f"{shlex.quote(str(DGEMMA))} chat --model demo --seed 0"
    term = terminal("demo", cmd, _env(home))
    rows = term.wait(term.at_prompt, 45, "the prompt")
    assert any("toy tasks" in r for r in rows)
    term.type("/help")
    rows = term.wait(lambda rows: term.at_prompt(rows) and any("Sort these numbers:" in r for r in rows), 10, "/help")
    assert any("dgemma sudoku" in r for r in rows)
    _, after = _reply(term, "Reverse the words: sun moon star rain")
    assert "rain star moon sun" in " ".join(after[:-2])
    term.type("/quit")
    term.wait(lambda rows: any(r.strip() == "EXIT=0" for r in rows), 10, "EXIT=0")
