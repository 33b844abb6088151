"""Tiny DiffusionGemma checkpoints built with the reference classes (never downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16)


def tiny_text_config(**overrides) -> dict:
    from mlx_diffusiongemma.demo.files import tokenizer_vocab_size

    cfg = dict(
        vocab_size=tokenizer_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, sliding_window=8, num_experts=4, top_k_experts=2,
        moe_intermediate_size=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
        initializer_range=0.08,
    )
    cfg.update(overrides)
    return cfg


def build_reference(text: dict, canvas_length: int = 8, seed: int = 0, vision: bool | dict = True):
    """A reference DiffusionGemmaForBlockDiffusion with randomised norms, scales and layer scalars
    (the defaults are ones, which would hide mix-ups between them)."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from mlx_diffusiongemma.demo.files import image_token_ids

    # A vision config given as a dict (the image tests) comes with the tokenizer's image token ids.
    images = image_token_ids() if isinstance(vision, dict) else {}
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=(vision if isinstance(vision, dict) else TINY_VISION) if vision else None,
                               canvas_length=canvas_length, **images)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("scale"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        # Sharper logits (|logits| of several units) so that parity checks have signal.
        model.model.decoder.embed_tokens.weight.mul_(4.0)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
        for name, p in model.named_parameters():
            if images and name.endswith("position_embedding_table"):  # ones: positions would not matter
                p.normal_()
    return model


def sharpen(model) -> None:
    """Make a random reference model confident and stable, so the adaptive stop fires: shrink
    what the layers and self-conditioning add to the residual (their post-norm weights) and widen
    the embedding, so each output is close to a confident copy of the canvas token it sees."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
                              "self_conditioning.down_proj.weight")):
                p.mul_(0.1)
        model.model.decoder.embed_tokens.weight.mul_(2.0)


def save_checkpoint(model, folder: Path, *, legacy_config: bool = False, zero_pad_keys: bool = False,
                    eos_ids=None, max_shard_size=None, dtype=None, image_tokens: bool = False) -> Path:
    """save_pretrained + our tiny byte-level tokenizer with the Gemma 4 chat template.

    legacy_config rewrites config.json the way the released checkpoint has it (global_head_dim /
    num_global_key_value_heads, no per_layer_config); zero_pad_keys writes per_layer_config keys
    as zero-padded strings.
    """
    import torch

    from mlx_diffusiongemma.demo.files import TURN_END, build_tokenizer

    folder = Path(folder)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if dtype is not None:
        model.to(torch.float32)
    specials = build_tokenizer(folder, image_tokens=image_tokens)
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    if legacy_config:
        per = text.pop("per_layer_config")
        full = next(iter(per.values()))
        text["global_head_dim"] = full["head_dim"]
        text["num_global_key_value_heads"] = full.get("num_key_value_heads", text["num_key_value_heads"])
        text["use_bidirectional_attention"] = "vision"
    elif zero_pad_keys:
        text["per_layer_config"] = {f"{int(k):02d}": v for k, v in text["per_layer_config"].items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = {
        "max_denoising_steps": 12, "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"}, "t_min": 0.4, "t_max": 0.8,
        "stability_threshold": 1, "confidence_threshold": 0.005,
        "eos_token_id": eos_ids or [specials["<eos>"], specials[TURN_END]], "pad_token_id": 0,
    }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(reference model, folder) for the default tiny config, float32 on disk."""
    model = build_reference(tiny_text_config())
    folder = save_checkpoint(model, tmp_path_factory.mktemp("tiny") / "ckpt")
    return model, folder


# -- the command line, as a user runs it ----------------------------------------------------------


@pytest.fixture(scope="session")
def home(tmp_path_factory):
    """MLX_DIFFUSIONGEMMA_HOME with the random demo model built (`--model demo-random` finds it)."""
    from mlx_diffusiongemma.demo.random import DEMO_VERSION, ensure_demo

    root = tmp_path_factory.mktemp("dgemma-home")
    ensure_demo(root / f"demo-v{DEMO_VERSION}")
    return root


@pytest.fixture
def runner(home, monkeypatch):
    """typer's CliRunner, offline, with `home` as the demo models' home."""
    from typer.testing import CliRunner

    monkeypatch.setenv("MLX_DIFFUSIONGEMMA_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return CliRunner()


def invoke(runner, args, input=None):
    """`dgemma ARGS` in the runner (stdin from `input`)."""
    from mlx_diffusiongemma.cli.app import app

    return runner.invoke(app, args, input=input, prog_name="dgemma")


def error_line(result, *, last: bool = False) -> str:
    """The `error: ...` line on stderr, with no traceback: the only line, first (no blank line
    before it); with `last`, the last line (after a command's own progress output)."""
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if last:
        assert lines and lines[-1].startswith("error: "), result.output
        return lines[-1]
    assert result.stderr.startswith("error: "), repr(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- checkpoints a test may damage -----------------------------------------------------------------


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    _, folder = tiny_checkpoint
    return Path(shutil.copytree(folder, tmp_path / "ckpt"))


def edit_config(folder: Path, edit) -> None:
    """Apply `edit` to the config.json of `folder`."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))
