"""Fine-tuning data: a folder of JSON Lines files -> `Example`s -> batches of canvas items.

The folder holds `train.jsonl` and `valid.jsonl` (and optionally `test.jsonl`), as for mlx-lm.
Each line is one JSON object in one of two forms:

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`; the last
  message is the assistant reply that is trained, everything before it is the prompt;
- completion: `{"prompt": "...", "completion": "..."}` (one user turn, one reply).

Prompts are rendered with the checkpoint's chat template exactly as generation renders them
(`prompts.render.render_messages`), so what is trained is what runs. The answer is the tokens the
template writes for the reply, up to and including the turn-end token (Gemma 4's `<turn|>`, one
of the checkpoint's EOS ids). Sizes are bounded (file, line, examples, tokens) and every bad line
is reported with its file and line number.
"""

from __future__ import annotations

import json
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DiffusionGemmaError
from ..prompts.render import render_messages
from .objective import Batch, Example, canvas_items, make_batch

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant")
MAX_FILE_BYTES = 1 << 30  # 1 GiB per split
MAX_LINE_BYTES = 4 << 20  # 4 MiB per example
MAX_EXAMPLES = 1_000_000
DEFAULT_MAX_SEQ_LENGTH = 2048
TURN_END = "<turn|>"


class DataError(DiffusionGemmaError):
    """A data folder or file is missing, too large, or holds a line that is not a valid example."""


@dataclass
class Dataset:
    """The examples of each split (`test` is empty when the folder has no test.jsonl)."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]


# -- reading ---------------------------------------------------------------------------------------


def read_jsonl(path: Path, *, max_bytes: int = MAX_FILE_BYTES, max_examples: int = MAX_EXAMPLES) -> Iterator[tuple[int, dict]]:
    """Yield `(line number, object)` for each non-blank line; a DataError names the first bad one."""
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise DataError(f"{path} is not a regular file (a pipe, socket or device)")
    size = info.st_size
    if size > max_bytes:
        raise DataError(f"{path}: {size / 2**20:.0f} MiB is over the limit of {max_bytes / 2**20:.0f} MiB")
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path.name}:{lineno}: line of {len(raw)} bytes is over the limit of {MAX_LINE_BYTES}")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path.name}:{lineno}: not valid JSON ({e})") from None
            except RecursionError:
                raise DataError(f"{path.name}:{lineno}: JSON nested too deeply to be an example") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path.name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            count += 1
            if count > max_examples:
                raise DataError(f"{path.name}: more than {max_examples} examples")
            yield lineno, obj


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} must be a string, got {type(value).__name__}")
    return value


def conversation(record: dict, where: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, reply text) of one record in either format."""
    has_chat = "messages" in record
    has_completion = "prompt" in record or "completion" in record
    if has_chat and has_completion:
        raise DataError(f"{where}: give either 'messages' or 'prompt'/'completion', not both")
    if has_chat:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
            role = m["role"]
            if role not in ROLES:
                raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
            clean.append({"role": role, "content": _text(m["content"], where, f"messages[{i}].content")})
        if clean[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's reply (the trained answer)")
        if not any(m["role"] == "user" for m in clean[:-1]):
            raise DataError(f"{where}: no user message before the assistant's reply")
        return clean[:-1], clean[-1]["content"]
    if "prompt" in record and "completion" in record:
        prompt = _text(record["prompt"], where, "prompt")
        return [{"role": "user", "content": prompt}], _text(record["completion"], where, "completion")
    raise DataError(f"{where}: expected 'messages', or both 'prompt' and 'completion' (keys: {', '.join(sorted(record)) or 'none'})")


def turn_end_id(tokenizer) -> int:
    """The id that ends a model turn: `<turn|>` when the vocabulary has it, else the EOS token."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if TURN_END in vocab:
        return int(vocab[TURN_END])
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has neither a <turn|> token nor an EOS token to end answers with")
    return int(tokenizer.eos_token_id)


def encode_example(tokenizer, prompt: list[dict[str, str]], answer: str) -> Example:
    """Render one conversation: the prompt as generation renders it (ending with the model-turn
    header), the answer as the template writes the reply, cut after its turn-end token."""
    end = turn_end_id(tokenizer)
    prompt_ids = render_messages(tokenizer, prompt)
    answer_ids: list[int] | None = None
    if getattr(tokenizer, "chat_template", None) is not None:
        full = render_messages(tokenizer, prompt + [{"role": "assistant", "content": answer}], None,
                               add_generation_prompt=False)
        if full[: len(prompt_ids)] == prompt_ids and end in full[len(prompt_ids):]:
            rest = full[len(prompt_ids):]
            answer_ids = rest[: rest.index(end) + 1]
    if answer_ids is None:
        # A template that renders the reply's turn differently from the generation prompt (or no
        # template): the reply's own tokens, then the turn end.
        answer_ids = [int(i) for i in tokenizer.encode(answer, add_special_tokens=False)] + [end]
    return Example(tuple(prompt_ids), tuple(answer_ids))


def load_examples(path: Path, tokenizer, *, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH) -> list[Example]:
    """Every example of one .jsonl file; an example longer than `max_seq_length` tokens (prompt
    plus answer) is an error, not silently truncated."""
    path = Path(path)
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path.name}:{lineno}"
        prompt, answer = conversation(record, where)
        if not answer.strip():
            raise DataError(f"{where}: the answer is empty")
        ex = encode_example(tokenizer, prompt, answer)
        n = len(ex.prompt_ids) + len(ex.answer_ids)
        if n > max_seq_length:
            raise DataError(f"{where}: {n} tokens (prompt {len(ex.prompt_ids)} + answer {len(ex.answer_ids)}) "
                            f"is over --max-seq-length {max_seq_length}")
        examples.append(ex)
    return examples


def load_dataset(folder: str | Path, tokenizer, *, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                 require_valid: bool = True) -> Dataset:
    """Read `train.jsonl`, `valid.jsonl` and the optional `test.jsonl` of a data folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder (expected train.jsonl and valid.jsonl inside)")
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            if split == "train" or (split == "valid" and require_valid):
                raise DataError(f"{folder}: {split}.jsonl is missing")
            splits[split] = []
            continue
        splits[split] = load_examples(path, tokenizer, max_seq_length=max_seq_length)
        if split in ("train", "valid") and not splits[split] and (split == "train" or require_valid):
            raise DataError(f"{path}: no examples")
    return Dataset(**splits)


# -- batching --------------------------------------------------------------------------------------


def dataset_items(examples: Sequence[Example], canvas_length: int, eos_id: int) -> list:
    """Every canvas item (context, target canvas) of every example."""
    items = []
    for ex in examples:
        items.extend(canvas_items(ex, canvas_length, eos_id))
    return items


def iterate_batches(items: Sequence, batch_size: int, *, seed: int = 0, loop: bool = True,
                    pad_id: int = 0) -> Iterator[Batch]:
    """Batches of canvas items. Items are grouped by context length (little left padding, few
    distinct shapes), the order of the groups is shuffled each epoch with `seed`. With `loop`
    the iterator never ends (training); without it every item is seen once (evaluation), and
    the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    if not items:
        raise DataError("no training items")
    if loop and len(items) < batch_size:
        raise DataError(f"{len(items)} canvas items is fewer than the batch size {batch_size}")
    order = sorted(range(len(items)), key=lambda i: len(items[i].context))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if loop:
        groups = [g for g in groups if len(g) == batch_size]
    rng = random.Random(seed)
    while True:
        if loop:
            rng.shuffle(groups)
        for g in groups:
            yield make_batch([items[i] for i in g], pad_id=pad_id)
        if not loop:
            return
