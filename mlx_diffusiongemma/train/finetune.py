"""`dgemma finetune` without the terminal: settings, setup, and a run that yields reports.

    run = FinetuneRun.prepare(FinetuneSettings(model="demo", data="my-data", iters=200))
    for report in run.reports():   # loop.TrainReport, one per step
        ...
    run.save()                     # adapters.safetensors in the adapter folder

Names and defaults follow `mlx_lm.lora` (`--fine-tune-type`, `--num-layers`, `--batch-size`,
`--learning-rate`, `--adapter-path`, `--save-every`, ...). The adapter folder is mlx-lm's:
`adapter_config.json` plus `adapters.safetensors`, and `{step:07d}_adapters.safetensors`
every `save_every` steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.optimizers as optim

from ..checkpoint.adapters import ADAPTER_WEIGHTS, FINE_TUNE_TYPES, lora_parameters
from ..errors import CheckpointError
from . import lora as L
from .data import DEFAULT_MAX_SEQ_LENGTH, DataError, dataset_items, iterate_batches, load_dataset
from .loop import TrainReport, evaluate, train

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor}
SCHEDULES = ("constant", "cosine")
DEFAULT_NUM_LAYERS = 16  # mlx-lm's default; models with fewer layers train all of them


@dataclass
class FinetuneSettings:
    model: str
    data: str
    fine_tune_type: str = "lora"
    optimizer: str = "adam"
    num_layers: int | None = None  # None: 16, or every layer of a smaller model; -1: all
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    batch_size: int = 4
    iters: int = 1000
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup: int = 0
    val_batches: int = 25  # -1: the whole validation set
    steps_per_eval: int = 200
    save_every: int = 100
    adapter_path: str = "adapters"
    resume_adapter_file: str | None = None
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    grad_checkpoint: bool = False
    grad_clip: float | None = 1.0
    seed: int = 0
    offline: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in adapter_config.json

    def check(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(f"--fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "iters", "steps_per_eval", "save_every", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"--learning-rate must be a finite number > 0, got {self.learning_rate}")
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"--lora-scale must be a finite number, got {self.lora_scale}")
        if self.val_batches < -1:
            raise ValueError("--val-batches must be -1 (all), 0 (none) or more")
        if self.warmup < 0 or self.warmup >= self.iters:
            raise ValueError("--warmup must be in 0..iters-1")


def build_optimizer(s: FinetuneSettings):
    """The optimizer with its learning-rate schedule (`mlx_lm.tuner.utils.build_schedule`)."""
    from mlx_lm.tuner.utils import build_schedule

    if s.lr_schedule == "cosine":
        lr = build_schedule({"name": "cosine_decay", "arguments": [s.learning_rate, s.iters - s.warmup],
                             "warmup": s.warmup})
    elif s.warmup:
        lr = build_schedule({"name": "linear_schedule", "arguments": [s.learning_rate, s.learning_rate, 1],
                             "warmup": s.warmup})
    else:
        lr = s.learning_rate
    return OPTIMIZERS[s.optimizer](learning_rate=lr)


def checkpoint_feed_forward(model) -> None:
    """Gradient checkpointing: each layer's feed-forward block (dense MLP, router, experts: most
    of a layer's activations) is recomputed in the backward pass instead of stored. Done per
    instance, not by patching the class as `mlx_lm.tuner.trainer.grad_checkpoint` does, so other
    models in the process are untouched; and not around the whole layer, because the attention
    reads the cached prefix K/V through a closure, which `mx.checkpoint` would cut off from the
    gradient."""
    for layer in model.layers:
        fn = type(layer).feed_forward

        def inner(params, h, layer=layer, fn=fn):
            layer.update(params)
            return fn(layer, h)

        checkpointed = mx.checkpoint(inner)

        def feed_forward(h, layer=layer, checkpointed=checkpointed):
            return checkpointed(layer.trainable_parameters(), h)

        object.__setattr__(layer, "feed_forward", feed_forward)


@dataclass
class FinetuneRun:
    settings: FinetuneSettings
    model: Any
    tokenizer: Any
    optimizer: Any
    train_items: list
    valid_items: list
    adapter_dir: Path
    trainable: int
    total: int
    num_layers: int
    fast_activations: bool
    adapter_config: dict[str, Any]  # written with the weights (`save`)
    step: int = 0
    started: float = 0.0
    last_val_loss: float | None = None
    initial_val_loss: float | None = None

    @classmethod
    def prepare(cls, s: FinetuneSettings, *, model=None, tokenizer=None) -> "FinetuneRun":
        """Load (unless given) the model, read the data, set up LoRA or full training (the
        adapter config is written with the first save). Raises DataError / CheckpointError / ValueError on bad input."""
        from ..api import load

        s.check()
        if model is None:
            model, tokenizer = load(s.model, offline=s.offline)
        dataset = load_dataset(s.data, tokenizer, max_seq_length=s.max_seq_length, require_valid=s.val_batches != 0)
        eos = _padding_id(model, tokenizer)
        train_items = dataset_items(dataset.train, model.canvas_length, eos)
        valid_items = dataset_items(dataset.valid, model.canvas_length, eos)
        if len(train_items) < s.batch_size:
            raise DataError(f"{s.data}: {len(train_items)} training canvases is fewer than --batch-size {s.batch_size}")
        n = s.num_layers if s.num_layers is not None else min(DEFAULT_NUM_LAYERS, len(model.layers))
        n = len(model.layers) if n == -1 else n
        lora = lora_parameters(s.lora_rank, s.lora_scale, s.lora_dropout) if s.fine_tune_type == "lora" else None
        L.setup_finetune(model, s.fine_tune_type, n, lora)
        if s.resume_adapter_file:
            _resume(model, Path(s.resume_adapter_file).expanduser())
        if s.grad_checkpoint:
            checkpoint_feed_forward(model)
        # The cheap float32 GELU/tanh (`model.activations`: same functions to float32 rounding) on the CPU
        # backend, where MLX's transcendental kernels dominate a small model's step; not for
        # half-precision activations, where the polynomial would lose accuracy. The experts stay
        # on the gather path (measured no slower than the dense form at the demo's size).
        fast = mx.default_device() == mx.cpu and model.embed_dtype == mx.float32
        trainable, total = L.parameter_counts(model)
        adapter_dir = Path(s.adapter_path).expanduser()
        config = {k: v for k, v in asdict(s).items() if k not in ("extra", "offline")}
        config.update(s.extra)
        config.update(fine_tune_type=s.fine_tune_type, num_layers=n, lora_parameters=lora,
                      model=str(s.model), data=str(s.data))
        # The folder now (a bad path fails before training); adapter_config.json only with the
        # first weights (`save`): a run stopped before it leaves an earlier run's folder as it was.
        adapter_dir.mkdir(parents=True, exist_ok=True)
        return cls(s, model, tokenizer, build_optimizer(s), train_items, valid_items, adapter_dir,
                   trainable, total, n, fast, config)

    # -- running -----------------------------------------------------------------------------------
    def validate(self) -> float:
        s = self.settings
        batches = iterate_batches(self.valid_items, s.batch_size, loop=False)
        if s.val_batches > 0:
            batches = (b for i, b in zip(range(s.val_batches), batches))
        loss = evaluate(self.model, batches, seed=s.seed + 1, **self.loss_options())
        self.last_val_loss = loss
        return loss

    def loss_options(self) -> dict[str, float]:
        g = self.model.generation
        return {"t_min": g.t_min, "t_max": g.t_max}

    def reports(self) -> Iterator[TrainReport]:
        """Train, yielding a report per step; saves every `save_every` steps. Closing the
        generator (or Ctrl-C in the caller) stops after the current step; call `save()`."""
        s = self.settings
        batches = iterate_batches(self.train_items, s.batch_size, seed=s.seed)
        validate = self.validate if s.val_batches != 0 and self.valid_items else None
        self.started = time.perf_counter()
        self.model.set_training_kernels(dense_experts=False, fast_activations=self.fast_activations)
        try:
            if validate is not None:  # the starting point, as mlx-lm reports at iteration 1
                self.model.eval()
                self.initial_val_loss = validate()
            for report in train(self.model, self.optimizer, batches, iters=s.iters, seed=s.seed,
                                report_every=1, validate=validate, steps_per_eval=s.steps_per_eval,
                                grad_clip=s.grad_clip, **self.loss_options()):
                self.step = report.step
                if report.step % s.save_every == 0 and report.step < s.iters:
                    self.save(checkpoint=True)
                yield report
        finally:
            self.model.set_training_kernels(dense_experts=False, fast_activations=False)
            self.model.eval()

    def save(self, *, checkpoint: bool = False) -> Path:
        """Write adapters.safetensors (and with `checkpoint` also `{step:07d}_adapters.safetensors`)."""
        path = L.save_adapters(self.model, self.adapter_dir / ADAPTER_WEIGHTS, self.adapter_config)
        if checkpoint:
            L.save_adapters(self.model, self.adapter_dir / f"{self.step:07d}_{ADAPTER_WEIGHTS}")
        return path


def _padding_id(model, tokenizer) -> int:
    """The id that pads a target canvas after the answer: the checkpoint's first EOS id."""
    ids = tuple(model.generation.eos_token_ids)
    if ids:
        return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise CheckpointError("the checkpoint declares no EOS token to pad canvases with")
    return int(tokenizer.eos_token_id)


def _resume(model, path: Path) -> None:
    """Load adapter weights of an earlier run into the freshly wrapped model (same settings)."""
    from ..checkpoint.safetensors import check_safetensors

    if not path.is_file():
        raise CheckpointError(f"{path}: no such adapter file")
    check_safetensors(path)
    weights = mx.load(str(path))
    params = dict(L.adapter_weights(model))
    wrong = [k for k, v in weights.items() if k not in params or params[k].shape != v.shape]
    missing = [k for k in params if k not in weights]
    if wrong or missing:
        name = (wrong or missing)[0]
        raise CheckpointError(f"{path} does not match this run's trainable parameters (first: {name}); "
                              "use the same --fine-tune-type, --num-layers and --lora-rank as the run that wrote it")
    model.load_weights(list(weights.items()), strict=False)
