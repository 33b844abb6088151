"""Building blocks of the trained demo model: its tokenizer, config and generation settings.

The demo model ships with the package (`mlx_diffusiongemma/demo/model/`); `scripts/train_demo.py`
builds it from scratch with these pieces and the package's own trainer. The tokenizer is a small
BPE in the style of Gemma's (spaces as "▁", decoded by mlx-lm's SentencePiece streaming
detokenizer), trained on the task suite so that numbers and task words are single tokens, with the
Gemma 4 chat format and special tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from .files import CHARACTERS, SPECIAL_TOKENS, TURN_END, generation_config, write_tokenizer_config
from .tasks import FAMILIES, WEIGHTS, sample

VOCAB_SIZE = 800
CANVAS_LENGTH = 64


def corpus(n: int, seed: int = 0) -> Iterator[str]:
    """Prompts and answers of the training side of the task suite (for the tokenizer)."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    for i in range(n):
        prompt, answer = sample(rng, names[i % len(names)], held_out=False)
        yield f"user\n{prompt}"  # the turn headers of the chat format become tokens too
        yield f"model\n{answer}"
    for _ in range(50):  # every number 0-99 also as a bare token (an answer's first number)
        yield from (str(v) for v in range(100))


def build_tokenizer(folder: Path, vocab_size: int = VOCAB_SIZE, seed: int = 0, digits: bool = False) -> None:
    """Train the BPE on the task corpus and write tokenizer.json / tokenizer_config.json.

    `digits` splits numbers into single digits, as Gemma's own tokenizer does ("▁42" -> "▁", "4",
    "2"). Without it every number 0-99 is one token, so a fact about a number (is 37 even? what is
    15 + 40?) can only be learnt from prompts that hold that very number, and a held-out prompt's
    answer cannot be inferred."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    splits = [pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
              pre_tokenizers.Split("▁", behavior="merged_with_next")]
    if digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    # The decoder of Gemma's tokenizer.json, so mlx-lm streams with its SentencePiece detokenizer.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=CHARACTERS + ["▁"], show_progress=False)
    tok.train_from_iterator(corpus(20_000, seed), trainer=trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    write_tokenizer_config(folder)


def text_config(vocab_size: int, hidden: int = 192, layers: int = 6) -> dict:
    """Every architectural feature of the 26B model at a small width: routed experts (8, top-2)
    beside a dense MLP, sliding layers and a full layer with K=V, larger head dim and fewer KV
    heads on full layers (as 256/8 vs 512/2 in the 26B), self-conditioning."""
    full = layers - 1
    return {
        "model_type": "diffusion_gemma_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": hidden // 2 + hidden // 4,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "layer_types": ["full_attention" if i == full else "sliding_attention" for i in range(layers)],
        "per_layer_config": {str(full): {"head_dim": hidden // 2, "num_key_value_heads": 1}},
        "num_experts": 8,
        "top_k_experts": 2,
        "sliding_window": 128,
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }


def model_config(vocab_size: int, **sizes) -> dict:
    return {
        "model_type": "diffusion_gemma",
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": CANVAS_LENGTH,
        "text_config": text_config(vocab_size, **sizes),
        "tie_word_embeddings": True,
        "mlx_diffusiongemma_demo": "trained",
    }


def trained_generation_config(eos_ids: list[int]) -> dict:
    """The released model's sampler settings (48 steps, entropy bound 0.1, t 0.4-0.8)."""
    return generation_config(eos_ids, max_new_tokens=256)


def special_ids(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def training_mix(seed: int, weights: dict[str, float] | None = None) -> Iterator[tuple[str, str, str]]:
    """Endless (family, prompt, answer) draws from the training side, weighted by `weights`
    (default `WEIGHTS`; a family left out of `weights` keeps its default weight)."""
    rng = random.Random(seed)
    unknown = set(weights or {}) - set(WEIGHTS)
    if unknown:
        raise ValueError(f"no such task families: {', '.join(sorted(unknown))}")
    table = {**WEIGHTS, **(weights or {})}
    names = list(table)
    weights = [table[n] for n in names]
    while True:
        family = rng.choices(names, weights)[0]
        prompt, answer = sample(rng, family, held_out=False)
        yield family, prompt, answer


def card_template_ids(tokenizer, rng: random.Random, answer: str, end_id: int) -> tuple[list[int], list[bool]]:
    """A `card` answer written in a template's form, for template-shaped training examples: the
    token ids of the filled template, each hole's unused positions holding `end_id`, and per id
    whether inference pins it (the fixed text: the trainer leaves those clean, objective.py).

    Half the time the card's lines with holes of at most (sometimes exactly) the value's length
    plus 0-4 tokens of slack, as `dgemma fill` users write them; half the time the JSON layout of a
    card schema (string name, integer age, city as an enum of the demo's cities or a string;
    random lengths and key order), as `fill_json` lays it out."""
    from ..editing.schema import json_segments
    from ..editing.template import filled_ids, layout, parse
    from .tasks import CITIES

    fields = {}
    for line in answer.split("\n"):
        key, _, value = line.partition(": ")
        fields[key.lower()] = value
    keys = ["name", "age", "city"]
    if rng.random() < 0.5:
        lines, values = [], {}
        for key in keys:
            values[key] = " " + fields[key]  # the space goes into the hole (template.check_merges)
            n = len(tokenizer.encode(values[key], add_special_tokens=False))
            slack = rng.randint(0, 4)
            at_most = ".." if slack or rng.random() < 0.5 else ""
            lines.append(f"{key.capitalize()}:{{{{{key}:{at_most}{n + slack}}}}}")
        segments = parse("\n".join(lines))
    else:
        if rng.random() < 0.3:
            rng.shuffle(keys)
        spec = {"name": {"type": "string", "maxLength": rng.randint(6, 12)}, "age": {"type": "integer"},
                "city": ({"enum": list(CITIES)} if rng.random() < 0.5
                         else {"type": "string", "maxLength": rng.randint(6, 12)})}
        segments = json_segments({"type": "object", "properties": {k: spec[k] for k in keys}})
        values = {f"f{i}": fields[k] for i, k in enumerate(keys)}
    lay = layout(tokenizer, segments)
    return filled_ids(tokenizer, lay, values, end_id), [t >= 0 for t in lay.ids]


__all__ = ["VOCAB_SIZE", "CANVAS_LENGTH", "TURN_END", "build_tokenizer", "model_config", "trained_generation_config",
           "special_ids", "training_mix", "corpus", "card_template_ids"]
