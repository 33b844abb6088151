"""The memory plan (checkpoint/memory.py) and the smaller recipes: the plan's weights are the
loaded model's bytes, a checkpoint or a request over a (smaller, monkeypatched) machine is refused
in one line before any work (API, CLI, server), `dgemma info` prints the plan, from a config and
index alone too."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import openai
import pytest
from mlx.utils import tree_flatten

import mlx_diffusiongemma as dg
from mlx_diffusiongemma.checkpoint import loading, memory
from mlx_diffusiongemma.checkpoint.recipes import EXPERT_BITS
from mlx_diffusiongemma.errors import ContextLengthError, MemoryLimitError
from mlx_diffusiongemma.model.args import parse_model_args

from conftest import error_line, invoke
from helpers_server import running

RELEASED = {
    "model_type": "diffusion_gemma", "canvas_length": 256,
    "text_config": dict(vocab_size=262144, hidden_size=2816, num_hidden_layers=30, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                        intermediate_size=2112, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                        sliding_window=1024),
}


def _bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _machine(monkeypatch, limit: int, source: str = "Metal's recommended working set") -> None:
    monkeypatch.setattr(memory, "memory_limit", lambda: (limit, source))


@pytest.mark.parametrize("options", [{}, {"quantize": "mixed-3bit"}, {"quantize": "mixed-2bit", "text_only": True},
                                     {"quantize": "bf16"}, {"dtype": "float16"}])
def test_planned_weights_are_the_loaded_bytes(tiny_checkpoint, options):
    _, folder = tiny_checkpoint
    model, _ = dg.load(folder, **options)
    plan = model.memory_plan
    assert plan.weights == _bytes(model)
    if "dtype" not in options:  # the plan made without loading (what `dgemma info` prints) is the same
        assert loading.plan(folder, **options).weights == plan.weights
    if options.get("quantize", "bf16") != "bf16":
        bits = EXPERT_BITS[options["quantize"]]
        assert model.layers[0].experts.gate_up_proj.bits == bits
        assert model.model.decoder.self_conditioning.gate_proj.bits == 4
        assert model.layers[0].self_attn.q_proj.bits == 8
        assert plan.load_extra > 0  # the unquantized weights are held while quantizing in memory


def test_smaller_recipes_for_the_released_shape():
    """Sizes for the README's recipe table, from the config alone: the converter's projection and
    the plan's weights are one number."""
    from mlx_diffusiongemma.convert import projected_size

    args = parse_model_args(RELEASED)
    args.vision = None
    sizes = {r: projected_size(RELEASED, r).bytes for r in EXPERT_BITS}
    assert sizes["mixed-3bit"] < 14e9 and sizes["mixed-2bit"] < 10.5e9
    assert sizes["mixed-2bit"] < sizes["mixed-3bit"] < sizes["mixed-4bit"] < 16e9
    assert {r: memory.weight_bytes(args, recipe=r) for r in EXPERT_BITS} == sizes
    # The cache grows with the context: full layers hold all of it, sliding ones a window.
    assert memory.kv_bytes(args.text, 8192) > memory.kv_bytes(args.text, 1024) > 0
    one_full_layer = 2 * 2 * 512 * 2  # K and V, 2 heads of 512, bf16, per position
    assert memory.kv_bytes(args.text, 32768) - memory.kv_bytes(args.text, 16384) == 5 * one_full_layer * 16384


def test_load_refuses_what_does_not_fit_before_reading_weights(tiny_checkpoint, monkeypatch):
    _, folder = tiny_checkpoint
    need = loading.plan(folder).peak
    _machine(monkeypatch, need - 1)
    monkeypatch.setattr(loading, "iter_checkpoint", lambda *a: pytest.fail("weights read"))
    with pytest.raises(MemoryLimitError) as e:
        dg.load(folder)
    message = str(e.value)
    assert "\n" not in message and "needs" in message and "iogpu.wired_limit_mb=" in message
    assert "--recipe mixed-" in message  # a float checkpoint: a smaller recipe is named
    # Elsewhere than a Mac, no sysctl to suggest.
    _machine(monkeypatch, need - 1, "this machine's memory")
    with pytest.raises(MemoryLimitError, match="^(?!.*sysctl)"):
        dg.load(folder)
    for context in (0, 10**9, 1.5):
        with pytest.raises(ValueError, match="context must be a whole number"):
            dg.load(folder, context=context)


def test_a_request_over_the_memory_is_refused_before_any_work(tiny_checkpoint):
    _, folder = tiny_checkpoint
    model, tok = dg.load(folder)
    plan = model.memory_plan
    c = model.canvas_length
    plan.limit = plan.at(64).peak  # room for 64 positions beside the weights, not for 512
    assert plan.longest_context() >= 64
    with pytest.raises(MemoryLimitError, match="Shorten the prompt or lower max_tokens") as e:
        dg.generate(model, tok, "hello", max_tokens=8 * c * 8)
    assert isinstance(e.value, ContextLengthError)
    assert dg.generate(model, tok, "hi", max_tokens=c, max_denoising_steps=2).tokens
    # The canvas verbs (templates, JSON, completion with a suffix) are checked against the same plan.
    with pytest.raises(MemoryLimitError):
        dg.infill(model, tok, "hello", "{{x:..%d}}" % (8 * c * 8))
    with pytest.raises(MemoryLimitError):
        dg.complete(model, tok, "hello", " world", max_tokens=8 * c * 8)


def test_cli_refuses_in_one_line_and_info_prints_the_plan(runner, tiny_checkpoint, monkeypatch, tmp_path):
    _, folder = tiny_checkpoint
    _machine(monkeypatch, 1000)
    result = invoke(runner, ["generate", "--model", str(folder), "--prompt", "hi"])
    assert result.exit_code == 1
    line = error_line(result, last=True)
    assert "needs" in line and "MLX can use" in line

    monkeypatch.undo()
    result = invoke(runner, ["info", str(folder), "--context", "4096"])
    assert result.exit_code == 0, result.output
    assert "4096-token context" in result.output and "converted mixed-2bit" in result.output
    assert "MLX can use" in result.output

    # A Hugging Face checkpoint's config and index alone (the weights not downloaded yet).
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(RELEASED))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    result = invoke(runner, ["info", str(hf), "--context", "8192"])
    assert result.exit_code == 0, result.output
    assert "50.50 GB" in result.output and "12.55 GB" in result.output and "9.69 GB" in result.output
    result = invoke(runner, ["info", str(hf), "--context", "0"])
    assert result.exit_code == 2


def test_server_answers_a_request_that_would_not_fit_with_an_openai_error(tiny_checkpoint, tmp_path):
    from mlx_diffusiongemma.server.app import ServerConfig, create_app

    _, folder = tiny_checkpoint
    folder = shutil.copytree(folder, tmp_path / "ckpt")
    model, tok = dg.load(folder)
    model.memory_plan.limit = model.memory_plan.at(64).peak
    with running(create_app(model, tok, ServerConfig(model_id="tiny", max_tokens_limit=4096))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="hello", max_tokens=512)
        assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
        assert "MLX can use" in e.value.message
        ok = c.completions.create(model="tiny", prompt="hi", max_tokens=8, extra_body={"max_denoising_steps": 2})
        assert ok.choices[0].finish_reason in ("stop", "length")
    mx.clear_cache()
