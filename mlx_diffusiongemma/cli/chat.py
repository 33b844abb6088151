"""`dgemma chat`: read a line, run a slash command or send it to the `ChatSession`.

In a terminal replies are drawn live and followed by a stats line; Ctrl-C during a reply stops
it (the session only records completed turns), Ctrl-C or Ctrl-D at the prompt quits. Piped, the
loop reads stdin line by line and prints only the replies' text on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlx_diffusiongemma.checkpoint.files import DEFAULT_MODEL
from mlx_diffusiongemma.diffusion.options import GENERATION_KNOBS, MAX_STEPS, GenerationOptions, KnobError
from mlx_diffusiongemma.errors import ContextLengthError, DiffusionGemmaError, MemoryLimitError

from .errors import check_text, handle_errors, is_terminal
from .fill import styled_fill
from .flags import AdapterPath, Debug, Images, KvBits, KvGroupSize, Model, NoLive, Offline, System, TextOnly, generation_flags
from .generate import TEXT_DEFAULTS, TEXT_KNOBS
from .loader import demo_notice, load_model
from .views import (CanvasView, ConsoleView, LiveView, PlainView, labels_for, render, run_events, stats_line,
                    stats_rows)

PROMPT = ">>> "

HELP = f"""\
/help            this help
/reset           forget the conversation
/stats           numbers of the last reply
/steps N         max denoising steps per block, 1 to {MAX_STEPS} (no N: show it)
/think on|off    thinking mode (the thought channel is shown dimmed)
/image PATH      attach an image to your next message (repeatable; no PATH: list them)
/save FILE       save the conversation (.json: the messages; otherwise markdown)
/fill TEMPLATE   answer the next message with a template, \\n for a new line (/fill off), e.g.
                 /fill Name:{{{{name:..3}}}}\\nAge:{{{{age:..2}}}}\\nCity:{{{{city:..3}}}}
/edit TEXT       rewrite the last reply following TEXT (warm start from the reply)
/quit            leave (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during a reply stops it; the conversation stays as it was before the message."""


@generation_flags(*TEXT_KNOBS, fast=True, **TEXT_DEFAULTS)
def chat(
    model: Model = DEFAULT_MODEL,
    system: System = None,
    no_live: NoLive = False,
    image: Images = None,
    text_only: TextOnly = False,
    kv_bits: KvBits = None,
    kv_group_size: KvGroupSize = None,
    offline: Offline = False,
    adapter_path: AdapterPath = None,
    debug: Debug = False,
    *,
    options: GenerationOptions,
):
    """Chat with the model (multi-turn; /help lists the slash commands; --image or /image attach images)."""
    interactive = is_terminal()
    ui = Console(stderr=not interactive, highlight=False)
    with handle_errors(debug):
        if system is not None:
            check_text(system, "the system prompt")
        from .images import check_image_options, preprocess

        check_image_options(image, text_only)
        llm, tokenizer = load_model(model, offline, ui, adapter_path, text_only, kv_bits, kv_group_size)
        pending = preprocess(llm, image)  # checked before the first message
        from mlx_diffusiongemma.api import ChatSession

        session = ChatSession(llm, tokenizer, system=system, options=options)
        if options.thinking:
            demo_notice(llm, "think", ui)
        if system:
            demo_notice(llm, "system", ui)
        if interactive:
            ui.print("[bold]DiffusionGemma chat[/] [dim]· /help for commands · Ctrl-D to quit[/]")
        loop = ChatLoop(session, interactive=interactive, live=not no_live, ui=ui)
        loop.pending_images = pending
        code = loop.run()
    raise typer.Exit(code)


def demo_help() -> str:
    """What the trained demo model can do: one prompt to try per learnt task family, and what it
    has not learnt."""
    from mlx_diffusiongemma.demo.tasks import FAMILIES, LEARNT, NOT_LEARNT

    lines = ["", "The demo model knows only a few toy tasks; prompts to try (type them as shown):"]
    for name in LEARNT:
        family = FAMILIES[name]
        if "\n" not in family.example:  # a chat message is one line
            lines.append(f"  {family.about:<44} {family.example}")
    lines.append("  A sudoku needs several lines: run `dgemma sudoku '1..4/.4../..4./4..1'` instead.")
    lines.append(f"Not learnt (its answers there are wrong): {NOT_LEARNT}; no thinking, no system prompts.")
    # Trained on single-turn prompts only: an earlier task in the history confuses it.
    lines.append("One task per conversation: /reset before the next. Accuracy per task: docs/demo-model.md.")
    return "\n".join(lines)


def canvas_stats_line(out) -> str:
    """The stats line of a template or span reply: the tokens the model wrote into the holes (a
    template's canvas is all positions, pinned text and unused hole positions included, which the
    plain stats line would count), over the decoder passes."""
    written = sum(len(d["tokens"]) for d in out.details.values())
    result = out.result
    passes = max(result.decoder_passes, 1)
    return (f"{written} token{'s' if written != 1 else ''} in the holes · {result.decoder_passes} decoder passes · "
            f"{written / passes:.2f} tokens/forward · prefill {result.prefill_time:.2f} s")


class Quit(Exception):
    pass


class ChatLoop:
    def __init__(self, session, *, interactive: bool, live: bool, ui: Console, out: Console | None = None):
        self.session = session
        self.interactive = interactive
        self.live = live and interactive
        self.ui = ui  # messages (stdout in a terminal, stderr when piped)
        self.out = out or ui  # replies in a terminal
        self.labels = labels_for(session.model, session.tokenizer)
        self.failed = False
        self.template: str | None = None  # /fill: the template for the next reply
        self.pending_images: list = []  # processed images for the next message (--image, /image)

    # -- input ------------------------------------------------------------------------------

    def _read(self) -> str | None:
        """The next line, or None at the end of input."""
        if self.interactive:
            try:
                return input(PROMPT)
            except EOFError:
                self.ui.print()
                return None
        if sys.stdin.isatty():  # typing, with stdout redirected: the prompt goes to stderr
            sys.stderr.write(PROMPT)
            sys.stderr.flush()
        stream = getattr(sys.stdin, "buffer", None)
        if stream is not None:
            # Bytes, decoded here: an invalid UTF-8 line becomes an error for that line (see
            # reply), not an exception that ends the session.
            raw = stream.readline()
            line = raw.decode("utf-8", errors="surrogateescape") if raw else ""
        else:
            line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def run(self) -> int:
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                self.ui.print()
                break
            except UnicodeDecodeError:  # input() on a terminal that sent invalid UTF-8
                self._error("that line is not valid UTF-8 text; it was not sent")
                continue
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    self.command(line)
                else:
                    self.reply(line)
            except Quit:
                break
            except Exception as e:  # a slash command's unexpected failure: reported, the session goes on
                self._error(f"{type(e).__name__}: {e}")
        return 1 if self.failed and not self.interactive else 0

    # -- a reply ----------------------------------------------------------------------------

    def _view(self):
        if not self.interactive:
            return PlainView(sys.stdout, sys.stderr if self.session.thinking else None)
        if self.live:
            return LiveView(self.out, self.labels)
        return ConsoleView(self.out)

    def _error(self, message: str) -> None:
        self.failed = True
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)

    def reply(self, message: str) -> None:
        """One turn. Whatever goes wrong is reported and the session goes on: the conversation
        is as it was before the message."""
        if self.template is not None:
            from mlx_diffusiongemma.editing.infill import stream_infill

            template, self.template = self.template, None
            history = self.session.messages + [{"role": "user", "content": message}]
            self._canvas_reply(history, lambda **kw: stream_infill(
                self.session.model, self.session.tokenizer, history, template, **kw))
            return
        try:
            message.encode("utf-8")
        except UnicodeEncodeError:
            self._error("that message is not valid UTF-8 text; it was not sent")
            return
        if any(m.get("role") == "assistant" for m in self.session.messages):
            demo_notice(self.session.model, "second", self.ui)
        events = None
        try:
            events = self.session.stream(message, images=self.pending_images or None)
            result = render(events, self._view())
        except KeyboardInterrupt:
            self.ui.print("[yellow]interrupted[/] (the conversation is as it was before this message)")
            return
        except MemoryLimitError as e:  # says itself what to do (a shorter message, a smaller recipe)
            self._error(str(e))
            return
        except ContextLengthError as e:
            need, limit = getattr(e, "need", None), getattr(e, "limit", None)
            sizes = f" ({need} positions needed, the model has {limit})" if need and limit else ""
            if any(m.get("role") == "assistant" for m in self.session.messages):
                self._error(f"the conversation is too long for the model's context{sizes}; "
                            "/reset starts a new conversation (or send a shorter message)")
            else:
                self._error(f"this message and the reply length (--max-tokens) do not fit the model's "
                            f"context{sizes}; send a shorter message or start with a lower --max-tokens")
            return
        except (DiffusionGemmaError, ValueError, TypeError) as e:
            self._error(str(e))
            return
        except Exception as e:  # never lose the session on an unexpected failure
            self._error(f"{type(e).__name__}: {e}")
            return
        finally:
            if events is not None:
                events.close()
        self.pending_images = []  # they are in the conversation now
        if self.interactive and result is not None:
            self.ui.print(f"[dim]{escape(stats_line(result))}[/]")

    def _canvas_reply(self, history, start) -> None:
        """Run a template / edit reply; it joins the history when complete."""
        s = self.session
        # A template or an edit takes the session's seed, thinking and sampler knobs (the canvas
        # sets the length; the exact path, as the canvas verbs' default).
        options = GenerationOptions(seed=s.options.seed, thinking=s.options.thinking, sampler=s.options.sampler,
                                    fast=None)
        view = CanvasView(self.out, self.labels) if self.live else None
        try:
            out = run_events(start(options=options), view=view)
        except KeyboardInterrupt:
            self.ui.print("[yellow]interrupted[/] (the conversation is as it was before this message)")
            return
        except DiffusionGemmaError as e:
            self.failed = True
            print(f"error: {e}", file=sys.stderr)
            return
        if self.interactive:
            self.out.print(styled_fill(out), soft_wrap=True)
            self.ui.print(f"[dim]{escape(canvas_stats_line(out))}[/]")
        else:
            sys.stdout.write(out.text + "\n")
            sys.stdout.flush()
        s.messages = history + [{"role": "assistant", "content": out.text}]
        s.last_result = out.result

    # -- slash commands ---------------------------------------------------------------------

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handler = getattr(self, "cmd_" + name[1:].lower(), None)
        if handler is None:
            self.ui.print(f"unknown command {escape(name)}; /help lists them")
            return
        handler(arg)

    def cmd_help(self, arg: str) -> None:
        self.ui.print(escape(HELP), highlight=False)
        from mlx_diffusiongemma.demo import is_trained_demo

        if is_trained_demo(self.session.model.source):
            self.ui.print(escape(demo_help()), highlight=False)

    def cmd_quit(self, arg: str) -> None:
        raise Quit

    cmd_exit = cmd_quit

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.pending_images = []
        self.ui.print("conversation cleared")

    def cmd_image(self, arg: str) -> None:
        if not arg:
            names = ", ".join(p.name for p in self.pending_images) or "none"
            self.ui.print(f"images for the next message: {escape(names)}; usage: /image PATH")
            return
        from mlx_diffusiongemma.prompts.images import image_processor

        try:
            image = image_processor(self.session.model)(str(Path(arg).expanduser()), arg)
        except DiffusionGemmaError as e:
            print(f"error: {e}", file=sys.stderr)
            return
        self.pending_images.append(image)
        h, w = image.source_size
        self.ui.print(f"attached {escape(arg)} ({w}x{h}, {image.num_soft_tokens} image tokens) to your next message")

    def cmd_stats(self, arg: str) -> None:
        result = self.session.last_result
        if result is None:
            self.ui.print("no reply yet")
            return
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        for key, value in stats_rows(result):
            table.add_row(key, value)
        self.ui.print(table)

    def cmd_steps(self, arg: str) -> None:
        s = self.session
        if not arg:
            current = s.options.sampler.max_denoising_steps or s.model.generation.max_denoising_steps
            self.ui.print(f"max denoising steps per block: {current}")
            return
        spec = GENERATION_KNOBS["max_denoising_steps"]
        usage = f"usage: /steps N (a whole number from {spec.low:g} to {spec.high:g}); {escape(arg)!s} is not one"
        # isdigit() alone accepts "²" and other digits int() refuses: ASCII digits only.
        if not (arg.isascii() and arg.isdigit()):
            self.ui.print(usage)
            return
        try:
            s.options = s.options.updated(max_denoising_steps=int(arg))
        except KnobError:
            self.ui.print(usage)
            return
        self.ui.print(f"max denoising steps per block: {int(arg)}")

    def cmd_think(self, arg: str) -> None:
        if arg.lower() not in ("on", "off"):
            self.ui.print(f"thinking is {'on' if self.session.thinking else 'off'}; usage: /think on|off")
            return
        self.session.thinking = arg.lower() == "on"
        self.ui.print(f"thinking {arg.lower()}")
        if self.session.thinking:
            demo_notice(self.session.model, "think", self.ui)

    def cmd_fill(self, arg: str) -> None:
        if not arg:
            current = f"the next reply uses {self.template!r}" if self.template else "no template set"
            self.ui.print(escape(f"{current}; usage: /fill TEMPLATE (holes {{{{name:N}}}} or {{{{name:..N}}}}), /fill off"))
            return
        if arg.lower() == "off":
            self.template = None
            self.ui.print("template cleared")
            return
        from mlx_diffusiongemma.editing.template import parse

        arg = arg.replace("\\n", "\n")  # a chat line is one line: `\n` in the template is a new line
        try:
            parse(arg)
        except DiffusionGemmaError as e:
            self.failed = True
            print(f"error: {e}", file=sys.stderr)
            return
        self.template = arg
        self.ui.print("the next message is answered with this template")

    def cmd_edit(self, arg: str) -> None:
        s = self.session
        last = next((m["content"] for m in reversed(s.messages) if m["role"] == "assistant"), None)
        if not arg or last is None:
            self.ui.print("usage: /edit INSTRUCTION (rewrites the last reply; there must be one)")
            return
        index = max(i for i, m in enumerate(s.messages) if m["role"] == "assistant")
        context = s.messages[:index]
        history = s.messages + [{"role": "user", "content": arg}]
        from mlx_diffusiongemma.editing.edit import stream_edit

        self._canvas_reply(history, lambda **kw: stream_edit(s.model, s.tokenizer, last, arg, context=context, **kw))

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.ui.print("usage: /save FILE (.json for the messages, otherwise markdown)")
            return
        path = Path(arg).expanduser()
        messages = [_saveable(m) for m in self.session.messages]
        try:
            if path.suffix.lower() == ".json":
                path.write_text(json.dumps(messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            else:
                path.write_text(transcript_markdown(messages), encoding="utf-8")
        except OSError as e:
            print(f"error: could not write {path}: {e.strerror or e}", file=sys.stderr)
            return
        self.ui.print(f"saved {len(messages)} messages to {escape(str(path))}")


def _saveable(message: dict) -> dict:
    """A message with its images named (file paths), not their pixels."""
    if not message.get("images"):
        return message
    return {**message, "images": [getattr(i, "name", "image") for i in message["images"]]}


def transcript_markdown(messages) -> str:
    parts = []
    for m in messages:
        role, content = m.get("role", "?"), str(m.get("content", ""))
        if role == "assistant":
            from mlx_diffusiongemma.prompts.channels import split_thinking  # (mlx-lm: imported on use)

            thought, content = split_thinking(content)
            if thought:
                parts.append("## assistant (thinking)\n\n" + "\n".join("> " + l for l in thought.splitlines()))
        images = "".join(f"![image]({name})\n\n" for name in m.get("images") or ())
        parts.append(f"## {role}\n\n{images}{content.strip()}")
    return "\n\n".join(parts) + "\n"
