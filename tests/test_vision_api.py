"""Images through the Python API, ChatSession, the CLI, the converter and the loader; bad images
give a clear error before any model work."""

from __future__ import annotations

import io
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from conftest import build_reference, save_checkpoint, tiny_text_config
from mlx_diffusiongemma import ChatSession, generate, load
from mlx_diffusiongemma.model import model as W
from mlx_diffusiongemma.demo.files import image_token_ids, tokenizer_vocab_size
from mlx_diffusiongemma.errors import DiffusionGemmaError
from mlx_diffusiongemma.prompts.processor import ImageError, ImageProcessor

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
IMG = image_token_ids()["image_token_id"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    built = build_reference(tiny_text_config(use_bidirectional_attention="vision", vocab_size=tokenizer_vocab_size(True)), canvas_length=8, seed=5,
                            vision=VISION)
    path = save_checkpoint(built, tmp_path_factory.mktemp("vapi") / "ckpt", image_tokens=True)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": 70}}))
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (50, 25, 3), dtype=np.uint8))
    a.save(d / "a.png")
    b.save(d / "b.jpg", quality=90)
    return d


class Untouchable:
    """Stands in for model work: any call fails the test."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        def boom(*a, **k):
            raise AssertionError("model work started before the images were checked")

        self.saved = (self.model.extend, self.model.encode_image)
        self.model.extend = self.model.encode_image = boom
        return self

    def __exit__(self, *exc):
        del self.model.extend, self.model.encode_image


def test_load_has_vision_and_processor(loaded):
    from mlx_diffusiongemma.prompts.images import image_processor

    model, _ = loaded
    processor = image_processor(model)  # the vision config's sizes, the checkpoint's budget
    assert model.has_vision and model.args.image_soft_tokens == 70
    assert processor.max_soft_tokens == 70 and processor.patch_size == 4
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert any(k.startswith("model.encoder.vision_tower.") for k in names)


def test_text_only_load(folder):
    model, _ = load(folder, text_only=True)
    assert not model.has_vision
    assert not any("vision" in k for k, _ in tree_flatten(model.parameters()))
    with pytest.raises(ImageError, match="no vision tower"):
        generate(model, load(folder, text_only=True)[1], "hi", images=[np.zeros((8, 8, 3), np.uint8)],
                 max_tokens=8)


def test_generate_with_images(loaded, pictures):
    model, tok = loaded
    r1 = generate(model, tok, "what is this?", images=[pictures / "a.png"], max_tokens=8, seed=0,
                  max_denoising_steps=3)
    # prompt: the template around <boi> + 30 image tokens (30x44 -> 36x48 pixels -> 9x12 patches -> 3x4) + <eoi>
    assert r1.prompt_tokens > 12
    r2 = generate(model, tok, "what is this?", images=[pictures / "b.jpg"], max_tokens=8, seed=0,
                  max_denoising_steps=3)
    r0 = generate(model, tok, "what is this?", max_tokens=8, seed=0, max_denoising_steps=3)
    assert r1.prompt_tokens != r0.prompt_tokens
    # Other image, other reply (same seed).
    assert len({tuple(r.tokens) for r in (r0, r1, r2)}) == 3
    # An image content part in a message is the same as images=[...].
    with open(pictures / "a.png", "rb") as f:
        data = f.read()
    messages = [{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "what is this?"}]}]
    r3 = generate(model, tok, messages, max_tokens=8, seed=0, max_denoising_steps=3)
    assert r3.tokens == r1.tokens
    import base64

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is this?"}]}]
    assert generate(model, tok, messages, max_tokens=8, seed=0, max_denoising_steps=3).tokens == r1.tokens
    messages[0]["content"][0]["image_url"]["url"] = "https://example.com/cat.png"
    with pytest.raises(ImageError, match="remote images are not fetched"):
        generate(model, tok, messages, max_tokens=8)


def test_chat_session_with_images(loaded, pictures):
    model, tok = loaded
    session = ChatSession(model, tok, max_tokens=8, seed=0, max_denoising_steps=2)
    first = session.send("look", images=[pictures / "a.png"])
    assert first is not None and session.cached_images and len(session.cached_images) == 1
    cached = len(session.cached_ids)
    second = session.send("and now?")
    # The second turn reused the cache: it encoded only the new part.
    assert second.encoded_tokens < len(session.cached_ids) - cached + 40
    assert session.messages[0]["images"][0].name.endswith("a.png")
    third = session.send("and this one?", images=[pictures / "b.jpg"])
    assert len(session.cached_images) == 2
    # The same conversation replayed in one go gives the same third reply (the cache held the
    # images' features as a fresh prefill computes them).
    fresh = ChatSession(model, tok, max_tokens=8, seed=0, max_denoising_steps=2)
    fresh.messages = [dict(m) for m in session.messages[:4]]
    assert fresh.send("and this one?", images=[pictures / "b.jpg"]).tokens == third.tokens


# ---------------------------------------------------------------------------------------------
# bad images: a clear ImageError, before any model work


def _bad_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    huge = io.BytesIO()
    Image.new("1", (9000, 8000)).save(huge, format="PNG")  # 72 Mpx, a few kB on disk
    (tmp_path / "huge.png").write_bytes(huge.getvalue())
    wide = io.BytesIO()
    Image.new("F", (4, 4)).save(wide, format="TIFF")  # 32-bit float pixels
    (tmp_path / "float.tif").write_bytes(wide.getvalue())
    (tmp_path / "folder").mkdir()
    return {
        "not an image": (tmp_path / "notes.txt", "not an image"),
        "empty file": (tmp_path / "empty.png", "empty file"),
        "truncated": (tmp_path / "cut.png", "truncated"),
        "huge": (tmp_path / "huge.png", "over the limit"),
        "unsupported mode": (tmp_path / "float.tif", "unsupported image mode"),
        "missing": (tmp_path / "nope.png", "no such file"),
        "a folder": (tmp_path / "folder", "not a file"),
        "zero-size array": (np.zeros((0, 5, 3), np.uint8), "zero-size"),
        "float array": (np.zeros((5, 5, 3), np.float32), "uint8"),
        "bad bytes": (b"\x89PNG\r\n\x1a\nxxxx", "image"),
        "wrong type": (12345, "unsupported image type"),
    }


def test_bad_images_fail_before_model_work(loaded, tmp_path):
    model, tok = loaded
    for label, (bad, message) in _bad_inputs(tmp_path).items():
        with Untouchable(model), pytest.raises(ImageError, match=message):
            generate(model, tok, "hi", images=[np.zeros((8, 8, 3), np.uint8) + 7, bad], max_tokens=8)
        session = ChatSession(model, tok, max_tokens=8)
        with Untouchable(model), pytest.raises(ImageError, match=message):
            session.send("hi", images=[bad])
        assert session.messages == [] and session.cache is None, label
    assert issubclass(ImageError, DiffusionGemmaError)


def test_tiny_and_extreme_images_process():
    p = ImageProcessor(16, 3, 280)
    assert p(np.zeros((1, 1, 3), np.uint8)).num_soft_tokens > 0  # upscaled
    assert p(np.zeros((3, 2000), np.uint8)).grid[0] == 3  # one pooled row
    with pytest.raises(ImageError):
        ImageProcessor(16, 3, 280, max_pixels=100)(np.zeros((20, 20, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# the CLI


def _cli(args, input=None):
    from mlx_diffusiongemma.cli.app import app

    return CliRunner().invoke(app, args, input=input)


def test_cli_generate_with_image(folder, pictures):
    res = _cli(["generate", "--model", str(folder), "-p", "hi", "--image", str(pictures / "a.png"),
                "--max-tokens", "8", "--steps", "2", "--seed", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["prompt_tokens"] > 30
    res = _cli(["generate", "--model", str(folder), "-p", "hi", "--image", str(pictures / "nope.png")])
    assert res.exit_code == 1 and "error:" in res.output and "no such file" in res.output
    res = _cli(["generate", "--model", str(folder), "-p", "hi", "--image", str(folder / "config.json")])
    assert res.exit_code == 1 and "not an image" in res.output and "Traceback" not in res.output
    res = _cli(["generate", "--model", str(folder), "-p", "hi", "--text-only", "--image", str(pictures / "a.png")])
    assert res.exit_code == 1 and "--text-only" in res.output


def test_cli_chat_image_command(folder, pictures):
    lines = [f"/image {pictures / 'a.png'}", "/image", "what is it?", f"/image {pictures / 'zzz.png'}",
             "/quit"]
    res = _cli(["chat", "--model", str(folder), "--max-tokens", "8", "--steps", "2", "--seed", "0"],
               input="\n".join(lines) + "\n")
    assert res.exit_code == 0, res.output
    assert "attached" in res.output and "a.png" in res.output and "no such file" in res.output


# ---------------------------------------------------------------------------------------------
# converter: the vision tower is kept (bfloat16), or left out with text_only


def test_convert_keeps_vision(folder, tmp_path):
    from mlx_diffusiongemma.convert import convert

    report = convert(folder, tmp_path / "q", recipe="mixed-4bit")
    assert report.vision_tensors_written > 0 and report.vision_tensors_skipped == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "vision_config" in config
    model, tok = load(tmp_path / "q")
    assert model.has_vision
    vt = model.model.encoder.vision_tower
    assert vt.encoder.layers[0].self_attn.q_proj.linear.weight.dtype == mx.bfloat16  # not quantized
    assert all(v is False for k, v in config["quantization"].items() if W.is_vision_key(k + "."))
    r = generate(model, tok, "hi", images=[np.zeros((20, 20, 3), np.uint8)], max_tokens=8, max_denoising_steps=2)
    assert r.prompt_tokens > 4

    text = convert(folder, tmp_path / "t", recipe="bf16", text_only=True)
    assert text.vision_tensors_written == 0 and text.vision_tensors_skipped > 0
    assert "vision_config" not in json.loads((tmp_path / "t" / "config.json").read_text())
    model, _ = load(tmp_path / "t")
    assert not model.has_vision
