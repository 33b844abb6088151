"""The trained demo model that ships in the package (`--model demo`).

It must load offline from the installed package, keep every architectural feature of the 26B
model at a size that ships, agree with the reference `transformers` class on its Hugging Face
export (the shared yardstick, `scripts/export_hf.py`), and actually answer its tasks: held-out
prompts (never trained on) of the families that a few generations can check quickly. The full
per-family table is `scripts/eval_demo.py`'s (docs/demo-model.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_diffusiongemma import generate, load
from mlx_diffusiongemma.demo import is_trained_demo, shipped_demo_dir
from mlx_diffusiongemma.demo.tasks import FAMILIES, held_out_set, is_held_out
from mlx_diffusiongemma.prompts.render import render_messages
from mlx_diffusiongemma.checkpoint.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def test_ships_with_the_package_and_is_small():
    folder = shipped_demo_dir()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 20 * 2**20, f"{total / 2**20:.1f} MB is too large to ship"
    assert is_trained_demo(folder)


def test_has_the_architecture_of_the_real_model(demo):
    model, tok = demo
    config = json.loads((model.source / "config.json").read_text())["text_config"]
    assert model.canvas_length >= 64
    assert config["num_experts"] > config["top_k_experts"] >= 2  # routed experts
    assert {"sliding_attention", "full_attention"} <= set(config["layer_types"])
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert any("self_conditioning" in k for k in names)
    assert any("router" in k for k in names)
    assert is_trained_demo(model.source)
    # The Gemma 4 chat format.
    ids = render_messages(tok, [{"role": "user", "content": "What is 2 + 3?"}])
    assert tok.decode(ids).startswith("<bos><|turn>user\n") and tok.decode(ids).endswith("<|turn>model\n")


def test_hugging_face_export_runs_in_the_reference(tmp_path):
    """The export loads in the reference class, and its logits equal ours (float32)."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    out = tmp_path / "demo-hf"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), str(shipped_demo_dir()),
                           "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = load_model(shipped_demo_dir(), dtype=mx.float32)
    _, tok = load("demo")
    prompt = render_messages(tok, [{"role": "user", "content": "Sort these numbers: 42 7 19 88 3"}])
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, ours.vocab_size, (1, ours.canvas_length))

    cache = DynamicCache(config=ref.config.text_config)
    with torch.no_grad():
        ref.model.encoder(input_ids=torch.tensor([prompt]), past_key_values=cache)
        theirs = ref(decoder_input_ids=torch.tensor(canvas), past_key_values=cache).logits
    mine = ours.denoise(mx.array(canvas), ours.prefill(mx.array([prompt])))
    diff = float(np.abs(np.array(mine) - theirs.numpy()).max())
    assert float(theirs.abs().max()) > 1.0
    assert diff < 1e-4, diff


# The families the shipped model has learnt (docs/demo-model.md has every family's accuracy; sort,
# dedup, add and yesno are far from solved). Every held-out prompt here was never trained on (the
# split is by prompt hash), and each generation is seeded, so this checks real answers.
QUICK = {"reverse": 6, "card": 6}


def test_template_shaped_training_answers(demo):
    """The card answers that teach the demo template filling (scripts/train_demo.py
    --template-fraction) read back, by the hole rule and as JSON, to the card's values."""
    import random

    from mlx_diffusiongemma.demo.build import card_template_ids

    _, tok = demo
    eos = tok.convert_tokens_to_ids("<eos>") if hasattr(tok, "convert_tokens_to_ids") else 1
    rng = random.Random(0)
    forms = set()
    for prompt, answer in held_out_set("card", 20, seed=3):
        ids, pinned = card_template_ids(tok, rng, answer, eos)
        assert len(pinned) == len(ids) and any(pinned) and not all(pinned)
        assert not any(p and t == eos for t, p in zip(ids, pinned))  # end tokens only in holes
        fixed = tok.decode([t for t, p in zip(ids, pinned) if p])
        assert ("Name:" in fixed) or ('"name"' in fixed)
        text = tok.decode([t for t in ids if t != eos])
        if text.startswith("{"):
            forms.add("json")
            got = json.loads(text)
            assert f"Name: {got['name']}\nAge: {got['age']}\nCity: {got['city']}" == answer
        else:
            forms.add("lines")
            assert text == answer
    assert forms == {"json", "lines"}


@pytest.mark.parametrize("family", list(QUICK))
def test_answers_held_out_prompts(demo, family):
    model, tok = demo
    cases = held_out_set(family, QUICK[family], seed=7)
    assert all(is_held_out(prompt) for prompt, _ in cases)
    judge = FAMILIES[family].judge
    results = [generate(model, tok, prompt, max_tokens=64, seed=i) for i, (prompt, _) in enumerate(cases)]
    correct = sum(judge(prompt, answer, r.text.strip()) for (prompt, answer), r in zip(cases, results))
    assert correct >= len(cases) - 1, [(p, a, r.text) for (p, a), r in zip(cases, results)]
    # Parallel decoding: more than one token committed per decoder pass on average.
    assert sum(r.tokens_per_forward for r in results) / len(results) > 1.0
