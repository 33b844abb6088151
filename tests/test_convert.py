"""`mlx_diffusiongemma.convert`: HF checkpoint -> MLX folder, streamed, atomic, loadable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma.model import model as W
from mlx_diffusiongemma.convert import ConvertReport, convert, projected_size
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.checkpoint.loading import load_model

sys.path.insert(0, str(Path(__file__).parent))
from helpers_convert import AUX_FILES, build_hf_checkpoint, build_synthetic_checkpoint  # noqa: E402

RECIPES = ("bf16", "8bit", "mixed-4bit")
SHARD = 150_000  # bytes: the tiny model's conversions span several shards
_RNG = np.random.default_rng(0)
PROMPT = _RNG.integers(0, 256, size=12).tolist()  # longer than the sliding window (8)
CANVAS = _RNG.integers(0, 256, size=48).tolist()
# The second pass gets the same self-conditioning input in every model (as if the previous step's
# processed logits had been these), so differences come from the weights only.
SELF_COND = (4.0 * _RNG.standard_normal((1, len(CANVAS), 256))).astype(np.float32)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_src(work) -> Path:
    """bfloat16, like the released checkpoint, saved in several shards."""
    return build_hf_checkpoint(work / "hf", max_shard_size="200KB")


@pytest.fixture(scope="module")
def converted(work, hf_src) -> dict[str, tuple[Path, ConvertReport]]:
    out = {}
    for recipe in RECIPES:
        dst = work / f"mlx-{recipe}"
        out[recipe] = (dst, convert(hf_src, dst, recipe=recipe, shard_size_bytes=SHARD))
    return out


def _logits(model) -> tuple[np.ndarray, np.ndarray]:
    """Decoder logits of a first step and of a self-conditioned step."""
    cache = model.prefill(PROMPT)
    first = model.denoise(CANVAS, cache)
    second = model.denoise(CANVAS, cache, self_conditioning=mx.array(SELF_COND))
    mx.eval(first, second)
    return np.array(first), np.array(second)


def _params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _assert_same_model(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert set(pa) == set(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


@pytest.fixture(scope="module")
def reference_logits(hf_src):
    model, _ = load_model(hf_src, dtype=mx.float32)
    return _logits(model)


# -- (1) round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_matches_in_memory_load(converted, hf_src, recipe):
    """The converted folder is the model `load_model(src, quantize=recipe)` builds in memory."""
    dst, _ = converted[recipe]
    model, _ = load_model(dst)
    in_memory, _ = load_model(hf_src, quantize=None if recipe == "bf16" else recipe)
    _assert_same_model(model, in_memory)
    for a, b in zip(_logits(model), _logits(in_memory)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)  # same weights, same graph


# Tiny random models amplify any perturbation (attention scale 1.0 on random q/k, near-tied
# top-2 routing over 4 experts): even bf16 rounding moves single logits by a few units. A
# mapping error would leave ~1/256 top-1 agreement and no correlation; these bounds sit well
# above that and below what was measured on 48 positions (top-1 / correlation: bf16 0.88-0.92 /
# 0.990-0.996, 8bit 0.75-0.77 / 0.94-0.97, mixed-4bit 0.58-0.67 / 0.91-0.92).
_AGREEMENT = {"bf16": 0.7, "8bit": 0.55, "mixed-4bit": 0.4}
_CORRELATION = {"bf16": 0.97, "8bit": 0.88, "mixed-4bit": 0.8}


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_against_float32(converted, reference_logits, recipe):
    dst, _ = converted[recipe]
    model, _ = load_model(dst)
    for step, (got, ref) in enumerate(zip(_logits(model), reference_logits)):
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        corr = float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])
        err = float(np.abs(got - ref).mean())
        print(f"{recipe} step {step + 1}: top-1 agreement {agree:.3f}, corr {corr:.4f}, mean |diff| {err:.3f}")
        assert agree >= _AGREEMENT[recipe]
        assert corr >= _CORRELATION[recipe]


def test_float32_source_is_cast_to_bfloat16_before_quantizing(work):
    src = build_hf_checkpoint(work / "hf-f32", dtype="float32", seed=1, max_shard_size="10MB")
    for recipe in ("bf16", "mixed-4bit"):
        dst = work / f"f32-{recipe}"
        convert(src, dst, recipe=recipe)
        model, _ = load_model(dst)
        in_memory, _ = load_model(src, dtype=mx.bfloat16, quantize=None if recipe == "bf16" else recipe)
        _assert_same_model(model, in_memory)
        floats = [v for v in _params(model).values() if mx.issubdtype(v.dtype, mx.floating)]
        assert floats and all(v.dtype == mx.bfloat16 for v in floats)


def test_quantization_block(converted):
    dst, _ = converted["mixed-4bit"]
    config = json.loads((dst / "config.json").read_text())
    q = config["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == q
    assert config["vision_config"] == json.loads((dst.parent / "hf" / "config.json").read_text())["vision_config"]
    assert q["model.encoder.vision_tower.encoder.layers.0.self_attn.q_proj.linear"] is False  # bf16
    assert config["text_config"] == json.loads((dst.parent / "hf" / "config.json").read_text())["text_config"]
    assert q["model.decoder.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 8}
    assert q["model.decoder.embed_tokens"] == {"group_size": 64, "bits": 8}
    assert q["model.decoder.layers.1.router.proj"] == {"group_size": 64, "bits": 8}
    assert "model.decoder.layers.0.experts.gate_up_proj" not in q  # the default, 4 bits
    # intermediate_size 96 is not a multiple of 64: these stay bfloat16 and say so.
    assert q["model.decoder.layers.0.mlp.down_proj"] is False
    assert q["model.decoder.self_conditioning.down_proj"] is False

    model, _ = load_model(dst)
    layer = model.model.decoder.layers[0]
    assert layer.experts.gate_up_proj.bits == 4 and layer.experts.down_proj.bits == 4
    assert model.model.decoder.self_conditioning.gate_proj.bits == 4
    assert layer.self_attn.q_proj.bits == 8 and model.model.decoder.embed_tokens.bits == 8
    assert layer.router.proj.bits == 8
    assert not hasattr(layer.mlp.down_proj, "scales")
    assert layer.router.scale.dtype == mx.bfloat16 and layer.layer_scalar.dtype == mx.bfloat16

    for recipe, bits in (("8bit", 8), ("bf16", None)):
        cfg = json.loads((converted[recipe][0] / "config.json").read_text())
        if bits is None:
            assert "quantization" not in cfg and "quantization_config" not in cfg
        else:
            assert cfg["quantization"]["bits"] == bits
            assert cfg["quantization"]["model.decoder.layers.0.mlp.down_proj"] is False


def test_layer_scalars_survive(converted, hf_src):
    """Encoder and decoder layer scalars are distinct tensors and both reach the model."""
    src = {}
    for f in hf_src.glob("*.safetensors"):
        src.update(mx.load(str(f)))
    model, _ = load_model(converted["mixed-4bit"][0])
    for i in range(3):
        enc = src[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        dec = src[f"model.decoder.layers.{i}.layer_scalar"]
        assert not mx.array_equal(enc, dec).item()
        assert mx.array_equal(model.model.encoder.language_model.layers[i].layer_scalar, enc).item()
        assert mx.array_equal(model.model.decoder.layers[i].layer_scalar, dec).item()


# -- (5) vision, sharding, report ---------------------------------------------------------------


def _source_keys(folder: Path) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return list(index["weight_map"])


def test_shards_index_and_report(converted, hf_src):
    source_keys = _source_keys(hf_src)
    vision = [k for k in source_keys if W.is_vision_key(k)]
    assert vision
    for recipe, (dst, report) in converted.items():
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert shards == report.shards and len(shards) >= 2
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        total = 0
        names = set()
        for shard in shards:
            alone = [k for k, f in index["weight_map"].items() if f == shard]
            # A tensor larger than a shard (the vision position table) gets a shard of its own.
            assert (dst / shard).stat().st_size <= SHARD or len(alone) == 1
            tensors = mx.load(str(dst / shard))
            assert all(index["weight_map"][k] == shard for k in tensors)
            names |= set(tensors)
            total += sum(v.nbytes for v in tensors.values())
        assert names == set(index["weight_map"])
        assert index["metadata"]["total_size"] == total == report.weight_bytes
        assert {k for k in names if W.is_vision_key(k)} == set(vision)  # kept, under the same names
        assert sorted(p.name for p in dst.iterdir() if p.suffix == ".safetensors") == shards

        assert report.destination == dst and report.recipe == recipe
        assert report.tensors_written == len(names)
        assert report.vision_tensors_written == len(vision) and report.vision_tensors_skipped == 0
        assert sum(report.parameters_by_bits.values()) == report.parameters_written
        assert index["metadata"]["total_parameters"] == report.parameters_written
        assert report.bits_per_weight == pytest.approx(8 * report.weight_bytes / report.parameters_written)
        assert report.bytes_on_disk == sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        for name in ["generation_config.json", *AUX_FILES]:
            assert (dst / name).read_bytes() == (hf_src / name).read_bytes()
            assert name in report.copied_files
        assert not list(dst.parent.glob(f"{dst.name}.partial-*"))

        est = projected_size(json.loads((hf_src / "config.json").read_text()), recipe)
        assert est.bytes == report.weight_bytes
        assert est.parameters == report.parameters_written
        assert est.parameters_by_bits == report.parameters_by_bits

    assert set(converted["bf16"][1].parameters_by_bits) == {16}
    assert set(converted["8bit"][1].parameters_by_bits) == {8, 16}
    assert set(converted["mixed-4bit"][1].parameters_by_bits) == {4, 8, 16}


def test_progress_callback(work, hf_src):
    calls = []
    convert(hf_src, work / "progress", recipe="bf16",
            progress=lambda *a: calls.append(a))
    assert calls[0][0] == 0 and calls[0][2] == 0
    done_t, total_t, done_b, total_b = calls[-1]
    assert done_t == total_t == len(_source_keys(hf_src)) and done_b == total_b > 0
    assert all(a[0] <= b[0] and a[2] <= b[2] for a, b in zip(calls, calls[1:]))


def test_projected_size_of_the_released_model():
    config = {
        "model_type": "diffusion_gemma",
        "text_config": dict(vocab_size=262144, hidden_size=2816, num_hidden_layers=30,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                            global_head_dim=512, num_global_key_value_heads=2, intermediate_size=2112,
                            num_experts=128, top_k_experts=8, moe_intermediate_size=704),
    }
    sizes = {r: projected_size(config, r) for r in RECIPES}
    for r, s in sizes.items():
        print(f"26B-A4B {r}: {s.bytes / 1e9:.2f} GB, {s.bits_per_weight:.3f} bits/weight, {s.parameters_by_bits}")
    assert sizes["bf16"].parameters == sizes["mixed-4bit"].parameters
    assert 25.0e9 < sizes["bf16"].parameters < 25.5e9
    assert sizes["bf16"].bits_per_weight == 16
    assert 8.49 < sizes["8bit"].bits_per_weight < 8.51
    assert 4.5 < sizes["mixed-4bit"].bits_per_weight < 5.0
    assert sizes["mixed-4bit"].bytes < 16e9


# -- (3) atomic output ------------------------------------------------------------------------------


def test_existing_destination_refused_and_force_replaces(work, hf_src):
    dst = work / "existing"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    # --force replaces only what looks like a model folder (issue 14): config.json and weights.
    (dst / "config.json").write_text("{}")
    (dst / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(hf_src, dst, recipe="bf16")
    assert (dst / "keep.txt").read_text() == "old"
    report = convert(hf_src, dst, recipe="bf16", force=True)
    assert report.replaced_existing
    assert not (dst / "keep.txt").exists()
    load_model(dst)
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("existing")) == ["existing"]


class _Stop(Exception):
    pass


def _fail_after(n: int, exc: type[BaseException]):
    def progress(done, total, done_bytes, total_bytes):
        if done >= n:
            raise exc("stop")
    return progress


@pytest.mark.parametrize("exc", [_Stop, KeyboardInterrupt])
def test_interrupted_run_leaves_nothing(work, hf_src, exc):
    dst = work / f"interrupted-{exc.__name__}"
    with pytest.raises(exc):
        convert(hf_src, dst, recipe="mixed-4bit", shard_size_bytes=SHARD, progress=_fail_after(60, exc))
    assert not dst.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(dst.name)]


def test_interrupted_forced_run_keeps_the_old_folder(work, hf_src):
    dst = work / "interrupted-forced"
    convert(hf_src, dst, recipe="bf16")
    before = sorted(p.name for p in dst.iterdir())
    with pytest.raises(_Stop):
        convert(hf_src, dst, recipe="mixed-4bit", force=True, progress=_fail_after(10, _Stop))
    assert sorted(p.name for p in dst.iterdir()) == before
    assert "quantization" not in json.loads((dst / "config.json").read_text())
    assert [p.name for p in work.iterdir() if p.name.startswith(dst.name)] == [dst.name]


def test_destination_must_not_be_the_source(work, hf_src):
    with pytest.raises(CheckpointError, match="source"):
        convert(hf_src, hf_src, force=True)
    assert (hf_src / "config.json").exists()


# -- (4) errors ---------------------------------------------------------------------------------------


def test_missing_source_folder(work):
    with pytest.raises(CheckpointError, match="no such folder"):
        convert(work / "nope", work / "nope-out")
    assert not (work / "nope-out").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_other_model_type_rejected(work, hf_src):
    src = _copy(hf_src, work / "gemma3")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gemma3"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gemma3"):
        convert(src, work / "gemma3-out")
    assert not (work / "gemma3-out").exists()


def test_truncated_source_rejected(work, hf_src):
    src = _copy(hf_src, work / "truncated")
    shard = sorted(src.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, work / "truncated-out")
    assert not [p for p in work.iterdir() if p.name.startswith("truncated-out")]


def test_missing_shard_and_mismatched_config_rejected(work, hf_src):
    src = _copy(hf_src, work / "missing-shard")
    sorted(src.glob("*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        convert(src, work / "missing-shard-out")

    src = _copy(hf_src, work / "wrong-config")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    config["text_config"]["layer_types"] = config["text_config"]["layer_types"][:2]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        convert(src, work / "wrong-config-out")
    assert not [p for p in work.iterdir() if p.name.startswith(("missing-shard-out", "wrong-config-out"))]


def test_already_quantized_source_rejected(work, converted):
    with pytest.raises(CheckpointError, match="already quantized"):
        convert(converted["mixed-4bit"][0], work / "requantized")


def test_converted_bf16_folder_converts_again(work, converted):
    """Our own bf16 output (fused `.weight` expert names) is a valid source."""
    dst = work / "from-bf16"
    convert(converted["bf16"][0], dst, recipe="mixed-4bit")
    _assert_same_model(load_model(dst)[0], load_model(converted["mixed-4bit"][0])[0])


def test_pickles_never_loaded(work):
    src = work / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma", "text_config": {}}))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        convert(src, work / "pickled-out")


# -- (2) memory bound -------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    import mlx.core as mx
    from mlx_diffusiongemma.convert import convert

    def rss(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None

    src, dst, shard, recipe = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    # Linux: reset this process's RSS high-water mark (VmHWM) so that the imports' peak does not
    # hide the conversion's. Not ru_maxrss: Linux carries it over exec from the parent (pytest,
    # hundreds of MB). Elsewhere fall back to ru_maxrss, which can only under-state growth
    # (the MLX peak below is checked too).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss("VmRSS")
    except OSError:
        base = None
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    ru_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    samples = []
    report = convert(src, dst, recipe=recipe, shard_size_bytes=shard,
                     progress=lambda *a: samples.append(rss("VmRSS") or 0))
    if base is not None:  # VmRSS is sampled too: the kernel updates VmHWM lazily
        peak = max(rss("VmHWM"), *samples)
    else:
        base, peak = ru_base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    print(json.dumps({"base": base, "peak": peak, "mlx_peak": mx.get_peak_memory(),
                      "shards": len(report.shards), "weight_bytes": report.weight_bytes}))
    """
)

_BIG = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=64,
    num_experts=8, top_k_experts=2, moe_intermediate_size=256,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2,
)


def test_peak_memory_is_bounded_by_the_shard_size(work):
    """A ~52 MB bfloat16 checkpoint converts with 4 MB shards in far less than its size."""
    src = work / "big"
    source_bytes = build_synthetic_checkpoint(src, _BIG, file_size=16 << 20)
    shard = 4 << 20
    assert source_bytes > 12 * shard
    bound = 2 * shard + (16 << 20)  # one shard buffered, the tensor in flight, interpreter noise
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    for recipe in ("bf16", "mixed-4bit"):
        dst = work / f"big-{recipe}"
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(src), str(dst), str(shard), recipe],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        growth = m["peak"] - m["base"]
        print(
            f"{recipe}: source {source_bytes / 2**20:.1f} MiB, output {m['weight_bytes'] / 2**20:.1f} MiB "
            f"in {m['shards']} shards of <= {shard / 2**20:.0f} MiB; peak RSS growth {growth / 2**20:.1f} MiB "
            f"(bound {bound / 2**20:.0f} MiB), MLX peak {m['mlx_peak'] / 2**20:.1f} MiB"
        )
        assert growth <= bound
        assert m["mlx_peak"] <= 3 * shard
        assert m["shards"] >= 4
        model, _ = load_model(dst)  # and the result loads
        assert model.text.num_hidden_layers == 12
        shutil.rmtree(dst)


def test_stale_partial_folder_of_a_killed_run_is_removed(tmp_path):
    """A conversion killed with SIGKILL leaves DST.partial-<pid>; the next run removes it."""
    src = build_hf_checkpoint(tmp_path / "src")
    dst = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"out.partial-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    report = convert(src, dst, recipe="bf16")
    assert not stale.exists() and (dst / "config.json").exists()
    assert any("interrupted conversion" in m for m in report.messages)
