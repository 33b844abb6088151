"""Build tests/fixtures/mlxvlm_tiny: a tiny DiffusionGemma checkpoint converted by mlx-vlm itself.

The other MLX port (mlx-vlm) makes the mlx-community DiffusionGemma conversions. To test that our
loader reads them the way mlx-vlm does, without a 26B download, this script:

1. builds a tiny Hugging Face DiffusionGemma checkpoint deterministically with the reference
   classes (`transformers` 5.23, torch 2.13 CPU), randomising the tensors that initialise to
   constants (norm weights, router scales, both sets of `layer_scalar` buffers), saved in
   bfloat16 like the released checkpoint, plus a tiny 256-token `tokenizers` tokenizer;
2. runs mlx-vlm's own converter (`python -m mlx_vlm convert`, mlx-vlm 0.7.10) from a separate
   virtual environment on it: once with `-q` (4-bit affine, group size 64, with mlx-vlm's own
   DiffusionGemma quant predicate, i.e. its mixed 4/8-bit recipe written per module into
   config.json) and once without quantization (bfloat16);
3. runs mlx-vlm's own model on each conversion (prefill a fixed prompt; a decoder pass on a fixed
   canvas, a second one self-conditioned on the first, and one after a prompt shorter than the
   sliding window) and stores the prompt, canvas and its logits next to the conversion, so a
   test can check that we read the other port's files the way it does;
4. copies everything into tests/fixtures/mlxvlm_tiny/{hf,mlxvlm-4bit,mlxvlm-bf16} and writes a
   README.md saying how it was made.

Run from the repository root with the main venv (the one with transformers + torch):

    /work/venv/bin/python scripts/make_mlxvlm_fixture.py --vlm-python /work/vlmvenv/bin/python

where the second interpreter's environment was made with

    python3 -m venv /work/vlmvenv
    /work/vlmvenv/bin/pip install torch==2.13.0           # the CPU wheel, first
    /work/vlmvenv/bin/pip install mlx-vlm==0.7.10 "mlx[cpu]" transformers==5.23.0

mlx-vlm is only ever run in its own environment; none of its code is copied here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "mlxvlm_tiny"
SEED = 20260501
INIT_RANGE = 0.1

TEXT_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=8,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=64,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
)
# position_embedding_size / patch_size: the Gemma 4 vision defaults (10240 / 16) alone would be
# 700k parameters; nothing here reads the vision tower, it only has to be in the files.
VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    position_embedding_size=64,
    patch_size=4,
)
CANVAS_LENGTH = 8

# Fixed inputs for the reference logits (ids inside the 256-token vocabulary). The prompt is
# longer than the sliding window (8) so the sliding layers' window matters in both passes.
PROMPT_IDS = [2, 105, 17, 42, 99, 7, 133, 250, 64, 31, 18, 200, 77, 106, 105, 12]
CANVAS_IDS = [4, 4, 57, 4, 190, 4, 4, 23]
SHORT_PROMPT = 5  # a prompt prefix shorter than the sliding window

SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>", "<|video|>", "<|image|>", "<start_of_image>", "<end_of_image>",
]


# --------------------------------------------------------------------------------------------
# 1. the Hugging Face checkpoint
# --------------------------------------------------------------------------------------------
def build_tokenizer(folder: Path) -> None:
    """A 256-token WordLevel tokenizer (tokenizer.json + tokenizer_config.json + chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = list(SPECIALS)
    words += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words += [str(d) for d in range(10)]
    words += list(".,!?;:'\"()-")
    words += ["user", "model", "system", "the", "is", "of", "and", "to", "in", "hello", "world"]
    words += [f"w{i}" for i in range(256 - len(words))]
    assert len(words) == 256 and len(set(words)) == 256
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn> {{ m['role'] }} {{ m['content'] }} "
        "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}"
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "model_max_length": 1024,
        "padding_side": "left",
        "chat_template": chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def build_hf(folder: Path) -> None:
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(SEED)
    # A wider initialisation than the default 0.02 so that the tiny model's logits spread over
    # a few units and top-1 comparisons mean something.
    config = DiffusionGemmaConfig(
        text_config=dict(TEXT_CONFIG, initializer_range=INIT_RANGE),
        vision_config=dict(VISION_CONFIG),
        canvas_length=CANVAS_LENGTH,
        initializer_range=INIT_RANGE,
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "vision" in name:
                continue
            if name.endswith("layer_scalar"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif name.endswith(("router.scale", "router.per_expert_scale")) or (
                "norm" in name and name.endswith(".weight")
            ):
                t.copy_(0.6 + 0.8 * torch.rand(t.shape, generator=gen))
    model.to(torch.bfloat16).save_pretrained(folder)
    legacy_text_config(folder / "config.json")
    build_tokenizer(folder)


def legacy_text_config(path: Path) -> None:
    """Write the full-attention layers' shape the way the released config.json does.

    transformers 5.23 serialises `global_head_dim` / `num_global_key_value_heads` as a
    `per_layer_config` map; the released checkpoint (and mlx-vlm 0.7.10, which only reads the
    legacy fields and would otherwise default to 512 / 2) use the legacy fields.
    """
    config = json.loads(path.read_text())
    text = config["text_config"]
    text.pop("per_layer_config", None)
    text["global_head_dim"] = TEXT_CONFIG["global_head_dim"]
    text["num_global_key_value_heads"] = TEXT_CONFIG["num_global_key_value_heads"]
    text["use_bidirectional_attention"] = "vision"  # as released (only affects image tokens)
    config["text_config"] = dict(sorted(text.items()))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# 2. mlx-vlm's converter and 3. mlx-vlm's logits (run in mlx-vlm's own environment)
# --------------------------------------------------------------------------------------------
def run_vlm(vlm_python: str, args: list[str], cwd: Path) -> str:
    proc = subprocess.run([vlm_python, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mlx-vlm step failed: {' '.join(args[:3])}")
    return proc.stdout + proc.stderr


def convert_cmd(hf: Path, out: Path, quantize: bool) -> list[str]:
    cmd = ["-m", "mlx_vlm", "convert", "--hf-path", str(hf), "--mlx-path", str(out)]
    if quantize:
        cmd += ["-q", "--q-bits", "4", "--q-group-size", "64"]
    return cmd


REFERENCE_SNIPPET = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm.utils import load_model

    folder, out = sys.argv[1], sys.argv[2]
    prompt = mx.array([PROMPT], dtype=mx.int32)
    canvas = mx.array([CANVAS], dtype=mx.int32)
    short = SHORT


    def passes(model):
        cache = model.diffusion_prefill_cache(prompt, cache=model.make_cache())
        first = model.diffusion_decoder_logits(canvas, cache=cache)
        # A second denoising step self-conditioned on the first (temperature 1: the processed
        # logits are the logits), through the model's own self-conditioning entry points.
        sc = model.diffusion_self_conditioning(
            first.astype(mx.float32), model.diffusion_prepare_self_conditioning()
        )
        second = model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=sc)
        short_cache = model.diffusion_prefill_cache(prompt[:, :short], cache=model.make_cache())
        third = model.diffusion_decoder_logits(canvas, cache=short_cache)
        res = {"logits": first, "logits_selfcond": second, "logits_short": third}
        res = {k: v.astype(mx.float32) for k, v in res.items()}
        mx.eval(res)
        return res


    model = load_model(Path(folder))
    tensors = {"prompt_ids": prompt, "canvas_ids": canvas}
    try:
        # As converted: bfloat16 activations.
        tensors.update({k + "_native": v for k, v in passes(model).items()})
    except RuntimeError as e:  # mlx's CPU gather_mm (unquantized experts) is float32-only
        print("native pass skipped:", e)
    model.set_dtype(mx.float32)  # every floating parameter, quantization scales/biases included
    tensors.update(passes(model))
    mx.save_safetensors(out, tensors, metadata={"made_by": "mlx-vlm " + mlx_vlm.__version__})
    print("reference logits:", ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    """
)


# mlx-vlm's own vision tower on fixed patches (two aspect ratios), features after its
# `embed_vision` projection: as converted (bfloat16, `*_native`) and after set_dtype(float32).
VISION_SNIPPET = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import mlx.core as mx
    import mlx_vlm
    import numpy as np
    from mlx_vlm.utils import load_model

    folder, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(7)
    tensors = {}
    for name, (h, w) in {"wide": (24, 36), "tall": (48, 12)}.items():
        model = load_model(Path(folder))
        enc = model.model.encoder
        p = model.config.vision_config.patch_size
        img = rng.integers(0, 256, (h, w, 3)).astype(np.float32) / 255.0
        rows, cols = h // p, w // p
        patches = img.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
        col, row = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        pos = np.stack([col, row], -1).reshape(-1, 2).astype(np.int32)
        for dtype, suffix in ((None, "_native"), (mx.float32, "")):
            if dtype is not None:
                model.set_dtype(dtype)
            feats = enc.embed_vision(enc.vision_tower(mx.array(patches)[None], mx.array(pos)[None]))
            tensors[f"{name}_features{suffix}"] = feats[0].astype(mx.float32)
        tensors[f"{name}_pixel_values"] = mx.array(patches)
        tensors[f"{name}_position_ids"] = mx.array(pos)
        tensors[f"{name}_grid"] = mx.array([rows, cols])
    mx.eval(tensors)
    mx.save_safetensors(out, tensors, metadata={"made_by": "mlx-vlm " + mlx_vlm.__version__})
    print("vision reference:", ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    """
)


def vision_reference(vlm_python: str, folder: Path, out: Path, work: Path) -> str:
    script = work / "vlm_vision_reference.py"
    script.write_text(VISION_SNIPPET)
    return run_vlm(vlm_python, [str(script), str(folder), str(out)], cwd=work)


def reference_logits(vlm_python: str, folder: Path, out: Path, work: Path) -> str:
    snippet = (
        REFERENCE_SNIPPET.replace("PROMPT", repr(PROMPT_IDS))
        .replace("CANVAS", repr(CANVAS_IDS))
        .replace("SHORT", repr(SHORT_PROMPT))
    )
    script = work / "vlm_reference.py"
    script.write_text(snippet)
    return run_vlm(vlm_python, [str(script), str(folder), str(out)], cwd=work)


def vlm_versions(vlm_python: str, work: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
        "['mlx-vlm', 'mlx', 'transformers', 'torch']}))"
    )
    return json.loads(run_vlm(vlm_python, ["-c", code], cwd=work).strip().splitlines()[-1])


def main_versions() -> dict[str, str]:
    import importlib.metadata as m

    return {p: m.version(p) for p in ("transformers", "torch", "tokenizers")}


# --------------------------------------------------------------------------------------------
# 4. README
# --------------------------------------------------------------------------------------------
README = """\
# mlx-vlm tiny fixture

A tiny DiffusionGemma checkpoint and its conversions by **mlx-vlm's own converter**, the tool
that made the mlx-community DiffusionGemma conversions. The tests use it to check that our
loader reads the other MLX port's files unmodified and the way mlx-vlm reads them.

Made by `scripts/make_mlxvlm_fixture.py` (rerun it to regenerate; seed {seed}).

| folder | what |
| --- | --- |
| `hf/` | Hugging Face checkpoint from `DiffusionGemmaForBlockDiffusion(config).to(torch.bfloat16).save_pretrained(...)` with transformers {hf_tf} / torch {hf_torch}; norm weights, router `scale` / `per_expert_scale` and the encoder's and decoder's `layer_scalar` buffers randomised; `config.json` rewritten to the released checkpoint's legacy `global_head_dim` / `num_global_key_value_heads` fields (transformers writes `per_layer_config`, which mlx-vlm 0.7.10 does not read) and `use_bidirectional_attention: "vision"`; 256-token `tokenizers` WordLevel tokenizer (tokenizers {hf_tok}) |
| `mlxvlm-4bit/` | `{cmd_q}` |
| `mlxvlm-bf16/` | `{cmd_bf16}` |
| `mlxvlm-*/reference_logits.safetensors` | added by the script (not by the converter): mlx-vlm's own decoder logits, float32 `[1, 8, 256]`, for the stored `prompt_ids` / `canvas_ids`, run in mlx-vlm's environment: `cache = model.diffusion_prefill_cache(prompt, cache=model.make_cache())`, `logits = model.diffusion_decoder_logits(canvas, cache=cache)`; `logits_selfcond`: a second step with `self_conditioning=model.diffusion_self_conditioning(logits, model.diffusion_prepare_self_conditioning())`; `logits_short`: the first {short} prompt tokens only (inside the sliding window). Unsuffixed: after `model.set_dtype(mx.float32)` (float32 activations); `*_native`: as converted (bfloat16 activations; only for the 4-bit folder, as mlx's CPU `gather_mm` is float32-only) |
| `mlxvlm-*/vision_reference.safetensors` | added by the script: mlx-vlm's own vision tower and `embed_vision` on fixed patches of two random images (24x36 and 48x12 pixels, 4-pixel patches, (column, row) position ids): `enc.embed_vision(enc.vision_tower(patches[None], positions[None]))`, float32 (`*_features`, after `set_dtype(mx.float32)`) and as converted (`*_features_native`, bfloat16), with the inputs |

What mlx-vlm's `-q` wrote (its DiffusionGemma `quant_predicate`): config.json `quantization`
(duplicated as `quantization_config`) = `{{"group_size": 64, "bits": 4, "mode": "affine"}}` plus a
per-module override `{{"group_size": 64, "bits": 8}}` for `model.decoder.embed_tokens` and every
layer's `self_attn.{{q,k,v,o}}_proj`, `mlp.{{gate,up,down}}_proj` and `router.proj`; the fused
experts (`experts.gate_up_proj` `[E, 2I, D]`, `experts.down_proj` `[E, D, I]`, each with
`.weight` / `.scales` / `.biases`) and `self_conditioning.{{gate,up,down}}_proj` take the default
4 bits; norms, router `scale` / `per_expert_scale`, `layer_scalar`s and the vision tower stay
bfloat16. Tensor names are the Hugging Face ones, with `.weight` added to the bare expert tensors.

The conversions ran in a separate virtual environment with mlx-vlm {vlm} (mlx {vlm_mlx},
transformers {vlm_tf}, torch {vlm_torch} CPU). Everything in `mlxvlm-*` except
`reference_logits.safetensors` is exactly what the converter wrote.

Text config: {text}, `initializer_range` {init} (instead of 0.02, so the logits spread over a
few units).


Vision config (Gemma 4 vision, stored in bfloat16 by mlx-vlm): {vision}; `canvas_length` {canvas}.

Size: {size} bytes in all.
"""


def dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vlm-python", default="/work/vlmvenv/bin/python",
                    help="python of the environment with mlx-vlm 0.7.10 installed")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-bf16", action="store_true", help="skip the unquantized conversion")
    ap.add_argument("--vision-only", action="store_true",
                    help="only (re)write vision_reference.safetensors into the existing mlxvlm-* folders")
    args = ap.parse_args()

    if args.vision_only:
        with tempfile.TemporaryDirectory() as tmp:
            for folder in sorted(args.out.glob("mlxvlm-*")):
                print(vision_reference(args.vlm_python, folder, folder / "vision_reference.safetensors",
                                       Path(tmp)).strip())
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf = work / "hf"
        hf.mkdir()
        build_hf(hf)
        print("built", hf)
        versions = vlm_versions(args.vlm_python, work)
        if versions["mlx-vlm"] != "0.7.10":
            raise SystemExit(f"expected mlx-vlm 0.7.10 in {args.vlm_python}, found {versions['mlx-vlm']}")
        variants = {"mlxvlm-4bit": True} if args.no_bf16 else {"mlxvlm-4bit": True, "mlxvlm-bf16": False}
        for name, q in variants.items():
            out = work / name
            log = run_vlm(args.vlm_python, convert_cmd(hf, out, q), cwd=work)
            print(log.strip())
            print(reference_logits(args.vlm_python, out, work / f"{name}-reference.safetensors", work).strip())
            print(vision_reference(args.vlm_python, out, work / f"{name}-vision.safetensors", work).strip())

        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        shutil.copytree(hf, args.out / "hf")
        for name in variants:
            shutil.copytree(work / name, args.out / name)
            shutil.copy(work / f"{name}-reference.safetensors", args.out / name / "reference_logits.safetensors")
            shutil.copy(work / f"{name}-vision.safetensors", args.out / name / "vision_reference.safetensors")

    main_v = main_versions()
    shown = lambda cmd: "python " + " ".join(cmd).replace(str(hf), "hf").replace(str(work) + "/", "")  # noqa: E731
    readme = README.format(
        seed=SEED,
        hf_tf=main_v["transformers"], hf_torch=main_v["torch"], hf_tok=main_v["tokenizers"],
        cmd_q=shown(convert_cmd(hf, work / "mlxvlm-4bit", True)),
        cmd_bf16=shown(convert_cmd(hf, work / "mlxvlm-bf16", False)) if not args.no_bf16 else "(not made)",
        vlm=versions["mlx-vlm"], vlm_mlx=versions["mlx"], vlm_tf=versions["transformers"],
        vlm_torch=versions["torch"],
        short=SHORT_PROMPT, init=INIT_RANGE,
        text=json.dumps(TEXT_CONFIG), vision=json.dumps(VISION_CONFIG), canvas=CANVAS_LENGTH,
        size="{size}",
    )
    size = -1
    while size != dir_size(args.out):  # the README holds the total size, itself included
        size = dir_size(args.out)
        (args.out / "README.md").write_text(readme.replace("{size}", str(size)))
    print(f"wrote {args.out} ({size} bytes)")


if __name__ == "__main__":
    main()
