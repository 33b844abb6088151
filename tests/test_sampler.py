"""mlx_diffusiongemma.sampler against the released reference (transformers 5.23 generation_diffusion_gemma).

Randomness is shared with the reference by patching `torch.multinomial` (an independent float64
inverse-CDF over the same uniforms) and `torch.randint` (returns our noise ids), so the comparisons are
exact, not statistical.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation import EosTokenCriteria, LogitsProcessorList, StoppingCriteriaList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from mlx_diffusiongemma.diffusion import sampler as S

F32_MAX_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


# ----------------------------------------------------------------------------------------------- helpers


def rand_logits(seed: int, b: int, c: int, v: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, c, v)) * scale).astype(np.float32)


def two_point_row(v: int, gap: float) -> np.ndarray:
    """Logits of a distribution on tokens {0, 1} only (the rest -inf): a chosen, small entropy."""
    row = np.full(v, -np.inf, dtype=np.float32)
    row[0], row[1] = 0.0, -gap
    return row


def one_hot_row(v: int, k: int) -> np.ndarray:
    """Sharp logits whose entropy is exactly (-)0 in float32."""
    row = np.full(v, -1e4, dtype=np.float32)
    row[k] = 0.0
    return row


def with_ties(seed: int, b: int, c: int, v: int) -> np.ndarray:
    """Random logits plus every kind of tie: a duplicated random row, uniform rows, one-hot rows and a
    tie group of small equal entropies that straddles a 0.1 bound (entropy ~0.04: 3 of 5 accepted)."""
    x = rand_logits(seed, b, c, v, scale=2.0)
    x[:, 1] = x[:, 0]  # duplicate rows -> identical entropies
    x[:, 2] = 0.0  # uniform -> entropy log(V) ...
    x[:, c - 1] = 0.0  # ... twice
    for j in (4, 9, c - 3):
        x[:, j] = one_hot_row(v, j % v)  # entropy 0 (ties that are always accepted)
    for j in (3, 7, 10, c - 5, c - 2):
        x[:, j] = two_point_row(v, 5.0)
    return x


def ref_accept(logits: np.ndarray, bound: float, canvas=None, denoiser=None) -> tuple[np.ndarray, np.ndarray]:
    b, c, v = logits.shape[0], logits.shape[1], logits.shape[-1]
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), c, v, 48)
    cur = torch.zeros(b, c, dtype=torch.long) if canvas is None else torch.from_numpy(canvas).long()
    den = torch.ones(b, c, dtype=torch.long) if denoiser is None else torch.from_numpy(denoiser).long()
    accepted = sampler.accept_canvas(cur, den, torch.from_numpy(logits), cur_step=1)
    return sampler.accepted_token_mask.numpy(), accepted.numpy()


def stable_torch_sort(monkeypatch):
    orig = torch.sort

    def sort(x, dim=-1, descending=False, stable=False, **kw):
        return orig(x, dim=dim, descending=descending, stable=True, **kw)

    monkeypatch.setattr(torch, "sort", sort)


def entropies_as_logits(monkeypatch):
    """Make the reference's `Categorical(logits=x).entropy()` return `x`, to feed it exact entropies."""

    class Passthrough:
        def __init__(self, logits):
            self.logits = logits

        def entropy(self):
            return self.logits

    monkeypatch.setattr(torch.distributions, "Categorical", Passthrough)


def inverse_cdf_multinomial(uniforms: dict):
    """torch.multinomial replacement: float64 inverse CDF over the uniforms in `uniforms['u']`."""

    def multinomial(probs, num_samples, replacement=False, **kw):
        assert num_samples == 1 and probs.dim() == 2
        cdf = torch.cumsum(probs.double(), dim=-1)
        cdf = cdf / cdf[:, -1:]
        u = torch.from_numpy(np.asarray(uniforms["u"], dtype=np.float64).reshape(-1, 1))
        return torch.searchsorted(cdf, u, right=True)  # first index with cdf > u

    return multinomial


def group_counts(entropy: np.ndarray, mask: np.ndarray) -> list[dict]:
    """Per row: {entropy value: number of accepted positions with that value}."""
    out = []
    for e_row, m_row in zip(entropy, mask):
        d: dict = {}
        for e, m in zip(e_row.tolist(), m_row.tolist()):
            d[e] = d.get(e, 0) + int(m)
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("t_min,t_max,n", [(0.4, 0.8, 48), (0.3, 1.0, 64), (0.1, 0.7, 13)])
def test_temperature_schedule_matches_reference(t_min, t_max, n):
    x = rand_logits(0, 1, 4, 64)
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=n)
    differs = 0
    for step in range(n, 0, -1):
        # Plain-int step (the processor on its own): Python float64 schedule.
        want = proc(None, torch.from_numpy(x), cur_step=step).numpy()
        np.testing.assert_array_equal(np.array(mx.array(x) / S.temperature(step, n, t_min, t_max)), want)
        # Inside generate, `_denoising_step` passes an int32 tensor: float32 schedule.
        want32 = proc(None, torch.from_numpy(x), cur_step=torch.tensor(step, dtype=torch.int32)).numpy()
        np.testing.assert_array_equal(np.array(mx.array(x) / S.temperature_f32(step, n, t_min, t_max)), want32)
        differs += not np.array_equal(want, want32)
    assert S.temperature(n, n, t_min, t_max) == pytest.approx(t_max)
    assert differs > 0  # the float32 variant is not redundant


# -------------------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("seed,c,v", [(0, 16, 64), (1, 32, 1000), (2, 24, 257)])
def test_entropy_matches_categorical(seed, c, v):
    x = with_ties(seed, 2, c, v)
    x[0, 5, : v // 2] = -np.inf  # -inf logits must not produce NaN
    x[1, 6, 3] = -1e30  # a very negative finite logit
    x[1, 8] *= 40.0  # very sharp
    got = np.array(S.entropy(mx.array(x)))
    want = torch.distributions.Categorical(logits=torch.from_numpy(x)).entropy().numpy()
    assert got.dtype == np.float32 and got.shape == (2, c)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Ties of the input are ties of the output (the acceptance sort relies on it).
    assert (got[:, 0] == got[:, 1]).all() and (got[:, 2] == got[:, c - 1]).all()
    assert (got[:, 4] == 0).all()


# -------------------------------------------------------------------------------------------- argmax


def test_argmax_ties_lowest_index_like_torch():
    x = rand_logits(3, 2, 16, 64)
    x[0, 0] = 0.0  # all tied
    x[0, 1, [5, 17, 40]] = 100.0  # tied maxima
    x[1, 2, [63, 0]] = 50.0
    x[1, 3] = one_hot_row(64, 9)
    got = np.array(S.argmax_canvas(mx.array(x)))
    want = torch.argmax(torch.from_numpy(x), dim=-1).numpy()
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == 0 and got[0, 1] == 5 and got[1, 2] == 0


# ------------------------------------------------------------------------------------------ acceptance


@pytest.mark.parametrize("seed,c,v", [(0, 16, 64), (1, 32, 1000), (2, 24, 257), (3, 32, 64)])
@pytest.mark.parametrize("bound", [0.1, 1.0, 6.0])
def test_accept_mask_matches_reference_random(seed, c, v, bound):
    rng = np.random.default_rng(100 + seed)
    # Per-position sharpness so entropies spread from ~0 to ~log V.
    x = rand_logits(seed, 2, c, v) * rng.uniform(0.2, 8.0, size=(2, c, 1)).astype(np.float32)
    canvas = rng.integers(0, v, (2, c))
    denoiser = rng.integers(0, v, (2, c))
    want_mask, want_canvas = ref_accept(x, bound, canvas, denoiser)
    mask = S.accept_mask(S.entropy(mx.array(x)), bound)
    np.testing.assert_array_equal(np.array(mask), want_mask)
    got_canvas = S.accept(mx.array(canvas, dtype=mx.int32), mx.array(denoiser, dtype=mx.int32), mask)
    np.testing.assert_array_equal(np.array(got_canvas), want_canvas)
    if bound == 1.0:
        assert 0 < want_mask.sum() < want_mask.size  # non-trivial decisions


@pytest.mark.parametrize("seed,v", [(0, 64), (1, 1000)])
def test_accept_mask_ties_short_canvas_exact(seed, v):
    """C <= 16: torch's CPU sort keeps ties in index order, so even straddling ties match exactly."""
    x = with_ties(seed, 2, 16, v)
    want_mask, _ = ref_accept(x, 0.1)
    got = np.array(S.accept_mask(S.entropy(mx.array(x)), 0.1))
    np.testing.assert_array_equal(got, want_mask)
    # The straddling tie group (positions 3, 7, 10, 11, 14) accepts its first three.
    assert got[:, [3, 7, 10]].all() and not got[:, [11, 14]].any()
    # All-uniform canvas: every entropy equal, only the first sorted position is accepted -> position 0.
    u = np.zeros((2, 16, v), np.float32)
    np.testing.assert_array_equal(np.array(S.accept_mask(S.entropy(mx.array(u)), 0.1)), ref_accept(u, 0.1)[0])


@pytest.mark.parametrize("seed,c,v", [(0, 32, 64), (1, 24, 1000)])
def test_accept_mask_ties_long_canvas(seed, c, v, monkeypatch):
    """C > 16: identical to the reference with a stable sort; vs. its unstable CPU sort, the same number
    of tokens is accepted in every tie group; ties that do not straddle the bound match exactly."""
    x = with_ties(seed, 2, c, v)
    ent = np.array(S.entropy(mx.array(x)))
    got = np.array(S.accept_mask(mx.array(ent), 0.1))
    unstable_mask, _ = ref_accept(x, 0.1)
    assert group_counts(ent, got) == group_counts(ent, unstable_mask)

    no_straddle = x.copy()
    no_straddle[:, [3, 7, 10, c - 5, c - 2]] = no_straddle[:, [4]]  # turn the straddling group into zeros
    no_straddle[:, :2] *= 0.05  # keep the duplicate pair tied but far from the lowest non-zero entropy
    np.testing.assert_array_equal(
        np.array(S.accept_mask(S.entropy(mx.array(no_straddle)), 0.1)), ref_accept(no_straddle, 0.1)[0]
    )

    stable_torch_sort(monkeypatch)
    np.testing.assert_array_equal(got, ref_accept(x, 0.1)[0])
    assert got[:, [3, 7, 10]].all() and not got[:, [c - 5, c - 2]].any()


def test_reference_cpu_sort_is_unstable_beyond_16():
    """Evidence for the documented tie rule (torch 2.13 CPU): stable up to 16 elements, not beyond."""
    assert torch.equal(torch.sort(torch.zeros(16)).indices, torch.arange(16))
    assert not torch.equal(torch.sort(torch.zeros(17)).indices, torch.arange(17))
    np.testing.assert_array_equal(np.array(S.stable_argsort(mx.zeros((17,)))), np.arange(17))


def test_stable_argsort_is_numpy_stable_argsort():
    rng = np.random.default_rng(4)
    x = (rng.integers(-4, 5, size=(3, 40)) / 4.0).astype(np.float32)  # many ties, negatives
    x[0, [0, 5, 9]] = [0.0, -0.0, 0.0]  # signed zeros tie
    x[1, [1, 2]] = [np.inf, -np.inf]
    x[2] = rng.standard_normal(40).astype(np.float32) * 1e-39  # subnormals
    want = np.argsort(np.where(x == 0, 0.0, x), axis=-1, kind="stable")
    np.testing.assert_array_equal(np.array(S.stable_argsort(mx.array(x))), want)


@pytest.mark.parametrize("c", [8, 16, 32])
def test_accept_mask_exact_entropies(c, monkeypatch):
    """Same entropies fed to both (bypassing Categorical): sort / cumsum / `<=` / scatter logic, with
    many ties, signed zeros and exactly-representable values landing exactly on the bound."""
    rng = np.random.default_rng(c)
    ent = (rng.integers(0, 6, size=(2, c)) / 8.0).astype(np.float32)  # values in {0, 1/8, ..., 5/8}
    ent[0, :3] = [-0.0, 0.25, 0.25]
    ent[1, -1] = -0.0
    entropies_as_logits(monkeypatch)
    if c > 16:
        stable_torch_sort(monkeypatch)
    for bound in (0.25, 0.5, 1.0, 2.0):
        want, _ = ref_accept(ent, bound)
        got = np.array(S.accept_mask(mx.array(ent), bound))
        np.testing.assert_array_equal(got, want)
    # `<=`, not `<`: 0, 0.25 accepted; the second 0.25 has exactly 0.25 before it.
    probe = np.array([[0.25, 0.25, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(np.array(S.accept_mask(mx.array(probe), 0.25)), [[True, True, False, False]])


# ------------------------------------------------------------------------------------------- renoising


@pytest.mark.parametrize("seed,c,v", [(0, 16, 64), (1, 32, 1000)])
def test_renoise_matches_reference(seed, c, v, monkeypatch):
    rng = np.random.default_rng(seed)
    x = rand_logits(seed, 2, c, v) * rng.uniform(0.2, 8.0, size=(2, c, 1)).astype(np.float32)
    canvas, denoiser = rng.integers(0, v, (2, c)), rng.integers(0, v, (2, c))
    noise = S.random_canvas(mx.random.key(seed), 2, c, v)
    noise_np = np.array(noise)
    assert noise.dtype == mx.int32 and noise_np.min() >= 0 and noise_np.max() < v
    assert np.array_equal(np.array(S.random_canvas(mx.random.key(seed), 2, c, v)), noise_np)

    calls = []

    def randint(low=0, high=None, size=None, **kw):
        calls.append((low, high, tuple(size)))
        return torch.from_numpy(noise_np.astype(np.int64))

    monkeypatch.setattr(torch, "randint", randint)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.5), c, v, 48)
    accepted = sampler.accept_canvas(torch.from_numpy(canvas), torch.from_numpy(denoiser), torch.from_numpy(x), 1)
    want = sampler.renoise_canvas(accepted, 1).numpy()
    assert calls == [(0, v, (2, c))]  # noise over the whole vocabulary, one id per position

    mask = S.accept_mask(S.entropy(mx.array(x)), 0.5)
    acc = S.accept(mx.array(canvas, dtype=mx.int32), mx.array(denoiser, dtype=mx.int32), mask)
    got = np.array(S.renoise(acc, mask, noise))
    np.testing.assert_array_equal(got, want)
    m = np.array(mask)
    assert 0 < m.sum() < m.size and not np.array_equal(got, np.array(acc))


# ----------------------------------------------------------------------------------------------- draws


@pytest.mark.parametrize("seed,c,v", [(0, 16, 64), (1, 32, 1000), (2, 24, 257)])
def test_draw_matches_reference_multinomial(seed, c, v, monkeypatch):
    """The `_denoising_step` draw (softmax(float32) -> torch.multinomial) with multinomial replaced by an
    inverse CDF over shared uniforms gives our tokens."""
    x = rand_logits(seed, 2, c, v, scale=2.0)
    x[0, 0, : v // 2] = -np.inf  # zero-probability tokens are never drawn
    x[1, 1] = one_hot_row(v, 7)
    x[1, 2] = 0.0
    u = np.array(S.sample_uniforms(mx.random.key(seed), (2, c)))
    u[0, 0], u[1, 2], u[1, 3], u[0, 1] = 0.0, 0.0, F32_MAX_BELOW_ONE, F32_MAX_BELOW_ONE
    assert u.dtype == np.float32 and (u >= 0).all() and (u < 1).all()

    proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    processed = proc(None, torch.from_numpy(x), cur_step=30)
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    monkeypatch.setattr(torch, "multinomial", inverse_cdf_multinomial({"u": u}))
    want = torch.multinomial(probs.view(-1, v), num_samples=1).view(2, c).numpy()

    got = np.array(S.draw_tokens(mx.array(processed.numpy()), mx.array(u)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == v // 2 and got[1, 1] == 7 and got[1, 2] == 0 and got[1, 3] == v - 1
    assert not np.array_equal(got, np.array(S.argmax_canvas(mx.array(processed.numpy()))))  # a real draw


def test_draw_inclusive_uniform_stays_in_support():
    """u == 1.0 (outside the contract, but what an inclusive generator yields) picks the last token with
    non-zero probability, never a zero-probability tail token."""
    x = np.full((1, 2, 8), -np.inf, np.float32)
    x[0, 0, [1, 4]] = [0.0, 0.5]
    x[0, 1] = 0.0
    got = np.array(S.draw_tokens(mx.array(x), mx.array([[1.0, 1.0]], dtype=mx.float32)))
    np.testing.assert_array_equal(got, [[4, 7]])


# ------------------------------------------------------------------------------------- stopping criteria


def _stop_sequence(v: int = 64, c: int = 16):
    """Argmax canvases and logits for 8 steps; row 0 mostly repeats, row 1 changes and turns confident."""
    rng = np.random.default_rng(7)
    a, b, d = (rng.integers(0, v, (c,)) for _ in range(3))
    rows = [[a, a, a, b, b, a, a, a], [a, b, b, b, b, b, d, d]]
    argmaxes = [np.stack([rows[0][s], rows[1][s]]) for s in range(8)]
    sharp = np.stack([one_hot_row(v, j % v) for j in range(c)])
    logits = []
    for s in range(8):
        noisy = rand_logits(s, 1, c, v)[0]
        # row 0: confident (tiny but non-zero entropy) except at step 4; row 1: confident from step 3
        logits.append(np.stack([noisy if s == 4 else sharp * 2e-3, sharp if s >= 3 else noisy]))
    return argmaxes, logits


@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
@pytest.mark.parametrize("confidence", [0.005, 4.0])
def test_stop_check_matches_reference_over_steps(threshold, confidence):
    argmaxes, logits = _stop_sequence()
    ref = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=confidence)
    history = S.init_history(threshold, 2, 16)
    assert history.shape == (threshold, 2, 16)
    got, want = [], []
    for am, lg in zip(argmaxes, logits):
        want.append(ref(torch.from_numpy(am).long(), torch.from_numpy(lg)).numpy())
        stop, history = S.stop_check(history, mx.array(am, dtype=mx.int32), S.entropy(mx.array(lg)), confidence)
        got.append(np.array(stop))
        if threshold:  # same rolling layout, oldest first
            np.testing.assert_array_equal(np.array(history), ref.argmax_canvas_history.numpy())
    got, want = np.stack(got), np.stack(want)
    np.testing.assert_array_equal(got, want)
    if threshold >= 1:
        assert not got[0].any()  # the -1 history can never be matched on the first step
    if confidence == 0.005 and threshold in (0, 1, 2):
        assert got.any() and not got.all()  # the sequence exercises both outcomes


@pytest.mark.parametrize("threshold", [1, 2])
def test_stop_all_zero_canvas_and_exact_confidence_boundary(threshold, monkeypatch):
    """An all-zero argmax canvas (token 0) is not stable before `threshold` previous steps; a mean
    entropy exactly equal to the threshold is not confident (strict `<`)."""
    entropies_as_logits(monkeypatch)  # feed exact per-token entropies to the reference
    ref = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.25)
    history = S.init_history(threshold, 2, 16)
    zeros = np.zeros((2, 16), np.int64)
    ent = np.full((2, 16), 0.125, np.float32)
    ent[1] = 0.25  # row 1: mean == threshold
    got, want = [], []
    for _ in range(threshold + 2):
        want.append(ref(torch.from_numpy(zeros), torch.from_numpy(ent)).numpy())
        stop, history = S.stop_check(history, mx.array(zeros, dtype=mx.int32), mx.array(ent), 0.25)
        got.append(np.array(stop))
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert not np.stack(got)[:threshold].any() and np.stack(got)[threshold:, 0].all()
    assert not np.stack(got)[:, 1].any()


# ---------------------------------------------------------------------------------------------- commit


def _finalize(canvas: np.ndarray, eos: list[int]) -> tuple[np.ndarray, np.ndarray]:
    b, c = canvas.shape
    prompt = torch.full((b, 3), 5, dtype=torch.long)
    input_ids = torch.cat([prompt, torch.from_numpy(canvas).long()], dim=-1)
    out, finished = DiffusionGemmaGenerationMixin._finalize_canvas(
        input_ids=input_ids,
        finished_sequences=torch.zeros(b, dtype=torch.bool),
        generation_config=SimpleNamespace(pad_token_id=-1, eos_token_id=eos),
        stopping_criteria=StoppingCriteriaList([EosTokenCriteria(eos)]),
        canvas_length=c,
        eos_tensor=torch.tensor(eos),
    )
    return (out[:, -c:] != -1).numpy(), finished.numpy()


@pytest.mark.parametrize("eos", [[1], [1, 7], [7, 1, 3]])
def test_commit_matches_finalize_canvas(eos):
    rng = np.random.default_rng(len(eos))
    c = 16
    canvas = rng.integers(10, 64, (6, c))
    canvas[0, 5], canvas[0, 9], canvas[0, 12] = 1, 7, 1  # mid-canvas, later EOS ids dropped
    canvas[1, 0] = 1  # at position 0
    # row 2: none
    canvas[3, c - 1] = 7  # last position (an EOS only when 7 is in the set)
    canvas[4, 2], canvas[4, 3] = 7, 1  # two different EOS ids back to back
    canvas[5, 6], canvas[5, 7] = 1, 1  # repeated EOS
    keep, finished = S.commit(mx.array(canvas, dtype=mx.int32), eos)
    want_keep, want_finished = _finalize(canvas, eos)
    np.testing.assert_array_equal(np.array(keep), want_keep)
    np.testing.assert_array_equal(np.array(finished), want_finished)
    assert np.array(keep)[0].sum() == 6 and np.array(keep)[1].sum() == 1 and np.array(keep)[2].all()
    # A batch with no EOS at all: nothing cut, nothing finished.
    none = canvas[[2]]
    keep, finished = S.commit(mx.array(none, dtype=mx.int32), mx.array(eos, dtype=mx.int32))
    np.testing.assert_array_equal(np.array(keep), _finalize(none, eos)[0])
    assert not np.array(finished).any()


# ------------------------------------------------------------------------------------- fused step


def test_step_matches_reference_denoising_steps(monkeypatch):
    """Several `_denoising_step`s of the reference (fake decoder, shared randomness, stable-and-confident
    stopping with a row finishing early) against `step` + `stop_check` with the generate loop's freezing."""
    b, c, v, n = 2, 24, 300, 12
    t_min, t_max, bound, conf = 0.4, 0.8, 0.1, 0.005
    rng = np.random.default_rng(11)
    sharp = np.stack([one_hot_row(v, (3 * j) % v) * 3 for j in range(c)])  # row 0 converges immediately
    raws = []
    for s in range(5):
        r = rand_logits(20 + s, b, c, v) * rng.uniform(0.3, 6.0, size=(b, c, 1)).astype(np.float32)
        r[0] = sharp
        raws.append(r)
    keys = mx.random.split(mx.random.key(5), 10)
    shared = {"u": None, "noise": None, "raw": None}
    monkeypatch.setattr(torch, "multinomial", inverse_cdf_multinomial(shared))
    monkeypatch.setattr(torch, "randint", lambda low=0, high=None, size=None, **kw: torch.from_numpy(shared["noise"]))

    fake_self = SimpleNamespace(
        config=SimpleNamespace(text_config=SimpleNamespace(vocab_size=v)),
        model=SimpleNamespace(decoder=SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.zeros(1)))),
    )
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), c, v, n)
    criteria = StableAndConfidentStoppingCriteria(stability_threshold=1, confidence_threshold=conf)
    procs = LogitsProcessorList([LinearTemperatureScheduleLogitsProcessor(t_min, t_max, n)])

    canvas0 = np.array(S.random_canvas(keys[0], b, c, v))
    r_canvas, r_argmax = torch.from_numpy(canvas0).long(), torch.from_numpy(canvas0).long()
    r_selfcond, r_finished = None, torch.zeros(b, dtype=torch.bool)
    m_canvas, m_argmax, m_processed = mx.array(canvas0), mx.array(canvas0), None
    m_finished, history = mx.zeros((b,), dtype=mx.bool_), S.init_history(1, b, c)

    finished_log = []
    for i, cur_step in enumerate(range(n, n - 5, -1)):
        u = S.sample_uniforms(keys[2 * i + 1], (b, c))
        noise = S.random_canvas(keys[2 * i + 2], b, c, v)
        shared.update(u=np.array(u), noise=np.array(noise).astype(np.int64), raw=raws[i])
        r_canvas, r_argmax, r_selfcond, r_finished = DiffusionGemmaGenerationMixin._denoising_step(
            fake_self,
            decoder_forward=lambda **kw: SimpleNamespace(logits=torch.from_numpy(shared["raw"])),
            current_canvas=r_canvas, argmax_canvas=r_argmax, input_ids=None, decoder_position_ids=None,
            self_conditioning_logits=r_selfcond, mask_mapping=None, past_key_values=None,
            finished_denoising=r_finished, cur_step=cur_step, sampler=sampler, logits_processor=procs,
            diffusion_stopping_criteria=criteria,
        )

        t = mx.array(S.temperature_f32(cur_step, n, t_min, t_max))
        out = S.compiled_step(mx.array(raws[i]), m_canvas, t, u, noise, bound)
        np.testing.assert_array_equal(np.array(out.accepted), sampler.accepted_token_mask.numpy())
        frozen = m_finished[:, None]
        m_argmax = mx.where(frozen, m_argmax, out.argmax)
        m_canvas = mx.where(frozen, m_canvas, out.next_canvas)
        m_processed = out.processed_logits if m_processed is None else mx.where(
            frozen[..., None], m_processed, out.processed_logits)
        stop, history = S.stop_check(history, m_argmax, S.entropy(m_processed), conf)
        m_finished = m_finished | stop

        np.testing.assert_array_equal(np.array(m_canvas), r_canvas.numpy())
        np.testing.assert_array_equal(np.array(m_argmax), r_argmax.numpy())
        np.testing.assert_array_equal(np.array(m_processed), r_selfcond.numpy())
        np.testing.assert_array_equal(np.array(m_finished), r_finished.numpy())
        finished_log.append(np.array(m_finished))
    assert not finished_log[0].any() and finished_log[-1][0] and not finished_log[-1][1]


def test_compiled_step_identical_to_eager():
    b, c, v = 2, 32, 1000
    k = mx.random.split(mx.random.key(3), 4)
    logits = mx.array(with_ties(3, b, c, v))
    canvas, noise = S.random_canvas(k[0], b, c, v), S.random_canvas(k[1], b, c, v)
    u = S.sample_uniforms(k[2], (b, c))
    for step in (48, 17, 1):
        t = mx.array(S.temperature_f32(step, 48, 0.4, 0.8))
        eager, compiled = S.step(logits, canvas, t, u, noise, 0.1), S.compiled_step(logits, canvas, t, u, noise, 0.1)
        for e, g in zip(eager, compiled):
            assert e.dtype == g.dtype and mx.array_equal(e, g).item()
