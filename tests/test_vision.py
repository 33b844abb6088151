"""Images: the Gemma 4 vision tower, the image processor and image prompts against the reference
(transformers 5.23), in float32 on tiny random configs.

- image features (`get_image_features`: tower, pooling, projection) within 1e-4;
- decoder logits after a prompt with one and with two images within 1e-4, the encoder treating
  each run of image tokens as a bidirectional group (`use_bidirectional_attention: "vision"`),
  with chunked prefill too;
- the processor's pixel values, position ids and soft-token counts equal to the reference
  processor's (`Gemma4ImageProcessorPil`) on several sizes, aspect ratios and modes;
- exact generation parity with an image under shared randomness (as tests/test_engine_parity.py).
"""

from __future__ import annotations

import io

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache

from conftest import build_reference, save_checkpoint, tiny_text_config
from mlx_diffusiongemma.demo.files import image_token_ids, tokenizer_vocab_size
from mlx_diffusiongemma.checkpoint.loading import load_model
from mlx_diffusiongemma.prompts.processor import ImageProcessor

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402

TOL = 1e-4
# A tiny tower: 4-pixel patches, 2 layers, grouped-query attention (2 heads, 1 KV head).
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, patch_size=4, position_embedding_size=64)
SOFT = 70  # soft-token budget: up to 630 patches of 4x4 pixels
IDS = image_token_ids()
IMG, BOI, EOI = IDS["image_token_id"], IDS["boi_token_id"], IDS["eoi_token_id"]


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # sliding window 8 < an image's run of tokens: the group must override the window.
    text = tiny_text_config(use_bidirectional_attention="vision", vocab_size=tokenizer_vocab_size(True))
    built = build_reference(text, canvas_length=8, seed=21, vision=VISION)
    folder = save_checkpoint(built, tmp_path_factory.mktemp("vision") / "ckpt", image_tokens=True)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = load_model(folder, dtype=mx.float32)
    return ref, ours, folder


def _images():
    rng = np.random.default_rng(0)
    # Smooth-ish random images so that resizing does something non-trivial.
    a = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (90, 20, 3), dtype=np.uint8)
    return [a, b]


def _reference_features(ref, images):
    proc = Gemma4ImageProcessorPil(patch_size=VISION["patch_size"], max_soft_tokens=SOFT, pooling_kernel_size=3)
    out = proc(images, return_tensors="pt")
    with torch.no_grad():
        feats = ref.model.encoder.get_image_features(out["pixel_values"], out["image_position_ids"]).pooler_output
    return out, feats


def test_image_features_parity(pair):
    ref, ours, _ = pair
    images = _images()
    out, feats = _reference_features(ref, images)
    mine = ImageProcessor(VISION["patch_size"], 3, SOFT)
    ours_feats = []
    for i, image in enumerate(images):
        p = mine(image)
        n = p.pixel_values.shape[0]
        assert p.num_soft_tokens == int(out["num_soft_tokens_per_image"][i])
        np.testing.assert_array_equal(p.pixel_values, out["pixel_values"][i, :n].numpy())
        np.testing.assert_array_equal(p.position_ids, out["image_position_ids"][i, :n].numpy())
        assert (out["image_position_ids"][i, n:] == -1).all()  # the reference pads; we do not
        ours_feats.append(np.array(ours.encode_image(p.pixel_values, p.position_ids, p.grid)))
    got = np.concatenate(ours_feats)
    diff = _maxdiff(got, feats.numpy())
    print(f"\nimage features {got.shape}: max |diff| {diff:.2e} (|features| <= {float(feats.abs().max()):.2f})")
    assert got.shape == tuple(feats.shape)
    assert float(feats.abs().max()) > 0.1
    assert diff <= TOL


def _prompt(counts: list[int]) -> list[int]:
    """Text, then each image as <boi> + soft tokens + <eoi>, text in between and after."""
    ids = [2, 17, 40, 41]
    for i, n in enumerate(counts):
        ids += [BOI] + [IMG] * n + [EOI] + [50 + i, 60 + i]
    return ids + [70, 71, 72]


def _reference_prefill(ref, ids, pixel_values, positions, cache):
    ids_t = torch.tensor([ids])
    mm = (ids_t == IMG).long()
    masks = ref.model.encoder.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty((1, len(ids), 0)),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.bool), past_key_values=cache,
        position_ids=torch.arange(len(ids))[None], mm_token_type_ids=mm)
    with torch.no_grad():
        ref.model.encoder(input_ids=ids_t, pixel_values=pixel_values, image_position_ids=positions,
                          attention_mask=masks, past_key_values=cache, position_ids=torch.arange(len(ids))[None])


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_after_images_parity(pair, n_images):
    ref, ours, _ = pair
    images = _images()[:n_images]
    out, _ = _reference_features(ref, images)
    counts = [int(c) for c in out["num_soft_tokens_per_image"]]
    ids = _prompt(counts)
    vocab = ref.config.text_config.vocab_size
    g = torch.Generator().manual_seed(n_images)
    canvas = torch.randint(0, vocab, (1, 8), generator=g)
    committed = torch.randint(0, vocab, (1, 8), generator=g)

    cache_ref = DynamicCache(config=ref.config.text_config)
    _reference_prefill(ref, ids, out["pixel_values"], out["image_position_ids"], cache_ref)
    with torch.no_grad():
        r1 = ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits
        r2 = ref(decoder_input_ids=canvas, past_key_values=cache_ref, self_conditioning_logits=r1 / 0.6).logits
        ref.model.encoder(input_ids=committed, past_key_values=cache_ref)
        r3 = ref(decoder_input_ids=canvas, past_key_values=cache_ref).logits

    mine = ImageProcessor(VISION["patch_size"], 3, SOFT)
    feats = [ours.encode_image(p.pixel_values, p.position_ids, p.grid) for p in map(mine, images)]
    results = {}
    for chunk in (512, 5):  # whole prompt; small chunks (stretched over each image's run)
        cache = ours.prefill(mx.array(ids), chunk_size=chunk, image_features=feats)
        o1 = ours.denoise(mx.array(canvas.numpy()), cache)
        o2 = ours.denoise(mx.array(canvas.numpy()), cache, self_conditioning=mx.array((r1 / 0.6).numpy()))
        ours.extend(cache, mx.array(committed.numpy()))
        o3 = ours.denoise(mx.array(canvas.numpy()), cache)
        results[chunk] = [_maxdiff(o, r.numpy()) for o, r in ((o1, r1), (o2, r2), (o3, r3))]
    print(f"\n{n_images} image(s) ({counts} soft tokens, prompt {len(ids)}): max |logit diff| "
          + ", ".join(f"chunk {c}: " + " / ".join(f"{d:.2e}" for d in v) for c, v in results.items())
          + f" (|logits| <= {float(r1.abs().max()):.2f})")
    assert max(max(v) for v in results.values()) <= TOL

    # The image features and the bidirectional groups both matter: without either, logits move.
    plain = ours.denoise(mx.array(canvas.numpy()), ours.prefill(mx.array(ids)))
    assert _maxdiff(plain, r1.numpy()) > 100 * TOL
    ours.args.bidirectional = None
    try:
        causal = ours.denoise(mx.array(canvas.numpy()), ours.prefill(mx.array(ids), image_features=feats))
    finally:
        ours.args.bidirectional = "vision"
    assert _maxdiff(causal, r1.numpy()) > 100 * TOL


def test_image_token_count_must_match(pair):
    _, ours, _ = pair
    feats = [mx.zeros((3, ours.text.hidden_size))]
    with pytest.raises(ValueError, match="2 image tokens but the images give 3"):
        ours.prefill(mx.array([2, BOI, IMG, IMG, EOI]), image_features=feats)


# ---------------------------------------------------------------------------------------------
# the processor against the reference processor (Gemma 4 defaults: 16-pixel patches, 280 tokens)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _photo(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), (x + y) % 256], -1)
    noise = rng.integers(0, 40, (h, w, 3))
    rgb = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        rgb.putalpha(alpha)
        return rgb
    return rgb.convert(mode) if mode != "RGB" else rgb


@pytest.mark.parametrize("size,mode,budget", [
    ((480, 640), "RGB", 280),    # landscape photo
    ((1024, 768), "RGB", 280),   # portrait
    ((224, 224), "RGB", 280),    # square, upscaled
    ((300, 1200), "RGB", 70),    # wide banner, small budget
    ((40, 900), "RGB", 280),     # extreme aspect ratio (one side rounds to zero)
    ((333, 517), "RGBA", 140),   # transparency composited onto white
    ((256, 200), "L", 280),      # greyscale
    ((200, 300), "P", 560),      # palette
])
def test_processor_matches_reference(size, mode, budget):
    image = _photo(*size, mode=mode)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=budget)(image, return_tensors="np")
    mine = ImageProcessor(16, 3, budget)
    for source in (image, _png(image)):
        p = mine(source)
        n = p.pixel_values.shape[0]
        assert p.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])
        assert p.pixel_values.dtype == ref["pixel_values"].dtype == np.float32
        np.testing.assert_array_equal(p.pixel_values, ref["pixel_values"][0, :n])
        np.testing.assert_array_equal(p.position_ids, ref["image_position_ids"][0, :n])
        assert (ref["image_position_ids"][0, n:] == -1).all()
        assert p.grid[0] * p.grid[1] == n and p.position_ids[:, 0].max() == p.grid[1] - 1


def test_processor_matches_reference_on_arrays():
    arr = np.asarray(_photo(123, 456))
    ref = Gemma4ImageProcessorPil()(arr, return_tensors="np")
    p = ImageProcessor()(arr)
    np.testing.assert_array_equal(p.pixel_values, ref["pixel_values"][0, : p.pixel_values.shape[0]])
    assert ImageProcessor()(mx.array(arr)).digest == p.digest


# ---------------------------------------------------------------------------------------------
# generation with an image, exact under shared randomness


def test_generation_parity_with_image(pair, monkeypatch):
    from test_engine_parity import RecordingNoise, run_reference

    from mlx_diffusiongemma.checkpoint.config import load_generation_defaults
    from mlx_diffusiongemma.diffusion.engine import Request, run
    from mlx_diffusiongemma.diffusion.options import SamplerOptions
    from mlx_diffusiongemma.diffusion.events import GenerationResult

    ref, ours, folder = pair
    image = _images()[1]
    out, _ = _reference_features(ref, [image])
    processed = ImageProcessor(VISION["patch_size"], 3, SOFT)(image)
    prompt = _prompt([processed.num_soft_tokens])
    ours.generation = load_generation_defaults(folder)
    noise = RecordingNoise(3)
    request = Request(prompt, max_tokens=16, sampler=SamplerOptions(max_denoising_steps=5), images=[processed])
    events = list(run(ours, request, noise=noise))
    result = events[-1]
    assert isinstance(result, GenerationResult)
    new, tpf, steps = run_reference(
        ref, prompt, noise.log, monkeypatch, max_new_tokens=16, max_denoising_steps=5,
        pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"],
        mm_token_type_ids=(torch.tensor([prompt]) == IMG).long())
    assert steps == result.steps_per_block
    n = len(result.tokens)
    assert new[:n] == result.tokens and n > 0
    assert tpf == pytest.approx(result.tokens_per_forward, abs=1e-6)
    print(f"\nwith an image: steps per block {steps}, tokens {n}, tokens_per_forward {tpf:.4f}")
    # The image is read: the same seed without it gives other tokens.
    text_only = list(run(ours, Request(prompt, max_tokens=16, sampler=SamplerOptions(max_denoising_steps=5)),
                         noise=RecordingNoise(3)))[-1]
    assert text_only.tokens != result.tokens


# ---------------------------------------------------------------------------------------------
# the recipe decision for the vision tower: 8-bit against bfloat16, both against float32


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_vision_8bit_against_bf16(tmp_path):
    """Only the vision tower and its projection change precision (the text model stays float32),
    so the figures are the tower's own error. Widths are multiples of 64 so 8 bits apply to every
    matrix. Printed, bounded loosely, and recorded in docs/vision.md."""
    import mlx.nn as nn

    from mlx_diffusiongemma.model import model as W

    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=64, patch_size=8, position_embedding_size=64)
    text = tiny_text_config(use_bidirectional_attention="vision", vocab_size=tokenizer_vocab_size(True),
                            hidden_size=128, intermediate_size=128, head_dim=32, global_head_dim=64)
    folder = save_checkpoint(build_reference(text, canvas_length=16, seed=9, vision=vision), tmp_path / "c",
                             image_tokens=True)
    image = _photo(200, 300)
    processed = ImageProcessor(8, 3, SOFT)(image)
    ids = _prompt([processed.num_soft_tokens])
    canvas = mx.array(np.random.default_rng(0).integers(0, text["vocab_size"], (1, 16)))

    def is_vision(path, module):
        return W.is_vision_key(path + ".") and hasattr(module, "to_quantized")

    def variant(kind):
        model, _ = load_model(folder, dtype=mx.float32)
        if kind != "f32":
            enc = model.model.encoder
            for part in (enc.vision_tower, enc.embed_vision):
                part.set_dtype(mx.bfloat16)  # the converter stores bfloat16 before quantizing
            if kind == "8bit":
                nn.quantize(model, group_size=64, bits=8, class_predicate=is_vision)
                assert enc.vision_tower.encoder.layers[0].mlp.up_proj.linear.bits == 8
        feats = model.encode_image(processed.pixel_values, processed.position_ids, processed.grid)
        logits = model.denoise(canvas, model.prefill(ids, image_features=[feats.astype(mx.float32)]))
        return np.array(feats.astype(mx.float32)), np.array(logits)

    f32, bf16, q8 = variant("f32"), variant("bf16"), variant("8bit")
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    figures = {k: (rel(v[0], f32[0]), _kl(f32[1] / 0.6, v[1] / 0.6)) for k, v in (("bf16", bf16), ("8bit", q8))}
    print("\nvision tower vs float32: " + ", ".join(
        f"{k}: features rel. error {e:.2e}, logits KL {kl:.2e}" for k, (e, kl) in figures.items()))
    # Measured: features 3.3e-2 (bf16) / 8.1e-2 (8-bit), logits KL 5.0e-2 / 5.2e-2.
    assert figures["bf16"][0] < 0.07 and figures["8bit"][0] < 0.16
    assert figures["bf16"][1] < 0.1 and figures["8bit"][1] < 0.1
    assert figures["8bit"][0] > figures["bf16"][0]  # 8 bits add their own error on top of bf16


def test_vision_memory_counts_the_towers_parameters(pair):
    from mlx.utils import tree_flatten

    from mlx_diffusiongemma.perf.accounting import vision_memory
    from mlx_diffusiongemma.model.args import VisionArgs

    _, ours, _ = pair
    enc = ours.model.encoder
    counted = sum(v.size for part in (enc.vision_tower, enc.embed_vision) for _, v in tree_flatten(part.parameters()))
    m = vision_memory(ours.args.vision, ours.text.hidden_size, SOFT)
    assert m["parameters"] == counted and m["patches"] == SOFT * 9
    # The reference class defaults (Gemma4VisionConfig) at the default budget: printed for the docs.
    d = vision_memory(VisionArgs(), 2816, 280)
    print(f"\nGemma4VisionConfig defaults: {d['parameters'] / 1e6:.0f}M parameters, "
          f"{d['weight_bytes'] / 1e6:.0f} MB bf16, one 280-token image: {d['patches']} patches, "
          f"peak activations {d['peak_activation_bytes'] / 1e6:.0f} MB")
    assert d["attention_scores_bytes"] == 12 * 2520 * 2520 * 4
