"""Fast mode: the live-row decoder pass, the top-k sampler math, bucketing and the block loop."""

from __future__ import annotations

from dataclasses import asdict, replace

import mlx.core as mx
import numpy as np
import pytest

from conftest import build_reference, save_checkpoint, sharpen, tiny_text_config
from mlx_diffusiongemma import generate, load
from mlx_diffusiongemma.demo.random import ensure_demo
from mlx_diffusiongemma.diffusion.engine import Request, run
from mlx_diffusiongemma.diffusion.events import GenerationResult, StepEvent
from mlx_diffusiongemma.diffusion.fast import bucket_rows
from mlx_diffusiongemma.diffusion.options import FastOptions, SamplerOptions
from mlx_diffusiongemma.diffusion.topk import top_k_two_stage
from mlx_diffusiongemma.checkpoint.loading import load_model
from mlx_diffusiongemma.model.args import GenerationDefaults
from mlx_diffusiongemma.prompts.render import render_messages


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = build_reference(tiny_text_config(), canvas_length=16, seed=1)
    model, _ = load_model(save_checkpoint(ref, tmp_path_factory.mktemp("fast") / "ckpt"), dtype=mx.float32)
    return model


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    ref = build_reference(tiny_text_config(), canvas_length=8, seed=4)
    sharpen(ref)
    model, _ = load_model(save_checkpoint(ref, tmp_path_factory.mktemp("fast") / "sharp"), dtype=mx.float32)
    return model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load(ensure_demo(tmp_path_factory.mktemp("fastdemo") / "demo"))


def _canvas(model, seed=0):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, model.vocab_size, (1, model.canvas_length)))


def test_all_live_rows_equal_the_full_decoder_pass(tiny):
    cache = tiny.prefill(mx.arange(20) + 5)
    canvas = _canvas(tiny)
    first = tiny.denoise(canvas, cache)
    sc = first / 0.6
    full = tiny.denoise(canvas, cache, sc)
    rows = tiny.denoise_rows(canvas, mx.arange(16), cache, tiny.make_canvas_kv(), tiny.soft_embeddings(sc))
    np.testing.assert_allclose(np.array(rows), np.array(full), atol=1e-5, rtol=1e-5)
    # Rows in another order, plus padding rows (slot C), give the same logits per row.
    order = [15, 3, 0, 9, 16, 16]
    kv = tiny.make_canvas_kv()
    tiny.denoise_rows(canvas, mx.arange(16), cache, kv, tiny.soft_embeddings(sc))
    part = tiny.denoise_rows(canvas, mx.array(order), cache, kv, tiny.soft_embeddings(sc[:, [15, 3, 0, 9, 0, 0]]))
    np.testing.assert_allclose(np.array(part[:, :4]), np.array(full[:, [15, 3, 0, 9]]), atol=1e-5, rtol=1e-5)


def test_live_rows_read_the_frozen_rows_kv_from_their_last_pass(tiny):
    """Frozen rows are not recomputed: changing their token after their last pass changes
    nothing for the live rows, while the full pass sees the change."""
    cache = tiny.prefill(mx.arange(12) + 3)
    canvas = _canvas(tiny, 1)
    kv = tiny.make_canvas_kv()
    tiny.denoise_rows(canvas, mx.arange(16), cache, kv)
    live = mx.array([1, 2, 5])
    stale = tiny.denoise_rows(canvas, live, cache, kv)
    changed = mx.array(np.where(np.arange(16) == 7, (np.array(canvas)[0] + 1) % tiny.vocab_size, np.array(canvas)[0])[None])
    again = tiny.denoise_rows(changed, live, cache, kv)
    np.testing.assert_array_equal(np.array(stale), np.array(again))
    full = tiny.denoise(changed, cache)
    assert float(mx.abs(full[:, [1, 2, 5]] - again).max()) > 1e-4


def test_per_row_rope_positions_equal_consecutive_ones(tiny):
    attn = tiny.layers[2].self_attn  # a full-attention layer (proportional RoPE)
    x = mx.random.normal((1, 6, tiny.text.hidden_size), key=mx.random.key(0))
    q, k, _ = attn.qkv(x, 40)
    q2, k2, _ = attn.qkv(x, mx.arange(40, 46))
    np.testing.assert_allclose(np.array(q), np.array(q2), atol=1e-5)
    np.testing.assert_allclose(np.array(k), np.array(k2), atol=1e-5)


@pytest.mark.parametrize("vocab,k,chunk", [(1000, 64, 128), (1000, 7, 2048), (50, 64, 16), (4099, 16, 512)])
def test_two_stage_top_k_is_exact(vocab, k, chunk):
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((2, 5, vocab)).astype(np.float32)
    x[0, 0, [3, 900 % vocab]] = 9.0  # a tie at the top: the lower id comes first, like argmax
    vals, idx = top_k_two_stage(mx.array(x), k, chunk=chunk)
    kk = min(k, vocab)
    ref_idx = np.argsort(-x, axis=-1, kind="stable")[..., :kk]
    np.testing.assert_array_equal(np.array(idx), ref_idx)
    np.testing.assert_array_equal(np.array(vals), np.take_along_axis(x, ref_idx, -1))
    assert int(np.array(idx)[0, 0, 0]) == int(np.argmax(x[0, 0]))


def test_top_k_sampler_decides_as_the_full_one_when_the_tail_is_empty():
    """With every token outside the top k at zero probability, the top-k sampler math makes the
    full-vocabulary decisions on the same uniforms: the draw (inverse CDF in token-id order, as
    `sampler.draw_tokens`), argmax, top-2 gap, entropy, acceptance and next input."""
    from mlx_diffusiongemma.diffusion.sampler import compiled_step

    rng = np.random.default_rng(0)
    rows, vocab, k = 48, 800, 64
    logits = np.full((1, rows, vocab), -np.inf, dtype=np.float32)
    for r in range(rows):  # 40 live tokens per row at random ids, some rows sharp, some flat
        ids = rng.choice(vocab, 40, replace=False)
        logits[0, r, ids] = rng.normal(size=40) * rng.choice([0.5, 3.0, 10.0])
    args = (mx.array(logits), mx.array(rng.integers(0, vocab, (1, rows)), dtype=mx.int32), mx.array(0.6),
            mx.array(rng.random((1, rows)), dtype=mx.float32), mx.array(rng.integers(0, vocab, (1, rows)), dtype=mx.int32))
    rows_kw = dict(valid=mx.ones((1, rows), dtype=mx.bool_), pinned=mx.zeros((1, rows), dtype=mx.bool_),
                   ids=mx.zeros((1, rows), dtype=mx.int32), with_gap=True)
    full = compiled_step(*args, 0.1, **rows_kw)
    top = compiled_step(*args, 0.1, top_k=k, **rows_kw)
    for name in ("next_canvas", "argmax", "accepted"):
        assert getattr(top, name).tolist() == getattr(full, name).tolist(), name
    np.testing.assert_allclose(np.array(top.gap), np.array(full.gap), rtol=1e-6)
    # The top-k entropy bounds the float32 rounding of the tail mass (~1e-7) from above.
    np.testing.assert_allclose(np.array(top.token_entropy), np.array(full.token_entropy), rtol=1e-4, atol=5e-5)
    assert (np.array(top.token_entropy) >= np.array(full.token_entropy) - 1e-6).all()
    assert 0 < int(full.accepted.sum().item()) < rows  # the acceptance rule really chose
    # Every row accepted: the next inputs are the draws themselves, flat rows included.
    draws_full = compiled_step(*args, 1e9, **rows_kw).next_canvas
    draws_top = compiled_step(*args, 1e9, top_k=k, **rows_kw).next_canvas
    assert draws_top.tolist() == draws_full.tolist()
    assert (draws_full != full.argmax).sum().item() > 5  # not just the argmax


def test_bucket_rows_bounds_the_number_of_shapes():
    for c in (32, 64, 256):
        sizes = {bucket_rows(n, c) for n in range(1, c + 1)}
        assert all(bucket_rows(n, c) >= n for n in range(1, c + 1))
        assert max(sizes) == c and len(sizes) <= 14
    assert bucket_rows(0, 64) == 0


def _events(model, **kw):
    req = Request([2, 5, 17, 30, 44, 9, 6], max_tokens=3 * model.canvas_length, seed=4,
                  sampler=SamplerOptions(max_denoising_steps=12), **kw)
    events = list(run(model, req))
    return events[-1], [e for e in events if isinstance(e, StepEvent)]


@pytest.mark.parametrize("which", ["demo", "sharp"])
def test_every_technique_off_gives_the_exact_path(which, demo, sharp):
    model = demo[0] if which == "demo" else sharp
    exact, exact_steps = _events(model)
    none, none_steps = _events(model, fast=FastOptions.none())
    assert none.tokens == exact.tokens and none.steps_per_block == exact.steps_per_block
    assert [e.argmax.tolist() for e in none_steps] == [e.argmax.tolist() for e in exact_steps]
    assert [e.canvas.tolist() for e in none_steps] == [e.canvas.tolist() for e in exact_steps]
    assert none.live_rows == [[model.canvas_length] * s for s in exact.steps_per_block]


def test_frozen_positions_keep_their_token_and_leave_the_decoder(sharp):
    exact, _ = _events(sharp)
    result, steps = _events(sharp, fast=FastOptions.few_steps())  # no thaw: a frozen row stays frozen
    c = sharp.canvas_length
    frozen_at: dict[tuple[int, int], int] = {}
    last_block, prev = -1, None
    for e in steps:
        if e.block != last_block:
            last_block, prev = e.block, None
        assert e.live_rows is not None and 1 <= e.live_rows <= c
        if prev is not None:
            assert e.live_rows <= prev.live_rows  # the live set only shrinks
        prev = e
    for block_trace in result.live_rows:
        assert block_trace[0] == c
    computed = sum(sum(t) for t in result.live_rows)
    assert computed < c * sum(exact.steps_per_block)
    assert len(result.tokens) == len(exact.tokens)
    print(f"\nsharpened: exact {sum(exact.steps_per_block)} steps x {c} rows; fast rows {result.live_rows}")


class _Scripted:
    """A stand-in model whose decoder predicts a fixed answer with an EOS at position 4; rows
    after it get fresh random logits at every call (uncertain forever), like the padding tail
    of a canvas that has not settled."""

    canvas_length = 12
    vocab_size = 40
    embed_dtype = mx.float32
    generation = GenerationDefaults()

    def __init__(self, gap=30.0):
        self.answer = mx.array([7, 8, 9, 10, 1] + [20] * 7)
        self.gap = gap
        self.calls = 0
        self.text = type("T", (), {"max_position_embeddings": 4096})()

    def make_cache(self):
        from mlx_diffusiongemma.model.cache import PromptCache

        return PromptCache([])

    def extend(self, cache, ids, chunk_size=512, **_):  # image_features etc.: no encoder here
        cache.length += len(ids)

    def make_canvas_kv(self):
        from mlx_diffusiongemma.model.cache import CanvasKV

        return CanvasKV([], [])

    def _logits(self, rows):
        self.calls += 1
        key = mx.random.key(self.calls)
        noise = mx.random.normal((1, len(rows), self.vocab_size), key=key) * 0.1
        sure = mx.eye(self.vocab_size)[self.answer[mx.minimum(rows, 11)]][None] * self.gap
        return mx.where((rows < 5)[None, :, None], sure, noise)

    def denoise(self, canvas, cache, self_conditioning=None, **_):
        return self._logits(mx.arange(self.canvas_length))

    def denoise_rows(self, canvas, rows, cache, kv, soft=None):
        return self._logits(rows)

    def soft_embeddings(self, x, top_k=None):
        return mx.zeros((*x.shape[:-1], 4))

    def soft_embeddings_top_k(self, idx, logp):
        return mx.zeros((*idx.shape[:-1], 4))


def _certain(answer):
    """A scripted model sure of `answer` at every position (top-2 gap 30), tail included."""
    model = _Scripted()
    model.answer = mx.array(answer)
    model._logits = lambda rows: mx.eye(40)[model.answer[mx.minimum(rows, 11)]][None] * 30.0
    return model


def few(**changes) -> FastOptions:
    """The few-step setting with some techniques changed: the technique tests below isolate one
    technique each, without the bound window of the default (tested on its own further down)."""
    return replace(FastOptions.few_steps(), **changes)


def _scripted(mode, fast=None, steps=10):
    model = _Scripted()
    req = Request([3, 4], max_tokens=12, seed=0, fast=(fast or few()) if mode == "fast" else None,
                  sampler=SamplerOptions(max_denoising_steps=steps, confidence_threshold=0.5))
    return list(run(model, req))[-1]


def test_a_settled_eos_ends_the_canvas():
    exact = _scripted("exact")
    assert exact.steps_per_block == [10]  # the uncertain tail never lets the reference stop
    for fast in (few(eos_stop=True, freeze=True, commit_gap=None),
                 few(eos_stop=True, freeze=False, top_k=None, commit_gap=None)):
        result = _scripted("fast", fast)
        assert result.tokens == [7, 8, 9, 10, 1] == exact.tokens
        assert result.steps_per_block[0] < 10
        assert sum(result.live_rows[0]) < 12 * 10
        print(f"\n{fast}: steps {result.steps_per_block}, rows {result.live_rows}")
    no_eos = _scripted("fast", few(eos_stop=False, commit_gap=None))
    assert no_eos.steps_per_block == [10]
    # Early commit looks only up to a certain EOS: the uncertain tail after it does not block it.
    early = _scripted("fast", few(commit_gap=5.0))
    assert early.tokens == exact.tokens and early.steps_per_block == [1]
    assert _scripted("fast", few(commit_gap=5.0, eos_stop=False)).steps_per_block == [10]


def test_a_certain_eos_tail_freezes_at_first_sight():
    """A tail of sure end tokens that reaches the canvas's end is frozen after the step that
    predicts it (the first), not after it settles: the second step computes the answer rows only.
    An uncertain row after the EOS keeps the tail live, as does a non-end token."""
    def go(model, fast):
        req = Request([3, 4], max_tokens=12, seed=0, fast=fast,
                      sampler=SamplerOptions(max_denoising_steps=10))
        return list(run(model, req))[-1]

    answer = [7, 8, 9, 10, 1] + [1] * 7
    late = go(_certain(answer), few(eos_tail_gap=None, commit_gap=None))
    early = go(_certain(answer), few(commit_gap=None))
    assert early.tokens == late.tokens == [7, 8, 9, 10, 1]
    assert late.live_rows == [[12, 12]]
    assert early.live_rows == [[12, 4]]
    # A sure EOS at 2, but position 6 is not an end token: only the suffix from 7 is a tail.
    mixed = go(_certain([7, 8, 1, 1, 1, 1, 9] + [1] * 5), few(eos_stop=False, freeze=False, commit_gap=None))
    assert mixed.live_rows[0][:2] == [12, 7]
    # An uncertain tail (fresh noise after the EOS at every call) is never frozen at first sight.
    assert _scripted("fast", few(freeze=False, commit_gap=None)).live_rows[0][1] == 12
    # With stop_at_eos off (templates, infill), end tokens are content: nothing freezes early.
    req = Request([3, 4], max_tokens=12, seed=0, fast=few(commit_gap=None), stop_at_eos=False,
                  sampler=SamplerOptions(max_denoising_steps=10))
    assert list(run(_certain(answer), req))[-1].live_rows[0][1] > 4


def test_the_stop_mean_counts_frozen_rows_as_certain():
    """With the certain EOS tail frozen, the stop test's mean entropy divides by the whole canvas
    (the frozen rows add 0), as the reference's does over rows that add ~0; over the computed
    rows only it is C / live times larger and the canvas runs on."""
    model = _Scripted()
    answer = mx.array([7, 8, 9, 10, 1] + [1] * 7)
    # Rows 0-4 fairly sure (top-2 gap 3, so their entropy is well above 0); the tail 5-11 certain.
    model._logits = lambda rows: mx.eye(40)[answer[mx.minimum(rows, 11)]][None] * mx.where(
        rows < 5, 3.0, 30.0)[None, :, None]

    def go(mode, threshold, fast=None):
        req = Request([3, 4], max_tokens=12, seed=0, fast=(fast or few()) if mode == "fast" else None,
                      sampler=SamplerOptions(max_denoising_steps=10, confidence_threshold=threshold))
        return list(run(model, req))

    only_tail = few(freeze=False, eos_stop=False, top_k=None, commit_gap=None)
    probe = [e.mean_entropy for e in go("exact", 1e-9) if isinstance(e, StepEvent)]
    over_canvas = [e for e in go("fast", 1e-9, only_tail) if isinstance(e, StepEvent)]
    computed = [e for e in go("fast", 1e-9, replace(only_tail, stop_mean_over_canvas=False))
                if isinstance(e, StepEvent)]
    assert [e.live_rows for e in over_canvas][:2] == [12, 5]
    np.testing.assert_allclose([e.mean_entropy for e in over_canvas], probe, rtol=1e-5)
    np.testing.assert_allclose([e.mean_entropy for e in computed[1:]], np.array(probe[1:]) * 12 / 5, rtol=1e-5)
    # The entropy falls as the temperature does; a threshold below every computed-rows mean but
    # above the last steps' canvas means: the reference and the canvas mean stop, the other does not.
    threshold = 0.9 * min(probe) * 12 / 5
    exact = go("exact", threshold)[-1]
    assert exact.steps_per_block[0] < 10
    assert go("fast", threshold, only_tail)[-1].steps_per_block == exact.steps_per_block
    assert go("fast", threshold, replace(only_tail, stop_mean_over_canvas=False))[-1].steps_per_block == [10]


def test_commit_gap_commits_a_certain_canvas_at_once():
    model = _certain([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 1])
    req = lambda **kw: Request([3], max_tokens=12, seed=0, sampler=SamplerOptions(max_denoising_steps=10), **kw)  # noqa: E731
    exact = list(run(model, req()))[-1]
    early = list(run(model, req(fast=few(commit_gap=5.0))))[-1]
    assert early.tokens == exact.tokens == model.answer.tolist()
    assert early.steps_per_block == [1] and exact.steps_per_block[0] >= 2


def test_api_and_errors(demo):
    model, tok = demo
    out = generate(model, tok, "sort 3 1 2", max_tokens=40, seed=1, mode="fast", max_denoising_steps=4)
    assert isinstance(out, GenerationResult) and out.mode == "fast" and out.live_rows
    with pytest.raises(ValueError, match="mode"):
        generate(model, tok, "x", max_tokens=8, mode="turbo")
    with pytest.raises(ValueError, match="top_k"):
        generate(model, tok, "x", max_tokens=8, mode="fast", fast=FastOptions(top_k=0))
    with pytest.raises(ValueError, match="commit_gap"):
        generate(model, tok, "x", max_tokens=8, mode="fast", fast=FastOptions(commit_gap=-1.0))
    with pytest.raises(ValueError, match="eos_tail_gap"):
        generate(model, tok, "x", max_tokens=8, mode="fast", fast=FastOptions(eos_tail_gap=float("inf")))


def test_cli_fast_flag(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from mlx_diffusiongemma.cli import app as cli
    from mlx_diffusiongemma.demo.random import DEMO_VERSION

    ensure_demo(tmp_path / f"demo-v{DEMO_VERSION}")
    monkeypatch.setenv("MLX_DIFFUSIONGEMMA_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    args = ["generate", "--model", "demo", "--max-tokens", "32", "--steps", "3", "--seed", "2", "-p", "hi", "--json"]
    for flag, mode in (("--fast", "fast"), ("--exact", "exact")):
        result = runner.invoke(cli.app, [*args, flag], prog_name="dgemma")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["mode"] == mode
    # The technique flags build the FastOptions the API takes: the same text as generate(...),
    # on a prompt where the four settings give four different texts.
    model, tok = load("demo")
    prompt = "Reverse: 3 8 1 9"
    texts = set()
    for extra, options in (([], FastOptions()), (["--fast-commit-gap", "0"], FastOptions(commit_gap=None)),
                           (["--fast-bound-window", "0", "--fast-commit-gap", "1.5"], FastOptions.few_steps()),
                           (["--no-fast-eos-tail", "--fast-commit-gap", "1"], FastOptions(eos_tail_gap=None, commit_gap=1.0))):
        result = runner.invoke(cli.app, ["generate", "--model", "demo", "--max-tokens", "32", "--seed", "3",
                                         "-p", prompt, "--json", "--fast", *extra], prog_name="dgemma")
        assert result.exit_code == 0, result.output
        api = generate(model, tok, prompt, max_tokens=32, seed=3, mode="fast", fast=options)
        assert json.loads(result.stdout)["text"] == api.text
        assert json.loads(result.stdout)["fast"] == asdict(options)
        texts.add(api.text)
    assert len(texts) == 4
    windowed = runner.invoke(cli.app, [*args, "--fast-bound-window", "2"], prog_name="dgemma")
    assert windowed.exit_code == 0, windowed.output
    assert json.loads(windowed.stdout)["fast"] == asdict(FastOptions(bound_window=2, thaw=True, refresh_frozen=True))
    default = runner.invoke(cli.app, args, prog_name="dgemma")  # fast mode by default, as the API's
    assert json.loads(default.stdout)["mode"] == "fast"
    assert json.loads(default.stdout)["fast"] == asdict(FastOptions())
    for extra in (["--fast-commit-gap", "2"], ["--fast-bound-window", "4"]):
        bad = runner.invoke(cli.app, [*args, "--exact", *extra], prog_name="dgemma")
        assert bad.exit_code == 1 and "not to --exact" in bad.output
    too_wide = runner.invoke(cli.app, [*args, "--fast", "--fast-bound-window", "999"], prog_name="dgemma")
    assert too_wide.exit_code == 2


def test_fast_accounting_matches_the_exact_step_and_scales_with_rows():
    from mlx_diffusiongemma.perf.accounting import generation_work, rescale_trace, rows_step_work, step_work
    from mlx_diffusiongemma.model.args import parse_model_args

    args = parse_model_args({"model_type": "diffusion_gemma", "canvas_length": 32,
                             "text_config": tiny_text_config(hidden_size=128, intermediate_size=128)}).text
    exact = step_work(args, 32, 100)["flops"]
    full = rows_step_work(args, 32, 100, 32)
    assert full["decoder_flops"] == exact["decoder_total"] - exact["lm_head"]
    assert full["lm_head_flops"] == exact["lm_head"]
    eight = rows_step_work(args, 32, 100, 8, top_k=64)
    assert eight["lm_head_flops"] * 4 == full["lm_head_flops"]
    assert full["decoder_flops"] / 4.5 < eight["decoder_flops"] < full["decoder_flops"] / 3  # keys stay 132
    assert eight["sampler_bytes"] < full["sampler_bytes"] / 4
    work = generation_work(args, 32, 100, [[32, 32], [32, 8, 8]], committed_tokens=40, top_k=64)
    assert work["steps"] == 5 and work["total"]["rows"] == 112
    assert work["per_token"]["decoder_flops"] == pytest.approx(work["total"]["decoder_flops"] / 40)
    assert rescale_trace([[64, 10, 1]], 64, 256) == [[256, 40, 4]]


def test_fast_mode_keeps_pins_and_runs_hooks(sharp):
    """Frozen positions are canvas.py's FROZEN state: user pins hold in fast mode too, and the
    request's hooks see the states the settle rule produced."""
    from mlx_diffusiongemma.diffusion.canvas import CanvasState

    c = sharp.canvas_length
    pins = {0: 5, 3: 9}
    seen = []

    def hook(view):
        seen.append((view.step, int(view.state.frozen.sum().item())))
        return None

    req = Request([2, 5, 17], max_tokens=c, seed=3, fast=FastOptions(), stop_at_eos=False, hooks=(hook,),
                  canvases={0: CanvasState.from_lists(c, pins=pins)}, sampler=SamplerOptions(max_denoising_steps=12))
    events = list(run(sharp, req))
    steps = [e for e in events if isinstance(e, StepEvent)]
    for e in steps:
        assert [e.argmax[p].item() for p in pins] == list(pins.values())
        assert [e.canvas[p].item() for p in pins] == list(pins.values())
    result = events[-1]
    assert [result.tokens[p] for p in pins] == list(pins.values())
    assert len(seen) == len(steps) and seen[-1][1] >= 1  # something froze


# -- the turbo engine's techniques (FastOptions.monotone, refresh_frozen, confidence_commit, flush_after,
# repair): each off by default, each changing what it says --------------------------------------------


def test_turbo_knobs_are_off_by_default_and_checked():
    full = FastOptions()
    assert (full.monotone, full.confidence_commit, full.flush_after, full.repair) == (False, None, None, False)
    assert full.refresh_every is None
    # On by default: the refreshed forward set with the bound window and thaw (the many-step
    # instrument's setting C, docs/fast-mode.md); off in the few-step setting and in none().
    assert (full.refresh_frozen, full.bound_window, full.thaw, full.commit_gap) == (True, 4, True, 3.0)
    for off in (FastOptions.few_steps(), FastOptions.none()):
        assert (off.refresh_frozen, off.bound_window, off.thaw) == (False, None, False)
    assert FastOptions.few_steps().commit_gap == 1.5
    for bad in ({"confidence_commit": 1.5}, {"confidence_commit": 0.0}, {"flush_after": 0},
                {"confidence_commit_late": 0.5}, {"confidence_switch_step": 0}, {"refresh_every": 0}):
        with pytest.raises(ValueError):
            FastOptions(**bad)
    two = FastOptions(confidence_commit=0.9, confidence_commit_late=0.5, confidence_switch_step=3)
    assert [two.confidence_at(s) for s in (1, 3, 4, 9)] == [0.9, 0.9, 0.5, 0.5]
    assert FastOptions(confidence_commit=0.9).confidence_at(20) == 0.9


def test_monotone_commit_freezes_accepted_rows_at_their_sampled_token(demo):
    """Every row the entropy bound accepts leaves the decoder from the next step on, with the token
    it was accepted at; with `refresh_frozen`, a step also recomputes exactly the rows frozen at the
    step before at a token other than their input there (an end-of-text tail included)."""
    model, tok = demo
    c = model.canvas_length
    prompt = render_messages(tok, [{"role": "user", "content": "Pick 8 different numbers in increasing order."}])
    base = replace(FastOptions.none(), monotone=True)
    refreshed = 0
    for refresh in (False, True):
        req = Request(prompt, max_tokens=c, seed=4, fast=replace(base, refresh_frozen=refresh))
        trace = [e for e in run(model, req) if isinstance(e, StepEvent)]
        frozen = np.zeros(c, bool)
        tokens = np.zeros(c, int)
        was_frozen = frozen.copy()
        for i, e in enumerate(trace):
            extra = 0
            if i >= 2:  # rows frozen at step i (1-based), whose input was trace[i - 2].canvas
                just = frozen & ~was_frozen
                stale = just & (tokens != np.array(trace[i - 2].canvas))
                extra = int(stale.sum())
            assert e.live_rows == c - frozen.sum() + (extra if refresh else 0)
            refreshed += extra if refresh else 0
            assert (np.array(e.argmax)[frozen] == tokens[frozen]).all()
            was_frozen = frozen.copy()
            accepted = np.array(e.accepted) & ~frozen
            tokens[accepted] = np.array(e.canvas)[accepted]
            frozen |= accepted
    assert refreshed > 0


def test_refresh_every_recomputes_every_frozen_row_on_schedule(demo):
    """With `refresh_every=k`, the step after every k-th step runs every row of the canvas (the
    frozen ones for their K/V only); the steps between compute the live rows alone, as without it."""
    model, tok = demo
    c = model.canvas_length
    prompt = render_messages(tok, [{"role": "user", "content": "Pick 8 different numbers in increasing order."}])
    base = few(commit_gap=None, eos_tail_gap=None, bucket=False)
    rows = {}
    for every in (None, 2):
        req = Request(prompt, max_tokens=c, seed=4, fast=replace(base, refresh_every=every))
        rows[every] = [e.live_rows for e in run(model, req) if isinstance(e, StepEvent)]
    on_schedule = [r for s, r in enumerate(rows[2], start=1) if s > 1 and (s - 1) % 2 == 0]
    between = [r for s, r in enumerate(rows[2], start=1) if s > 1 and (s - 1) % 2 == 1]
    assert on_schedule and all(r == c for r in on_schedule)
    assert any(r < c for r in between)  # rows froze, and were skipped between refreshes
    assert any(r < c for r in rows[None][2:])  # without it the same steps skip frozen rows


class _Flipping(_Scripted):
    """Sure of a wrong answer at its first decoder call, of the right one from then on."""

    def __init__(self):
        super().__init__()
        self.wrong = mx.array([11, 12, 13, 14, 1] + [1] * 7)

    def _logits(self, rows):
        self.calls += 1
        answer = self.wrong if self.calls == 1 else self.answer
        return mx.eye(self.vocab_size)[answer[mx.minimum(rows, 11)]][None] * 30.0


def _go(model, fast, steps=10, **kw):
    req = Request([3, 4], max_tokens=12, seed=0, fast=fast, sampler=SamplerOptions(max_denoising_steps=steps), **kw)
    return list(run(model, req))[-1]


def test_confidence_commit_freezes_sure_rows_and_its_second_stage_the_rest():
    off = replace(FastOptions.none(), confidence_commit=None)
    assert _go(_Scripted(), off).live_rows == [[12] * 10]  # the noisy tail never settles
    # Rows 0-4 are sure (top probability ~1), the tail is noise (~1/40): 0.9 freezes the first five.
    one = _go(_Scripted(), replace(off, confidence_commit=0.9))
    assert one.live_rows == [[12] + [7] * 9] and one.tokens == [7, 8, 9, 10, 1]
    # A second stage of 0.01 after the first step freezes the tail too: the block ends there.
    two = _go(_Scripted(), replace(off, confidence_commit=0.9, confidence_commit_late=0.01,
                                   confidence_switch_step=1))
    assert two.live_rows == [[12, 7]] and two.tokens == [7, 8, 9, 10, 1]


def test_flush_commits_the_draft_after_n_steps():
    exact = _scripted("exact")
    assert exact.steps_per_block == [10]
    flushed = _go(_Scripted(), replace(FastOptions.none(), flush_after=3))
    assert flushed.steps_per_block == [3] and flushed.tokens == exact.tokens


def test_repair_pass_recomputes_the_committed_canvas_and_keeps_pins():
    from mlx_diffusiongemma.diffusion.canvas import CanvasState

    sure = replace(FastOptions.none(), confidence_commit=0.9)
    wrong = _go(_Flipping(), sure)  # everything frozen at the first call's answer
    assert wrong.tokens == [11, 12, 13, 14, 1] and wrong.live_rows == [[12]]
    fixed = _go(_Flipping(), replace(sure, repair=True))
    assert fixed.tokens == [7, 8, 9, 10, 1] and fixed.live_rows == [[12, 12]]  # the repair pass is counted
    pinned = _go(_Flipping(), replace(sure, repair=True), canvases={0: CanvasState.from_lists(12, pins={1: 30})})
    assert pinned.tokens == [7, 30, 9, 10, 1]


# -- bound_window: frozen neighbours of live rows count in the entropy bound -------------------------


class _Even(_Scripted):
    """Every row equally unsure of token 7 (entropy ~0.04 at a temperature of ~0.6): the entropy
    bound of 0.1 accepts two or three rows a step, ties broken by canvas position. A vocabulary of
    2048 keeps the noise off token 7 (a noisy row holding the argmax would settle by chance)."""

    vocab_size = 2048

    def _logits(self, rows):
        self.calls += 1
        return mx.where(mx.arange(self.vocab_size) == 7, 8.0, 0.0)[None, None] + mx.zeros((1, rows.shape[0], 1))


def test_bound_window_counts_frozen_neighbours_in_the_entropy_bound():
    """With every frozen row in the window, the rows a step accepts are the exact path's (frozen
    rows take the share of the bound that the tokens they hold take there); counted as certain,
    they leave the bound to the live rows, which then accept positions the exact path does not."""
    sampler = SamplerOptions(max_denoising_steps=8, t_min=0.59, t_max=0.6, confidence_threshold=1e-6)

    def accepted(fast):
        req = Request([3, 4], max_tokens=12, seed=0, fast=fast, sampler=sampler)
        return [np.array(e.accepted) for e in run(_Even(), req) if isinstance(e, StepEvent)]

    exact = accepted(None)
    freeze = replace(FastOptions.none(), freeze=True)
    assert len(exact) == 8 and all(a.sum() < 12 for a in exact)  # the bound held rows back at every step
    assert [a.tolist() for a in accepted(replace(freeze, bound_window=12))] == [a.tolist() for a in exact]
    assert any((a != b).any() for a, b in zip(accepted(freeze), exact))


def test_bound_window_runs_the_frozen_neighbours_of_live_rows(demo):
    """Each step computes the live rows and the frozen ones within the window of a live row."""
    model, tok = demo
    c = model.canvas_length
    prompt = render_messages(tok, [{"role": "user", "content": "Pick 8 different numbers in increasing order."}])
    fast = few(commit_gap=None, eos_tail_gap=None, bucket=False, bound_window=2)
    neighbours = 0
    for e in run(model, Request(prompt, max_tokens=c, seed=4, fast=fast)):
        if not isinstance(e, StepEvent):
            continue
        frozen = np.zeros(c, bool) if e.pinned is None else np.array(e.pinned)
        live = np.flatnonzero(~frozen)
        near = {j for i in live for j in range(max(0, i - 2), min(c, i + 3)) if frozen[j]}
        assert e.live_rows == len(live) + len(near)
        neighbours += len(near)
    assert neighbours > 0
    with pytest.raises(ValueError):
        FastOptions(bound_window=0)


class _Doubting(_Scripted):
    """Sure of rows 0-5 for two decoder calls (they settle and freeze), then no longer sure of row 0
    (flat logits: the largest entropy there is); rows 6-11 are noise forever (they stay live)."""

    vocab_size = 2048

    def _logits(self, rows):
        self.calls += 1
        sure = mx.where(mx.arange(self.vocab_size)[None] == (rows[:, None] + 7), 30.0, 0.0)[None]
        noise = mx.random.normal((1, rows.shape[0], self.vocab_size), key=mx.random.key(self.calls)) * 0.1
        logits = mx.where((rows < 6)[None, :, None], sure, noise)
        if self.calls > 2:
            logits = mx.where((rows == 0)[None, :, None], 0.0, logits)
        return logits


def test_thaw_renoises_a_frozen_row_the_bound_rejects():
    """With `thaw`, a frozen row in the window whose entropy the bound no longer admits is renoised
    and live again, as a held token the bound rejects is on the exact path; without it, it stays."""
    base = replace(FastOptions.none(), freeze=True, bound_window=12)
    trace = {}
    for thaw in (False, True):
        req = Request([3, 4], max_tokens=12, seed=0, fast=replace(base, thaw=thaw),
                      sampler=SamplerOptions(max_denoising_steps=5, confidence_threshold=1e-6))
        trace[thaw] = [e for e in run(_Doubting(), req) if isinstance(e, StepEvent)]
    for events in trace.values():
        assert np.array(events[2].pinned)[:6].all()  # rows 0-5 froze after step 2
    assert not np.array(trace[True][2].accepted)[0]  # step 3's bound rejects row 0
    assert np.array(trace[False][3].pinned)[0] and trace[False][2].canvas[0].item() == 7
    assert not np.array(trace[True][3].pinned)[0] and trace[True][2].canvas[0].item() != 7
    assert np.array(trace[True][3].pinned)[1:6].all()  # the others stay frozen
    with pytest.raises(ValueError):
        FastOptions(thaw=True, bound_window=None)  # it reads the bound window's rows
