"""Hostile and broken checkpoints (issue 14): each bad input gives a `CheckpointError` (or a
ValueError for a bad argument) that names the problem, quickly, without reading outside the
folder, building an oversized model or hanging. Small crafted files in tmp folders."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import build_reference, edit_config, save_checkpoint, tiny_text_config
from mlx_diffusiongemma.checkpoint.config import load_generation_defaults
from mlx_diffusiongemma.model.args import parse_model_args
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.api import load
from mlx_diffusiongemma.checkpoint.loading import as_dtype


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path, **kw)
    return str(info.value)


# -- 1. the tokenizer ------------------------------------------------------------------------------


def test_missing_tokenizer_is_refused(ckpt):
    for p in ckpt.glob("tokenizer*.json"):
        p.unlink()
    msg = _error(ckpt)
    assert "no tokenizer" in msg and "tokenizer.json" in msg


# -- 4. config.json: bounds, and consistency with the weight files ---------------------------------


@pytest.mark.parametrize("field, value, words", [
    ("num_hidden_layers", 1_000_000, "num_hidden_layers is 1000000"),
    ("num_hidden_layers", 0, "num_hidden_layers is 0"),
    ("hidden_size", -64, "hidden_size is -64"),
    ("vocab_size", 10**12, "vocab_size is 1000000000000"),
    ("vocab_size", "many", "vocab_size must be an integer"),
    ("head_dim", 15, "even head_dim"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number"),
    ("sliding_window", True, "sliding_window must be an integer"),
])
def test_config_values_out_of_bounds(ckpt, field, value, words):
    def edit(c):
        c["text_config"][field] = value
        if field == "num_hidden_layers":
            c["text_config"].pop("layer_types", None)
            c["text_config"].pop("per_layer_config", None)
    edit_config(ckpt, edit)
    t0 = time.perf_counter()
    msg = _error(ckpt)
    assert words in msg, msg
    assert time.perf_counter() - t0 < 10  # refused before building anything large


@pytest.mark.parametrize("value", [-1, 0, 10**9, "x"])
def test_bad_canvas_length(ckpt, value):
    edit_config(ckpt, lambda c: c.update(canvas_length=value))
    assert "canvas_length" in _error(ckpt)


def test_layer_count_must_match_the_weights_before_the_model_is_built(ckpt, monkeypatch):
    import mlx_diffusiongemma.checkpoint.loading as L

    def edit(c):
        c["text_config"]["num_hidden_layers"] = 400  # within bounds, far beyond the 4 on disk
        c["text_config"].pop("layer_types", None)
        c["text_config"].pop("per_layer_config", None)
    edit_config(ckpt, edit)
    built = []
    monkeypatch.setattr(L, "Model", lambda *a: built.append(a))
    msg = _error(ckpt)
    assert "num_hidden_layers = 400" in msg and "hold 4 layers" in msg
    assert not built


def test_vocab_must_match_the_embedding(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(vocab_size=5000))
    msg = _error(ckpt)
    assert "vocab_size = 5000" in msg and "embed_tokens" in msg
    edit_config(ckpt, lambda c: c["text_config"].update(vocab_size=50))  # smaller: a shape error
    msg = _error(ckpt)
    assert "embed_tokens" in msg and "(50, 64)" in msg


def test_null_final_logit_softcapping_is_refused(ckpt):
    # The reference divides by it unconditionally: null cannot run there either.
    edit_config(ckpt, lambda c: c["text_config"].update(final_logit_softcapping=None))
    assert "final_logit_softcapping is null" in _error(ckpt)


def test_bidirectional_attention_all_is_refused(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(use_bidirectional_attention="all"))
    msg = _error(ckpt)
    assert "use_bidirectional_attention is 'all'" in msg and "non-causal encoder" in msg
    edit_config(ckpt, lambda c: c["text_config"].update(use_bidirectional_attention="sometimes"))
    assert "use_bidirectional_attention must be" in _error(ckpt)


def test_bidirectional_attention_vision_or_absent_loads(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(use_bidirectional_attention="vision"))
    load(ckpt)


# -- 4. non-regular files and the chat template -----------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
def test_fifo_instead_of_a_file_is_refused(ckpt, name):
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    msg = _error(ckpt)  # would block forever if the FIFO were opened
    assert name in msg and "not a regular file" in msg


def test_hanging_chat_template_is_stopped(ckpt, monkeypatch):
    import importlib

    G = importlib.import_module("mlx_diffusiongemma.api")  # the module, not the function
    R = importlib.import_module("mlx_diffusiongemma.prompts.render")

    path = ckpt / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = ("{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}"
                            "{% endfor %}{% endfor %}{% endfor %}")
    path.write_text(json.dumps(cfg))
    model, tok = load(ckpt)
    monkeypatch.setattr(R, "TEMPLATE_TIME_LIMIT", 0.5)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="chat template"):
        G.generate(model, tok, "hi", max_tokens=4)
    assert time.perf_counter() - t0 < 10
    # The tracer is put back: rendering a good template afterwards still works.
    import sys
    assert sys.gettrace() is None or sys.gettrace().__name__ != "on_call"


def test_template_limit_does_not_change_the_rendering(tiny_checkpoint):
    from mlx_diffusiongemma.prompts.render import render_messages

    _, tok = load(tiny_checkpoint[1])
    messages = [{"role": "user", "content": "Hello there"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, enable_thinking=False)
    assert render_messages(tok, messages) == list(expected)


# -- 5. the index may only name files inside the folder ---------------------------------------------


@pytest.mark.parametrize("name", ["/etc/passwd.safetensors", "../outside.safetensors",
                                  "sub/../../outside.safetensors", "C:\\x.safetensors", "config.json", 7])
def test_index_shard_names_outside_the_folder_are_refused(ckpt, tmp_path, name):
    # A real safetensors file outside the folder: the loader must not read it.
    shutil.copy(ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.decoder.norm.weight": name}}))
    msg = _error(ckpt)
    assert "refusing to read it" in msg and repr(name) in msg


def test_index_weight_map_not_an_object(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    assert "weight_map must be an object" in _error(ckpt)


# -- 8. safetensors headers of the wrong shape -------------------------------------------------------


def _write_header(path: Path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


@pytest.mark.parametrize("header, words", [
    ([1, 2, 3], "not a JSON object"),
    ({"a": {"dtype": "F32", "shape": [4]}}, "entry 'a' lacks"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "entry 'a' lacks"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "entry 'a' lacks"),
    ({"a": "tensor"}, "entry 'a' lacks"),
])
def test_malformed_safetensors_header(ckpt, header, words):
    _write_header(ckpt / "model.safetensors", header)
    msg = _error(ckpt)
    assert "model.safetensors" in msg and words in msg


# -- 10. dtype names ----------------------------------------------------------------------------------


def test_dtype_given_as_a_string(tiny_checkpoint):
    model, _ = load(tiny_checkpoint[1], dtype="float32")
    assert model.model.decoder.embed_tokens.weight.dtype == mx.float32
    model, _ = load(tiny_checkpoint[1], dtype="bfloat16")
    assert model.model.decoder.embed_tokens.weight.dtype == mx.bfloat16
    assert as_dtype("mx.float16") == mx.float16 and as_dtype(mx.float32) == mx.float32


@pytest.mark.parametrize("bad", ["float64", "int8", 32])
def test_bad_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        as_dtype(bad)


# -- review: generation_config max_new_tokens and mlx-vlm's embedded block ---------------------------


def test_max_new_tokens_is_the_api_default(ckpt):
    import mlx_diffusiongemma as dg

    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["max_new_tokens"] = 5
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    model, tok = load(ckpt)
    assert model.generation.max_new_tokens == 5
    result = dg.generate(model, tok, "hi", seed=0, max_denoising_steps=2)
    assert len(result.tokens) <= 5
    assert len(dg.ChatSession(model, tok, seed=0, max_denoising_steps=2).send("hi").tokens) <= 5
    assert dg.ChatSession(model, tok, max_tokens=9).options.max_tokens == 9


def test_default_max_tokens_without_max_new_tokens_is_256(tiny_checkpoint):
    model, tok = load(tiny_checkpoint[1])
    assert model.generation.max_new_tokens == 256


def test_embedded_generation_config_block_is_read_without_the_file(tmp_path):
    config = {"generation_config": {"max_denoising_steps": 20, "t_min": 0.3, "t_max": None,
                                    "max_new_tokens": 64, "sampler_config": None}}
    g = load_generation_defaults(tmp_path, config)
    assert (g.max_denoising_steps, g.t_min, g.t_max, g.max_new_tokens, g.entropy_bound) == (20, 0.3, 0.8, 64, 0.1)
    # The file, when present, wins over the embedded block.
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_denoising_steps": 7}))
    assert load_generation_defaults(tmp_path, config).max_denoising_steps == 7


def test_mlxvlm_fixture_embedded_block_with_nulls_gives_the_defaults():
    folder = Path(__file__).parent / "fixtures" / "mlxvlm_tiny" / "mlxvlm-4bit"
    config = json.loads((folder / "config.json").read_text())
    g = load_generation_defaults(folder / "no-such-subfolder", config)
    assert (g.max_denoising_steps, g.t_min, g.t_max) == (48, 0.4, 0.8)


@pytest.mark.parametrize("gen, words", [
    ({"max_new_tokens": 0}, "max_new_tokens is 0"),
    ({"t_max": float("inf")}, "t_max must be a finite number"),
    ({"max_denoising_steps": "many"}, "max_denoising_steps must be an integer"),
])
def test_bad_generation_config_values_name_the_file(tmp_path, gen, words):
    (tmp_path / "generation_config.json").write_text(json.dumps(gen).replace("Infinity", "1e999"))
    with pytest.raises(CheckpointError) as info:
        load_generation_defaults(tmp_path)
    assert words in str(info.value) and "generation_config.json" in str(info.value)


# -- review: attention_bias, implemented as in the reference ----------------------------------------


def test_attention_bias_parity_with_the_reference(tmp_path):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    from mlx_diffusiongemma.checkpoint.loading import load_model

    ref = build_reference(tiny_text_config(attention_bias=True), vision=False)
    with torch.no_grad():
        biases = [(n, p) for n, p in ref.named_parameters() if n.endswith("_proj.bias") and "self_attn" in n]
        assert biases, "the reference built no attention biases"
        for _, p in biases:
            p.copy_(0.5 * torch.randn_like(p))
    folder = save_checkpoint(ref, tmp_path / "ckpt")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = load_model(folder, dtype=mx.float32)
    assert parse_model_args(json.loads((folder / "config.json").read_text())).text.attention_bias

    g = torch.Generator().manual_seed(0)
    vocab, c = ref.config.text_config.vocab_size, ref.config.canvas_length
    prompt = torch.randint(0, vocab, (1, 11), generator=g)
    canvas = torch.randint(0, vocab, (1, c), generator=g)
    cache = DynamicCache(config=ref.config.text_config)
    with torch.no_grad():
        ref.model.encoder(input_ids=prompt, past_key_values=cache)
        expected = ref(decoder_input_ids=canvas, past_key_values=cache).logits.numpy()
    got = np.array(ours.denoise(mx.array(canvas.numpy()), ours.prefill(mx.array(prompt.numpy()))))
    assert np.abs(got - expected).max() <= 1e-4
    # The biases matter: without them the logits differ.
    for layer in ours.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if hasattr(layer.self_attn, proj):
                getattr(layer.self_attn, proj).bias = mx.zeros_like(getattr(layer.self_attn, proj).bias)
    unbiased = np.array(ours.denoise(mx.array(canvas.numpy()), ours.prefill(mx.array(prompt.numpy()))))
    assert np.abs(unbiased - expected).max() > 1e-2


def test_attention_bias_must_be_a_boolean(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(attention_bias="yes"))
    assert "attention_bias must be true or false" in _error(ckpt)
