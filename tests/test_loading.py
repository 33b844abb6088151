"""Loading: every way a checkpoint can be wrong gives a `CheckpointError` naming the problem;
a good checkpoint gives (model, tokenizer) with the sampler defaults and the Gemma 4 chat format;
config.json is resolved the way the reference `transformers` code resolves it."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import build_reference, edit_config, save_checkpoint, tiny_text_config
from mlx_diffusiongemma.model import model as W
from mlx_diffusiongemma.checkpoint.config import load_generation_defaults
from mlx_diffusiongemma.model.args import SAMPLER_DEFAULTS, parse_model_args, parse_text_args
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.api import load
from mlx_diffusiongemma.checkpoint.loading import load_model

# ---------------------------------------------------------------------------------------------
# helpers


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# bad folders and configs


def test_missing_folder(tmp_path):
    missing = tmp_path / "does-not-exist"
    msg = _error(missing)
    assert str(missing) in msg and "no such folder" in msg


def test_file_instead_of_folder(ckpt):
    msg = _error(ckpt / "config.json")
    assert "is a file" in msg and "folder" in msg


def test_folder_without_config(ckpt):
    (ckpt / "config.json").unlink()
    msg = _error(ckpt)
    assert "no config.json" in msg and str(ckpt) in msg


def test_config_of_another_model_type(ckpt):
    edit_config(ckpt, lambda c: c.update(model_type="gemma3"))
    msg = _error(ckpt)
    assert "'gemma3'" in msg and "diffusion_gemma" in msg and "config.json" in msg


def test_text_config_of_another_model_type(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(model_type="gemma3_text"))
    msg = _error(ckpt)
    assert "text_config" in msg and "'gemma3_text'" in msg and "diffusion_gemma_text" in msg


def test_config_without_text_config(ckpt):
    edit_config(ckpt, lambda c: c.pop("text_config"))
    assert "no text_config" in _error(ckpt)


def test_invalid_json_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "diffusion_gemma", ')
    msg = _error(ckpt)
    assert "config.json" in msg and "not valid JSON" in msg


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    msg = _error(ckpt)
    assert "config.json" in msg and "JSON object" in msg


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    msg = _error(ckpt)
    assert "no *.safetensors" in msg


# ---------------------------------------------------------------------------------------------
# bad tensors


def test_missing_tensor(ckpt):
    name = "model.decoder.layers.1.self_attn.q_norm.weight"
    _edit_tensors(ckpt, lambda t: t.pop(name))
    msg = _error(ckpt)
    assert "missing tensor" in msg and repr(name) in msg


def test_missing_expert_tensor_named_by_checkpoint_path(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.decoder.layers.2.experts.down_proj"))
    msg = _error(ckpt)
    assert "missing tensor" in msg and "model.decoder.layers.2.experts.down_proj" in msg


def test_unexpected_tensor(ckpt):
    name = "model.decoder.layers.0.foo"
    _edit_tensors(ckpt, lambda t: t.update({name: np.zeros((3,), np.float32)}))
    msg = _error(ckpt)
    assert "unexpected tensor" in msg and repr(name) in msg


def test_wrong_shape_tensor(ckpt):
    name = "model.decoder.layers.0.mlp.gate_proj.weight"  # (128, 64) in the tiny config
    _edit_tensors(ckpt, lambda t: t.update({name: np.zeros((64, 64), np.float32)}))
    msg = _error(ckpt)
    assert repr(name) in msg and "(64, 64)" in msg and "(128, 64)" in msg


def test_config_disagrees_with_weights(ckpt):
    edit_config(ckpt, lambda c: c["text_config"].update(hidden_size=32))
    msg = _error(ckpt)
    assert "has shape" in msg and "config.json implies" in msg


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _error(ckpt)
    assert "model.safetensors" in msg and "truncated" in msg


def test_truncated_safetensors_header(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    msg = _error(ckpt)
    assert "model.safetensors" in msg and "truncated" in msg


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 64)
    msg = _error(ckpt)
    assert "model.safetensors" in msg and "safetensors" in msg


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    ref, _ = tiny_checkpoint
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("sharded") / "ckpt", max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    assert (folder / "model.safetensors.index.json").exists()
    return folder


def test_sharded_checkpoint_loads(sharded_checkpoint, tiny_checkpoint):
    model, _ = load(sharded_checkpoint)
    reference, _ = load(tiny_checkpoint[1])
    a = np.array(model.model.decoder.embed_tokens.weight)
    b = np.array(reference.model.decoder.embed_tokens.weight)
    np.testing.assert_array_equal(a, b)


def test_sharded_checkpoint_missing_shard(sharded_checkpoint, tmp_path):
    folder = Path(shutil.copytree(sharded_checkpoint, tmp_path / "ckpt"))
    shards = sorted(folder.glob("*.safetensors"))
    shards[1].unlink()
    msg = _error(folder)
    assert "missing" in msg and "incomplete" in msg and shards[1].name in msg


def test_repo_id_not_cached_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads these at import time: patch the values it uses too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    attempts = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)  # so that "owner/name" is not a local folder by accident
    msg = _error("nobody-here/diffusiongemma-missing")
    assert attempts == []
    assert "nobody-here/diffusiongemma-missing" in msg
    assert "cache" in msg and "--model demo" in msg and "local folder" in msg


def test_non_repo_id_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _error("a/b/c")
    assert "no such folder" in msg and "owner/name" in msg


# ---------------------------------------------------------------------------------------------
# a good checkpoint


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    _, folder = tiny_checkpoint
    model, tokenizer = load(folder)
    return folder, model, tokenizer


def test_load_returns_model_and_wrapped_tokenizer(loaded):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    folder, model, tokenizer = loaded
    assert isinstance(tokenizer, TokenizerWrapper)
    assert tokenizer.detokenizer is not None
    gen = json.loads((folder / "generation_config.json").read_text())
    assert set(tokenizer.eos_token_ids) == set(gen["eos_token_id"])
    assert model.source == folder
    # The detokenizer streams text back.
    ids = tokenizer.encode("héllo, world", add_special_tokens=False)
    detok = tokenizer.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == "héllo, world"


def test_generation_defaults_from_generation_config(loaded):
    folder, model, _ = loaded
    gen = json.loads((folder / "generation_config.json").read_text())
    g = model.generation
    assert g.max_denoising_steps == gen["max_denoising_steps"]
    assert g.entropy_bound == gen["sampler_config"]["entropy_bound"]
    assert g.t_min == gen["t_min"] and g.t_max == gen["t_max"]
    assert g.stability_threshold == gen["stability_threshold"]
    assert g.confidence_threshold == gen["confidence_threshold"]
    assert g.eos_token_ids == tuple(gen["eos_token_id"])
    assert g.pad_token_id == gen["pad_token_id"]


def test_chat_template_gemma4_format(loaded):
    _, _, tokenizer = loaded
    messages = [{"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    assert text == "<bos><|turn>user\nHello<turn|>\n<|turn>model\n"


def test_chat_template_multi_turn_with_system(loaded):
    _, _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    assert text == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n"
    )


def test_chat_template_thinking(loaded):
    _, _, tokenizer = loaded
    messages = [{"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=True)
    assert text.startswith("<bos><|turn>system\n<|think|>")
    assert text.endswith("<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n")


def test_chat_template_tokenizes_specials_as_single_tokens(loaded):
    _, _, tokenizer = loaded
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                        enable_thinking=False)
    vocab = tokenizer.get_vocab()
    assert ids[:2] == [vocab["<bos>"], vocab["<|turn>"]]
    assert vocab["<turn|>"] in ids


# ---------------------------------------------------------------------------------------------
# vision tensors and key mapping


def test_vision_tensors_are_loaded_or_skipped_text_only(loaded):
    from mlx.utils import tree_flatten

    folder, model, _ = loaded
    on_disk = load_file(folder / "model.safetensors")
    vision = {k for k in on_disk if W.is_vision_key(k)}
    assert vision  # the tiny checkpoint has a vision tower
    assert model.args.has_vision and model.has_vision
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert {k for k in names if "vision" in k} == vision
    text_only, _ = load_model(folder, text_only=True)
    assert not text_only.has_vision
    assert not any("vision" in k for k, _ in tree_flatten(text_only.parameters()))


@pytest.mark.parametrize("key", ["model.encoder.vision_tower.x", "model.encoder.embed_vision.x"])
def test_map_key_keeps_vision_unless_text_only(key):
    assert W.map_key(key) == key and W.map_key(key, vision=False) is None


@pytest.mark.parametrize("key", [
    "lm_head.weight",
    "model.encoder.language_model.layers.0.self_attn.q_proj.weight",
    "model.encoder.language_model.embed_tokens.weight",
])
def test_map_key_drops(key):
    assert W.map_key(key) is None


@pytest.mark.parametrize("key,expected", [
    ("model.decoder.layers.0.experts.gate_up_proj", "model.decoder.layers.0.experts.gate_up_proj.weight"),
    ("model.decoder.layers.7.experts.down_proj", "model.decoder.layers.7.experts.down_proj.weight"),
    ("model.decoder.layers.0.experts.gate_up_proj.weight", "model.decoder.layers.0.experts.gate_up_proj.weight"),
    ("model.decoder.layers.0.experts.gate_up_proj.scales", "model.decoder.layers.0.experts.gate_up_proj.scales"),
    ("model.encoder.language_model.layers.3.layer_scalar", "model.encoder.language_model.layers.3.layer_scalar"),
    ("model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.self_attn.q_proj.weight"),
])
def test_map_key_maps(key, expected):
    assert W.map_key(key) == expected


# ---------------------------------------------------------------------------------------------
# config parsing


def _base_text(**kw) -> dict:
    text = dict(
        model_type="diffusion_gemma_text", vocab_size=300, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
        head_dim=16, num_experts=4, top_k_experts=2,
        layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
    )
    text.update(kw)
    return text


def _resolved(text: dict) -> list[tuple[int, int]]:
    a = parse_text_args(text)
    return list(zip(a.head_dims, a.kv_heads))


def _reference_resolved(text: dict) -> list[tuple[int, int]]:
    from transformers import DiffusionGemmaTextConfig

    cfg = DiffusionGemmaTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    n = cfg.num_hidden_layers
    return [(cfg.per_layer_config[i].head_dim, cfg.per_layer_config[i].num_key_value_heads) for i in range(n)]


_PER_LAYER = {2: {"head_dim": 32, "num_key_value_heads": 2}, 5: {"head_dim": 64, "num_key_value_heads": 1}}
_EXPECTED = [(16, 4), (16, 4), (32, 2), (16, 4), (16, 4), (64, 1)]


@pytest.mark.parametrize("style", ["int", "str", "zero_pad"])
def test_per_layer_config_key_styles(style):
    keys = {"int": lambda i: i, "str": str, "zero_pad": lambda i: f"{i:02d}"}[style]
    text = _base_text(per_layer_config={keys(i): v for i, v in _PER_LAYER.items()})
    assert _resolved(text) == _EXPECTED
    assert _reference_resolved(text) == _EXPECTED


def test_per_layer_config_bad_key():
    with pytest.raises(CheckpointError, match="per_layer_config key 'full'"):
        parse_text_args(_base_text(per_layer_config={"full": {"head_dim": 32}}))


def test_legacy_fields():
    text = _base_text(head_dim=256, num_key_value_heads=8, num_attention_heads=16,
                      global_head_dim=512, num_global_key_value_heads=2)
    expected = [(512, 2) if t == "full_attention" else (256, 8) for t in text["layer_types"]]
    assert _resolved(text) == expected
    assert _reference_resolved(text) == expected


def test_legacy_fields_defaults():
    # No global_head_dim: 512; no num_global_key_value_heads: the base KV heads.
    text = _base_text(num_key_value_heads=2)
    expected = [(512, 2) if t == "full_attention" else (16, 2) for t in text["layer_types"]]
    assert _resolved(text) == expected
    assert _reference_resolved(text) == expected


def test_per_layer_config_takes_precedence_over_legacy_fields():
    text = _base_text(per_layer_config={"5": {"head_dim": 64, "num_key_value_heads": 1}},
                      global_head_dim=512, num_global_key_value_heads=2)
    # Layer 2 is full attention but not listed: the legacy fields do not apply to it either.
    expected = [(16, 4), (16, 4), (16, 4), (16, 4), (16, 4), (64, 1)]
    assert _reference_resolved(text) == expected
    assert _resolved(text) == expected


def test_empty_per_layer_config_ignores_legacy_fields():
    # save_pretrained writes `"per_layer_config": {}` when the full-attention layers have the same
    # head dim / KV heads as the sliding ones; the reference then uses the base values everywhere.
    text = _base_text(per_layer_config={}, global_head_dim=512, num_global_key_value_heads=2)
    expected = [(16, 4)] * 6
    assert _reference_resolved(text) == expected
    assert _resolved(text) == expected


def test_checkpoint_with_uniform_head_dims_loads(tmp_path):
    """Full layers equal to the sliding ones: config.json gets `per_layer_config: {}`."""
    ref = build_reference(tiny_text_config(global_head_dim=16, num_global_key_value_heads=2), vision=False)
    folder = save_checkpoint(ref, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["text_config"]["per_layer_config"] == {}
    model, _ = load(folder)
    assert model is not None


@pytest.mark.parametrize("n_layers", [6, 8, 12, 13])
def test_default_layer_types(n_layers):
    from transformers import DiffusionGemmaTextConfig

    text = _base_text(num_hidden_layers=n_layers, layer_types=None)
    a = parse_text_args(text)
    expected = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
    expected[-1] = "full_attention"
    assert a.layer_types == expected
    ref = DiffusionGemmaTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    assert a.layer_types == list(ref.layer_types)
    # Legacy resolution follows the layer types.
    assert [a.head_dims[i] == 512 for i in range(n_layers)] == [t == "full_attention" for t in expected]


def test_last_layer_forced_full():
    text = _base_text(layer_types=["sliding_attention"] * 6)
    a = parse_text_args(text)
    assert a.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert _resolved(text) == _reference_resolved(text)


def test_layer_types_length_mismatch():
    with pytest.raises(CheckpointError, match="layer_types has 3 entries for 6 layers"):
        parse_text_args(_base_text(layer_types=["sliding_attention"] * 3))


def test_kv_heads_must_divide_query_heads():
    with pytest.raises(CheckpointError, match="layer 5 has 3 KV heads for 8 query heads"):
        parse_text_args(_base_text(per_layer_config={"5": {"num_key_value_heads": 3}}))


def test_parse_model_args_other_type_names_it():
    with pytest.raises(CheckpointError, match="'gemma3'"):
        parse_model_args({"model_type": "gemma3", "text_config": _base_text()})


def test_tiny_checkpoint_config_matches_reference(tiny_checkpoint):
    ref, folder = tiny_checkpoint
    args = parse_model_args(json.loads((folder / "config.json").read_text()))
    cfg = ref.config.text_config
    n = cfg.num_hidden_layers
    assert args.text.head_dims == [cfg.per_layer_config[i].head_dim for i in range(n)]
    assert args.text.kv_heads == [cfg.per_layer_config[i].num_key_value_heads for i in range(n)]
    assert args.text.layer_types == list(cfg.layer_types)
    assert args.has_vision


# ---------------------------------------------------------------------------------------------
# generation_config.json


def _write_gen(folder: Path, gen: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def test_generation_defaults_with_nulls(tmp_path):
    # As save_pretrained writes them: every sampler field present, null.
    folder = _write_gen(tmp_path, {
        "max_denoising_steps": None, "sampler_config": None, "t_min": None, "t_max": None,
        "stability_threshold": None, "confidence_threshold": None, "eos_token_id": [1, 106, 50],
        "pad_token_id": 0,
    })
    g = load_generation_defaults(folder)
    assert (g.max_denoising_steps, g.entropy_bound, g.t_min, g.t_max, g.stability_threshold,
            g.confidence_threshold) == (48, 0.1, 0.4, 0.8, 1, 0.005)
    assert tuple(SAMPLER_DEFAULTS.values()) == (48, 0.1, 0.4, 0.8, 1, 0.005)
    assert g.eos_token_ids == (1, 106, 50)
    assert g.pad_token_id == 0


def test_generation_defaults_sampler_config_with_null_entropy(tmp_path):
    folder = _write_gen(tmp_path, {"sampler_config": {"entropy_bound": None}})
    assert load_generation_defaults(folder).entropy_bound == 0.1


def test_generation_defaults_reads_values(tmp_path):
    folder = _write_gen(tmp_path, {
        "max_denoising_steps": 20, "sampler_config": {"entropy_bound": 0.25, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": 0.3, "t_max": 0.9, "stability_threshold": 2, "confidence_threshold": 0.01,
        "eos_token_id": 106,
    })
    g = load_generation_defaults(folder)
    assert (g.max_denoising_steps, g.entropy_bound, g.t_min, g.t_max, g.stability_threshold,
            g.confidence_threshold) == (20, 0.25, 0.3, 0.9, 2, 0.01)
    assert g.eos_token_ids == (106,)


def test_generation_defaults_without_file(tmp_path):
    g = load_generation_defaults(tmp_path, {"text_config": {"eos_token_id": [1, 106], "pad_token_id": 0}})
    assert g.max_denoising_steps == 48 and g.entropy_bound == 0.1
    assert g.eos_token_ids == (1, 106)


def test_generation_config_invalid_json(tmp_path):
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        load_generation_defaults(tmp_path)
