"""Fast mode: fewer decoder FLOPs per committed token, each technique switchable.

The exact denoiser (`exact.py`) runs the reference sampler over the whole canvas at every step.
The fast denoiser runs the same block loop (`block.py`), the same entropy-bound step
(`sampler.step`) and the same noise stream, with the techniques `FastOptions` switches on:

- `freeze`: a position whose token has settled (its input token equals the argmax, and the
  argmax did not change since the previous step) is frozen: its token is final, it counts as
  accepted with entropy 0 (the canvas state FROZEN, see canvas.py) and the decoder no
  longer recomputes it. Only the live rows run through the decoder (`Model.denoise_rows`),
  attending to the frozen rows' per-layer K/V kept from their last computation (dKV-Cache /
  Fast-dLLM's approximation) and to the prompt cache, read in place.
- `eos_stop`: once an end-of-sequence token has settled at position e, positions after e are
  dropped (what the commit would cut anyway): no longer computed and out of the stop test. A
  canvas whose positions up to e are all frozen is finished.
- `top_k`: the sampler's math on the top-k processed logits of each row (`topk.py`: exact
  two-stage top-k, then the argmax, gap, draw, entropy and self-conditioning from k values).
  None: full-vocabulary math.
- `bucket`: the live-row count is padded up to a bucket (multiples of 8 to 64, then of 32),
  so the decoder and the compiled sampler see a handful of shapes instead of one per count
  (MLX compiles and plans kernels per shape). Padding rows compute on a dummy slot.
- `eos_tail_gap`: an end-of-sequence tail frozen at first sight: when every position from some
  position p to the end of the canvas has an end token as its argmax with a top-2 gap of at least
  this (or is already frozen or pinned there), those positions are frozen at once, at whatever
  step that happens, usually the first. `eos_stop` waits for the EOS to settle, which takes a
  second full-canvas step; on a trained model most of a short answer's canvas is such a tail at
  the first step. Their K/V stay those of the pass that predicted them (computed from their
  noisy input tokens): the same staleness as a frozen row, one step earlier. None: off.
- `commit_gap`: Prophet-style early commit: when every live row's top-2 gap of processed
  logits is at least this, the canvas is committed now; with `freeze`, a single row whose
  gap reaches it (and whose input already holds its argmax) is frozen without waiting for
  the argmax to repeat. Default 3 (with the bound window and thaw below): 1.5 was chosen on the
  demo, where canvases settle in a few steps (the smallest gap tried, 1, 1.5, 2, 3, whose
  per-family counts stayed within one prompt of the larger gaps'; `FastOptions.few_steps()`), and
  lost 2 and 4 `pick_long` answers of 50 on two draws of the many-step instrument against the
  window without early commit, where 3 lost none (docs/fast-mode.md). None: off.
- `stop_mean_over_canvas`: the stop test's mean entropy divides by every position the request did
  not pin, frozen ones counting as certain (entropy 0), as a settled row adds ~0 to the
  reference's whole-canvas mean. Off: it divides by the rows computed at the step, so once a tail
  is frozen the few answer rows alone must get below the threshold.

The turbo engine's techniques (mlx-vlm's opt-in canvas denoiser), measured on the many-step
instrument (scripts/bench_manystep.py, docs/fast-mode.md), and what holds that regime; on by
default: `refresh_frozen`, `bound_window` (4) and `thaw` (setting C, measured together), the
others off:

- `monotone`: monotone commit: a position the entropy-bound rule accepts is frozen at once at its
  sampled token (the settle rule waits for the argmax to repeat on an input that holds it).
- `refresh_frozen`: a position frozen at a token its K/V were not computed from (a monotone
  commit's sampled token, a tail frozen at first sight) runs through the decoder once more, its
  logits discarded, so that the live rows attend to K/V of its final token (the turbo forward set:
  live rows plus just-frozen ones). That includes an end-of-text tail frozen at first sight: its
  tokens are cut by the commit, but every live row attends to its K/V, which were computed from
  the noise the tail held at that step (on the many-step instrument, without early commit, those
  stale rows cost 15 of 50 `pick` and 16 of 50 `pick_long` answers against refreshing them once:
  docs/fast-mode.md).
- `refresh_every`: every that many steps, every frozen position runs through the decoder once
  more (its logits discarded), so the live rows attend to K/V computed against the canvas as it is
  now rather than as it was when the position settled (Fast-dLLM's periodic cache refresh; not a
  turbo technique, measured beside them).
- `bound_window`: the frozen positions within this distance of a live one run through the decoder
  at every step (their K/V refreshed too) and count in the step's entropy bound with the entropy
  they have now, as the tokens a canvas holds do on the exact path (their tokens stay frozen).
  Otherwise a frozen position counts as certain (entropy 0) and leaves the whole bound to the live
  rows, which then accept more positions per step than the exact path would: on free-choice tasks
  (`pick_long`, 24-40 different numbers in order) positions settle side by side on locally
  plausible tokens, and the duplicates and order breaks that the exact path avoids are frozen in.
- `thaw` (with `bound_window`): a frozen position in the window that the entropy bound does not
  accept is renoised and live again, as a held token the bound rejects is on the exact path
  (there it is replaced by noise at once). Settled tokens rarely move on the exact path (7 of 201
  on 6 `pick_long` prompts), but one that does is often what makes a long answer valid. A frozen
  row run again with its own token as input predicts that token (it was never thawed by an argmax
  that moved: tried, 0-1 such rows per answer), so the bound's verdict is the signal.
  On the many-step instrument freezing cost 20 of 43 `pick_long` answers; recomputing every frozen
  row at every step without counting it in the bound recovered 1 of 5 lost in 12 prompts; the
  window of 4 with thaw gives 40 of 50 against the exact path's 43 (36 against 37 on a second
  draw), the window alone 34 (docs/fast-mode.md).
- `confidence_commit` (and `confidence_commit_late` after `confidence_switch_step` steps: the
  two-stage threshold): a position whose top probability (of the processed logits) reaches the
  threshold is frozen at its argmax.
- `flush_after`: after that many steps of a block, the draft is committed (every live position at
  its argmax): a bound on passes per canvas.
- `repair`: once a block is finished, one decoder pass over the whole committed canvas (every row
  recomputed from the committed tokens), whose argmax becomes the committed canvas (user pins
  kept): positions frozen too early get a last chance to agree with their neighbours.

The freezing rules (`freeze`, `eos_stop`, `eos_tail_gap`, and `commit_gap`'s single rows) are a
step hook, `SettleRule`, run before the request's own hooks. The stop test is the reference's
(argmax canvas stable over `stability_threshold` steps and mean entropy below
`confidence_threshold`), the mean as `stop_mean_over_canvas` says. With every technique off the
fast denoiser computes every row at every step and gives the exact path's tokens (a test checks it).
"""


from __future__ import annotations

import mlx.core as mx

from ..model.cache import PromptCache
from . import canvas as canvas_state
from . import sampler
from .block import RowsCall, StepOutput, join_rows
from .canvas import CanvasState, StepView
from .options import FastOptions


def bucket_rows(n: int, canvas_length: int) -> int:
    """The padded row count for `n` live rows: a multiple of 8 up to 64, then of 32, capped at
    the canvas length (so a canvas of 256 has 14 shapes at most)."""
    step = 8 if n <= 64 else 32
    return min(canvas_length, -(-n // step) * step) if n else 0


class SettleRule:
    """Fast mode's freezing rule, a step hook of one block (canvas.py): after a step, the
    positions whose decoder input already held the argmax token and whose argmax did not change
    since the previous step are settled (with `commit_gap`, also those whose input held the argmax
    and whose top-2 gap reaches it). `freeze` freezes them; `eos_stop` freezes a settled EOS and
    every position after it (the commit cuts there, so they need no more work); `eos_tail_gap`
    freezes a tail of certain end tokens that reaches the canvas's end, without waiting for it
    to settle."""

    def __init__(self, fast: FastOptions, eos_ids: tuple[int, ...], stop_at_eos: bool):
        self.fast = fast
        self.eos = mx.array(list(eos_ids) or [-1], dtype=mx.int32)
        self.eos_stop = fast.eos_stop and stop_at_eos
        self.tail_gap = fast.eos_tail_gap if stop_at_eos else None
        self._previous: mx.array | None = None  # the last step's draft
        self.top_p: mx.array | None = None  # [C] the last step's top probability (1 where not computed)
        self.thawed: mx.array | None = None  # [C] frozen positions the last step's bound rejected (`thaw`)

    def _is_eos(self, argmax: mx.array) -> mx.array:
        return mx.any(argmax[:, None] == self.eos[None, :], axis=-1)

    def __call__(self, view: StepView) -> CanvasState:
        # The previous step's draft as the block loop left it: forced to the pins of the state
        # this step ran with (pins take effect at once).
        state = view.state
        thawed = self.thawed
        if thawed is not None:  # live again from here: renoised, they cannot settle at this step
            state = canvas_state.thaw(state, thawed)
            self.thawed = None
        if self._previous is None:
            previous = mx.full(view.argmax.shape, -1, dtype=mx.int32)
        else:
            previous = mx.where(state.pinned, state.ids, self._previous)
        self._previous = view.argmax
        confident = None
        threshold = self.fast.confidence_at(view.step)
        if threshold is not None and self.top_p is not None:
            confident = self.top_p >= threshold
        monotone = (view.accepted, view.canvas) if self.fast.monotone else None
        return self.settle(state, view.step_input, view.argmax, previous, view.gap, confident, monotone, thawed)

    def settle(self, state: CanvasState, step_input: mx.array, argmax: mx.array, previous: mx.array,
               gap: mx.array, confident: mx.array | None = None,
               monotone: tuple[mx.array, mx.array] | None = None, thawed: mx.array | None = None) -> CanvasState:
        """All arrays `[C]`; `gap` is +inf at rows not computed this step (they cannot settle by gap).
        `confident`: rows to freeze at their argmax (the confidence threshold); `monotone`: the
        step's (accepted, next canvas), the accepted rows frozen at their sampled token; `thawed`:
        rows just made live again (renoised: they do not settle on this step's input)."""
        same = (step_input == argmax) & ~state.pinned
        if thawed is not None:
            same = same & ~thawed
        settled = same & (argmax == previous)
        if self.fast.commit_gap is not None:
            settled = settled | (same & (gap >= self.fast.commit_gap) & mx.isfinite(gap))
        freeze_now = settled if self.fast.freeze else mx.zeros_like(settled)
        if confident is not None:
            freeze_now = freeze_now | (confident & ~state.pinned)
        tokens = argmax
        if monotone is not None:
            accepted, sampled = monotone
            taken = accepted & ~state.pinned & ~freeze_now
            tokens = mx.where(taken, sampled, argmax)
            freeze_now = freeze_now | taken
        if self.eos_stop:
            final = settled | state.pinned | freeze_now  # final tokens: frozen or given
            is_eos = self._is_eos(argmax) & final
            after = mx.cumsum(is_eos.astype(mx.int32)) > 0  # the first final EOS and everything after it
            freeze_now = freeze_now | (after & ~state.pinned)
        if self.tail_gap is not None:
            is_eos = self._is_eos(argmax)
            certain = (gap >= self.tail_gap) & mx.isfinite(gap)
            sure = is_eos & (certain | state.frozen | state.pinned)
            # Every position from here to the canvas's end is a sure end token: a suffix test, so
            # a confident EOS followed by anything else (a template's pinned text, an uncertain
            # row) freezes nothing.
            tail = mx.cumprod(sure.astype(mx.int32), reverse=True) > 0
            freeze_now = freeze_now | (tail & ~state.pinned)
        return canvas_state.freeze(state, freeze_now, tokens)

    def commit_gap_min(self, state: CanvasState, argmax: mx.array, gap: mx.array) -> mx.array:
        """The smallest top-2 gap the early commit looks at: over the positions that are not
        pinned, and (with `eos_stop`) only up to the first EOS that is itself certain (a gap of
        at least `commit_gap`, or pinned): what comes after it is cut by the commit anyway."""
        considered = ~state.pinned
        if self.eos_stop and self.fast.commit_gap is not None:
            is_eos = self._is_eos(argmax)
            certain = is_eos & ((gap >= self.fast.commit_gap) | state.pinned)
            after = (mx.cumsum(certain.astype(mx.int32)) - certain.astype(mx.int32)) > 0  # strictly after it
            considered = considered & ~after
        return mx.where(considered, gap, mx.inf).min()


class FastDenoiser:
    """Fast mode's denoiser (see the module docstring): every block runs with a `CanvasState`;
    the rows that are not FROZEN run through the decoder (`Model.denoise_rows`), pinned-but-not-
    frozen rows are computed and forced to their token, as on the exact path."""

    needs_state = True

    def __init__(self, model, cache: PromptCache, options: FastOptions, eos_ids: tuple[int, ...], stop_at_eos: bool):
        self.model = model
        self.cache = cache
        self.options = options
        self.eos_ids = eos_ids
        self.stop_at_eos = stop_at_eos

    def begin(self, block: int, state: CanvasState | None) -> "_FastBlock":
        return _FastBlock(self, SettleRule(self.options, self.eos_ids, self.stop_at_eos))


class _FastBlock:
    defers_sync = False  # the live rows are read from the host at every step

    def __init__(self, denoiser: FastDenoiser, rule: SettleRule):
        self.d = denoiser
        self.rule = rule
        self.hooks = (rule,)
        self.c = denoiser.model.canvas_length
        self.kv = denoiser.model.make_canvas_kv()
        self.soft: mx.array | None = None  # [1, C + 1, D] self-conditioning embedding of every row's last step
        self.live_rows: list[int] = []
        self.padded_rows: list[int] = []
        self._rows: list[int] = []
        self._computed: list[bool] = []
        self._bounded: mx.array | None = None  # [1, rows] frozen positions counted in the entropy bound (None: none)
        self.kv_ids: mx.array | None = None  # [C] the token each position's K/V were last computed from
        self.steps = 0

    def _pad(self, a: mx.array) -> mx.array:
        """`a` with slot C appended (a copy of position 0): where padding rows read."""
        return mx.concatenate([a, a[..., :1]], axis=-1)

    def call(self, canvas: mx.array, state: CanvasState) -> RowsCall | None:
        c = self.c
        frozen = state.frozen.tolist()
        live = [i for i in range(c) if not frozen[i]]
        if not live:
            return None
        every = self.d.options.refresh_every
        if every is not None and self.steps and self.steps % every == 0:
            refresh = [i for i in range(c) if frozen[i]]  # periodic: every frozen row, fresh K/V
        elif self.d.options.refresh_frozen:
            refresh = self._refresh_rows(state)
        else:
            refresh = []
        window = self.d.options.bound_window
        near = set() if window is None else _near(live, frozen, window)
        # Live and bounded rows in canvas order: the bound breaks entropy ties by position, as the exact path does.
        real = sorted(live + list(near)) + [r for r in refresh if r not in near]
        width = bucket_rows(len(real), c) if self.d.options.bucket else len(real)
        self._rows = real + [c] * (width - len(real))
        self._computed = [r < c and not frozen[r] for r in self._rows]  # rows whose step results count
        self._bounded = mx.array([[r in near for r in self._rows]]) if near else None
        rows = mx.array(self._rows, dtype=mx.int32)
        soft = None if self.soft is None else self.soft[:, rows]
        return RowsCall(canvas, rows, self.d.cache, self.kv, soft, len(real))

    def _refresh_rows(self, state: CanvasState) -> list[int]:
        """Frozen positions whose K/V were computed from another token than the one they are
        frozen at (`refresh_frozen`), the tail after a frozen end token included: the commit cuts
        its tokens, but the live rows still attend to its K/V."""
        if self.kv_ids is None:
            return []
        stale = (state.frozen & (state.ids != self.kv_ids)).tolist()
        return [i for i in range(self.c) if stale[i]]

    def sample(self, logits, call: RowsCall, canvas, argmax, t, u, noise_ids, state: CanvasState,
               entropy_bound) -> StepOutput:
        c, rows, fast, model = self.c, call.rows, self.d.options, self.d.model
        pad = self._pad
        valid = mx.array([self._computed])
        allowed = None
        if state.allowed is not None:
            allowed = mx.concatenate([state.allowed, state.allowed[:1]], axis=0)[rows][None]
        top_k = fast.top_k

        def keep(processed, top_ids):
            # Self-conditioning for the next step, per row (a row's embedding depends on its row only).
            if top_k is None:  # cast first, as the exact path (and the reference) do
                soft = model.soft_embeddings(processed.astype(model.embed_dtype))
            else:
                soft = model.soft_embeddings_top_k(top_ids, processed)
            if fast.confidence_commit is None:
                return [soft]
            return [soft, _top_probability(processed, top_k is not None)]

        pinned_rows = pad(state.pinned)[rows][None]
        bounded = valid
        if self._bounded is not None:  # frozen neighbours enter the bound with their entropy (their token stays)
            pinned_rows, bounded = pinned_rows & ~self._bounded, valid | self._bounded
        res, kept = sampler.chunked_step(logits, pad(canvas)[:, rows], t, pad(u)[:, rows], pad(noise_ids)[:, rows],
                                         entropy_bound, keep=keep, pinned=pinned_rows, ids=pad(state.ids)[rows][None],
                                         valid=bounded, allowed=allowed, top_k=top_k, with_gap=True)

        def scatter(full, part, fill=None):
            base = pad(full if fill is None else mx.full(full.shape, fill, dtype=part.dtype))
            return mx.put_along_axis(base, rows[None], part.astype(base.dtype), axis=-1)[..., :c]

        frozen, pinned = state.frozen[None], state.pinned[None]
        if fast.thaw and self._bounded is not None:  # a frozen row the bound rejects is renoised, as on the exact path
            rejected = scatter(argmax, self._bounded & ~res.accepted, False)
            frozen, pinned = frozen & ~rejected, pinned & ~rejected
            self.rule.thawed = rejected[0]
        next_canvas = mx.where(frozen, canvas, scatter(canvas, res.next_canvas))
        next_argmax = mx.where(frozen, argmax, scatter(argmax, res.argmax))
        accepted = pinned | scatter(argmax, res.accepted, False)
        entropy = scatter(argmax, res.token_entropy, 0.0).astype(mx.float32) * ~pinned
        gap = mx.where(frozen, mx.inf, scatter(argmax, res.gap, float("inf")).astype(mx.float32))
        if fast.refresh_frozen:  # the token each computed row's K/V now hold
            before = canvas[0] if self.kv_ids is None else self.kv_ids
            self.kv_ids = mx.put_along_axis(pad(before), rows, pad(canvas[0])[rows], axis=-1)[:c]
        if fast.confidence_commit is not None:
            top_p = join_rows([k[1] for k in kept])
            self.rule.top_p = mx.where(state.frozen, 1.0, scatter(argmax, top_p, 0.0)[0])
        soft_rows = join_rows([k[0] for k in kept])
        if self.soft is None:
            self.soft = mx.zeros((1, c + 1, soft_rows.shape[-1]), dtype=soft_rows.dtype)
        index = mx.broadcast_to(rows[None, :, None], soft_rows.shape)
        self.soft = mx.put_along_axis(self.soft, index, soft_rows, axis=1)
        # The stop test's mean: over every position the request did not pin (frozen ones count
        # as certain, entropy 0: canvas.py's convention), or over the rows computed at this step.
        if fast.stop_mean_over_canvas:
            counted = ~(state.pinned & ~state.frozen)[None]
        else:
            counted = scatter(argmax, valid & ~pad(state.pinned)[rows][None], False)
        early = None
        if fast.commit_gap is not None:
            early = self.rule.commit_gap_min(state, next_argmax[0], gap[0]) >= fast.commit_gap
        self.steps += 1
        if fast.flush_after is not None and self.steps >= fast.flush_after:
            early = mx.array(True)  # forced flush: the draft is committed now
        self.live_rows.append(call.live)
        self.padded_rows.append(len(self._rows))
        return StepOutput(next_canvas, next_argmax, accepted, entropy, counted, gap=gap[0], early_stop=early)

    def advance(self, stopped: mx.array, deferred: bool) -> None:
        pass  # the self-conditioning buffer was updated by `sample`

    def final_call(self, argmax: mx.array, state: CanvasState) -> RowsCall | None:
        """The repair pass (`repair`): every row of the committed canvas `argmax` `[1, C]`."""
        if not self.d.options.repair:
            return None
        rows = mx.arange(self.c, dtype=mx.int32)
        soft = None if self.soft is None else self.soft[:, : self.c]
        return RowsCall(argmax, rows, self.d.cache, self.kv, soft, self.c)

    def repaired(self, logits: mx.array, call: RowsCall, argmax: mx.array, state: CanvasState) -> mx.array:
        """The committed canvas after the repair pass: its argmax, the request's own pins kept."""
        if state.allowed is not None:
            logits = mx.where(state.allowed[None], logits, mx.array(-float("inf"), dtype=logits.dtype))
        fixed = sampler.argmax_canvas(logits.astype(mx.float32))
        given = state.pinned & ~state.frozen
        self.live_rows.append(self.c)
        self.padded_rows.append(self.c)
        return mx.where(given[None], state.ids[None], fixed)

    def arrays(self) -> list[mx.array]:
        extra = [x for x in (self.kv_ids, self.rule.top_p) if x is not None]
        return ([] if self.soft is None else [self.soft]) + self.kv.state() + extra


def _near(live: list[int], frozen: list[bool], window: int) -> set[int]:
    """The frozen positions within `window` of a live one."""
    near = set()
    for i in live:
        near.update(j for j in range(max(0, i - window), min(len(frozen), i + window + 1)) if frozen[j])
    return near


def _top_probability(signal: mx.array, top_k: bool) -> mx.array:
    """`[1, L]` the top probability of each row: from the top-k log-probabilities (index 0 is the
    argmax), or from the full processed logits."""
    if top_k:
        return mx.exp(signal[..., 0])
    return mx.exp(signal.max(axis=-1) - mx.logsumexp(signal, axis=-1))
