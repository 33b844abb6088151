"""Hostile inputs to the canvas commands, images and the converter (issue 30): decompression bombs
and formats Pillow would hand to Ghostscript, huge --max-tokens on `edit`, invalid UTF-8, FIFOs and
deeply nested JSON given as files, out-of-range delays, a symlink loop as the destination. Each
ends in one clear line (or ImageError) naming the file, before any model work."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import zlib

import pytest

from conftest import error_line, invoke
from mlx_diffusiongemma.prompts.images import image_from_url
from mlx_diffusiongemma.prompts.processor import ImageError, ImageProcessor

Image = pytest.importorskip("PIL.Image")


def bomb_png(width=30000, height=30000) -> bytes:
    """A small PNG whose header claims width x height pixels (900M: past Pillow's own limit)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\n%%EOF\n"


# -- 5, 12. images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000)])  # Pillow's error, Pillow's warning
def test_decompression_bombs_are_image_errors_naming_the_file(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(*size))
    with pytest.raises(ImageError, match="bomb.png: too many pixels"):
        ImageProcessor(16, 3, 280)(str(path))


def test_chat_image_bomb_is_one_line_and_the_session_goes_on(runner, tiny_checkpoint, tmp_path):
    _, folder = tiny_checkpoint
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    result = invoke(runner, ["chat", "--model", str(folder), "--max-tokens", "8", "--steps", "2"],
                    input=f"/image {tmp_path / 'bomb.png'}\n/image\n/quit\n")
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bomb.png: too many pixels" in errors[0], result.output
    assert "images for the next message: none" in result.output  # the session went on


@pytest.mark.parametrize("form", ["file", "data URL"])
def test_only_common_image_formats_are_decoded(tmp_path, form):
    if form == "file":
        (tmp_path / "x.eps").write_bytes(EPS)
        image, label = str(tmp_path / "x.eps"), "x.eps"
    else:
        image, label = image_from_url("data:image/eps;base64," + base64.b64encode(EPS).decode()), "image"
    with pytest.raises(ImageError, match=f"{label}: not an image of a supported format \\(PNG, JPEG"):
        ImageProcessor(16, 3, 280)(image)
    eps = Image.open(io.BytesIO(EPS))  # an image opened by the caller: its format is checked too
    with pytest.raises(ImageError, match="EPS images are not decoded here"):
        ImageProcessor(16, 3, 280)(eps)


def test_image_url_local_files_say_no_more_than_needed(tmp_path):
    (tmp_path / "a.png").write_bytes(bomb_png(2, 2))
    assert image_from_url(f"file://{tmp_path / 'a.png'}") == str(tmp_path / "a.png")
    messages = set()
    for url in (f"file://{tmp_path / 'missing.png'}", str(tmp_path), str(tmp_path / "nope" / "x.png")):
        with pytest.raises(ImageError) as info:
            image_from_url(url)
        messages.add(str(info.value))
    assert len(messages) == 1 and str(tmp_path) not in messages.pop()


# -- 6. the context is checked before canvases are built ---------------------------------------------------


def test_edit_with_a_huge_max_tokens_fails_before_building_canvases(monkeypatch):
    import mlx_diffusiongemma as dg
    from mlx_diffusiongemma.diffusion.canvas import CanvasState
    from mlx_diffusiongemma.editing.edit import edit

    model, tok = dg.load("demo")

    def built(*a, **k):
        raise AssertionError("a canvas was built before the context check")

    monkeypatch.setattr(CanvasState, "from_lists", built)
    with pytest.raises(dg.ContextLengthError, match="the model's context is"):
        edit(model, tok, "some text", "shorter", max_tokens=10**6)


def test_template_holes_are_bounded_in_total():
    from mlx_diffusiongemma.editing.template import TemplateError, parse

    with pytest.raises(TemplateError, match="the holes add up to 1228800 tokens"):
        parse("".join(f"{{{{h{i}:4096}}}}" for i in range(300)))


def test_cli_edit_max_tokens_beyond_the_context(runner, tmp_path):
    (tmp_path / "t.txt").write_text("some text\n")
    result = invoke(runner, ["edit", "--model", "demo", "--text", str(tmp_path / "t.txt"), "-i", "shorter",
                             "--max-tokens", "1000000000", "--json"])
    assert result.exit_code == 1 and "the model's context is" in error_line(result, last=True)


# -- 18, 19, 22. files given to fill / edit -------------------------------------------------------------


@pytest.mark.parametrize("verb", ["fill", "edit"])
def test_invalid_utf8_files_are_named(runner, tmp_path, verb):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 {{x:4}}\n")
    args = (["fill", "--model", "demo", "-p", "hi", "--template-file", str(path)] if verb == "fill"
            else ["edit", "--model", "demo", "--text", str(path), "-i", "fix"])
    result = invoke(runner, args)
    assert result.exit_code == 1
    assert f"{path} is not valid UTF-8 text (byte 0xe9 at offset 3)" in error_line(result, last=True)


def test_invalid_utf8_prompt_on_stdin(runner):
    result = invoke(runner, ["fill", "--model", "demo", "-p", "-", "-t", "{{x:4}}"], input=b"caf\xe9\n")
    assert result.exit_code == 1 and "not valid UTF-8" in error_line(result, last=True)


def test_deeply_nested_json_names_the_file(runner, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text("[" * 100_000)
    result = invoke(runner, ["fill", "--model", "demo", "-p", "hi", "--schema", str(schema)])
    assert result.exit_code == 1 and f"{schema}: the schema is JSON nested too deeply" in error_line(result, last=True)

    from test_finetune_cli import write_task

    data = write_task(tmp_path / "data", n_train=4, n_valid=2)
    with open(data / "train.jsonl", "a") as f:
        f.write('{"prompt": ' + "[" * 100_000 + "\n")
    result = invoke(runner, ["finetune", "--model", "demo-random", "--data", str(data), "--iters", "1",
                             "--adapter-path", str(tmp_path / "a")])
    assert result.exit_code == 1 and "train.jsonl:5: JSON nested too deeply" in error_line(result, last=True)


@pytest.mark.parametrize("verb", ["fill", "edit"])
def test_a_fifo_is_refused_not_read(runner, tmp_path, verb):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():  # were the FIFO opened for reading, end the read after a while (no hang)
        deadline = time.monotonic() + 10
        while not done.is_set() and time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.5)
                continue
            return

    threading.Thread(target=unblock, daemon=True).start()
    args = (["fill", "--model", "demo", "-p", "hi", "--template-file", str(fifo)] if verb == "fill"
            else ["edit", "--model", "demo", "--text", str(fifo), "-i", "fix"])
    try:
        result = invoke(runner, args)
    finally:
        done.set()
    assert result.exit_code == 1
    assert f"{fifo} is not a regular file (a pipe, socket or device)" in error_line(result, last=True)


# -- 21. sudoku's delay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1e9", "nan", "-1"])
def test_sudoku_delay_is_bounded(runner, value):
    result = invoke(runner, ["sudoku", "--delay", value])
    text = " ".join(result.output.replace("│", " ").split())  # typer's box wraps the message
    assert result.exit_code == 2 and "Invalid value for '--delay'" in text and "from 0 to 10" in text


# -- 23. convert into a symlink loop ---------------------------------------------------------------------


def test_convert_into_a_symlink_loop(runner, tiny_checkpoint, tmp_path):
    _, folder = tiny_checkpoint
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    result = invoke(runner, ["convert", str(folder), "-o", str(tmp_path / "a" / "out")])
    assert result.exit_code == 1
    assert "cannot resolve the destination" in error_line(result, last=True)
