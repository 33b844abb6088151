"""What a demo model's folder holds besides its weights: Gemma 4's special tokens and chat template,
the tokenizer files (a character-level tokenizer for the random demo and the tests' tiny
checkpoints; the trained demo's BPE is built by `build.py`) and generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..model.args import SAMPLER_DEFAULTS

# Special tokens of the Gemma 4 chat format, at fixed ids (pad 0, eos 1, bos 2 as in Gemma).
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|think|>",
]
TURN_END = "<turn|>"


# Jinja chat template in the Gemma 4 format: <bos><|turn>user\n...<turn|>\n<|turn>model\n.
# Thinking is switched on by `enable_thinking`, which puts <|think|> in a system turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% set think = enable_thinking is defined and enable_thinking %}"
    "{% if think or sys is not none %}"
    "{{ '<|turn>system\\n' }}{% if think %}{{ '<|think|>' }}{% endif %}"
    "{{ sys if sys is not none else '' }}{{ '<turn|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] + '<turn|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)


# Character-level vocabulary: every token decodes to whole characters, so a decoded reply
# re-encodes to the same ids (chat sessions can then reuse their cache across turns).
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + list("éèàüöäçñ–—…’“”•€£°")


# Gemma 4's image tokens (begin, soft token, end): optional, after the characters so that no other
# id moves (the demo model and the text-only test models keep their vocabulary).
IMAGE_TOKENS = ["<|image>", "<|image|>", "<image|>"]


def build_tokenizer(folder: Path, image_tokens: bool = False) -> dict[str, int]:
    """Write a character-level tokenizer (specials + characters, BPE without merges) and its
    config, with the Gemma 4 chat template; `image_tokens` adds Gemma 4's three image tokens at
    the end (ids in `image_token_ids()`). Returns the special-token ids."""
    from tokenizers import Tokenizer, decoders, models

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = SPECIAL_TOKENS + (IMAGE_TOKENS if image_tokens else [])
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS + (IMAGE_TOKENS if image_tokens else []))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    write_tokenizer_config(folder)
    return {t: vocab[t] for t in specials}


def write_tokenizer_config(folder: Path) -> None:
    """tokenizer_config.json: a fast tokenizer with Gemma's special tokens and the chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def generation_config(eos_ids: list[int], **overrides) -> dict:
    """generation_config.json with the reference sampler's defaults (`overrides` change some)."""
    d = SAMPLER_DEFAULTS
    config = {
        "max_denoising_steps": d["max_denoising_steps"],
        "sampler_config": {"entropy_bound": d["entropy_bound"], "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": d["t_min"],
        "t_max": d["t_max"],
        "stability_threshold": d["stability_threshold"],
        "confidence_threshold": d["confidence_threshold"],
        "eos_token_id": list(eos_ids),
        "pad_token_id": 0,
    }
    return config | overrides


def tokenizer_vocab_size(image_tokens: bool = False) -> int:
    return len(SPECIAL_TOKENS) + len(CHARACTERS) + (len(IMAGE_TOKENS) if image_tokens else 0)


def image_token_ids() -> dict[str, int]:
    """config.json's boi / image / eoi token ids for `build_tokenizer(..., image_tokens=True)`."""
    base = len(SPECIAL_TOKENS) + len(CHARACTERS)
    return {"boi_token_id": base, "image_token_id": base + 1, "eoi_token_id": base + 2}
