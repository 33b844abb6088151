"""MLX's measured peak of decoder steps against the memory plan's decoder count, on a small
quantized model with a large vocabulary (tiny hidden size: the vocabulary-sized arrays dominate).

    nice -n 10 python scripts/decoder_memory.py [--vocab 262144] [--canvas 256] [--steps 3]

Builds a random 2-layer model of the released structure (hidden 64) with `--vocab` tokens and a
canvas of `--canvas`, in bfloat16 quantized to 4 bits (as the released model's recipes), prefills
a 64-token prompt, then runs one block of `--steps` denoising steps through the engine, on the exact path and in fast mode (whose first
pass computes every row). For each it prints MLX's peak (`mx.get_peak_memory`, reset by the
engine before the prefill) minus the weights and the cache (the transients), beside the plan's
decoder count (`checkpoint.memory.buffer_bytes`) for the canvas rows and the prompt's context.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_diffusiongemma.checkpoint.memory import buffer_bytes
from mlx_diffusiongemma.diffusion.engine import Request, run
from mlx_diffusiongemma.diffusion.events import GenerationResult
from mlx_diffusiongemma.diffusion.options import FastOptions, SamplerOptions
from mlx_diffusiongemma.model import args as model_args
from mlx_diffusiongemma.model.args import parse_model_args
from mlx_diffusiongemma.model.model import Model

PROMPT = 64


def tiny_large_vocab(vocab: int, canvas: int) -> Model:
    text = dict(model_type="diffusion_gemma_text", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                global_head_dim=32, num_global_key_value_heads=1, sliding_window=32, num_experts=4,
                top_k_experts=2, moe_intermediate_size=64, layer_types=["sliding_attention", "full_attention"],
                final_logit_softcapping=30.0, max_position_embeddings=4096)
    args = parse_model_args({"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": text})
    mx.random.seed(0)
    model = Model(args)
    model.set_dtype(mx.bfloat16)  # the released checkpoint's dtype: scales, norms and self-conditioning in bfloat16
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def measure(model: Model, fast: FastOptions | None, steps: int) -> int:
    """The transient bytes of one block of `steps` steps: MLX's peak minus what is held before and after."""
    prompt = [(7 * i) % model.vocab_size for i in range(PROMPT)]
    request = Request(prompt, max_tokens=model.canvas_length, seed=1, fast=fast,
                      sampler=SamplerOptions(max_denoising_steps=steps, confidence_threshold=-1.0))
    mx.clear_cache()
    held = mx.get_active_memory()
    result = None
    for event in run(model, request):
        if isinstance(event, GenerationResult):
            result = event
    assert result is not None
    peak = mx.get_peak_memory()
    cache = model.make_cache()  # the prompt cache's bytes (held during the block)
    model.extend(cache, prompt)
    mx.eval(cache.state())
    return peak - held - cache.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="rows per chunk of the step's vocabulary-sized work (default: the library's byte budget)")
    a = ap.parse_args()
    if a.chunk_rows is not None:
        model_args.STEP_CHUNK_BYTES = a.chunk_rows * 4 * a.vocab
    model = tiny_large_vocab(a.vocab, a.canvas)
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    plan = buffer_bytes(model.text, a.canvas, PROMPT + a.canvas)["decoder"]
    if hasattr(model_args, "step_chunk_rows"):  # (absent before the chunked step: the script also measures that code)
        print(f"rows per chunk: {model_args.step_chunk_rows(a.vocab)}")
    logits = 4 * a.canvas * a.vocab
    print(f"vocab {a.vocab}, canvas {a.canvas}: weights {weights / 2**20:.1f} MiB, one float32 [canvas, vocab] "
          f"{logits / 2**20:.1f} MiB; plan's decoder buffers {plan / 2**20:.1f} MiB ({plan / logits:.2f} arrays)")
    for name, fast in (("exact", None), ("fast", FastOptions())):
        got = measure(model, fast, a.steps)
        print(f"{name}: measured transients {got / 2**20:.1f} MiB ({got / logits:.2f} arrays), "
              f"{(got - plan) / plan:+.1%} vs plan")


if __name__ == "__main__":
    main()
