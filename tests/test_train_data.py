"""Fine-tuning data: jsonl folders -> Examples rendered with the chat template -> batches; every
kind of bad line is a DataError naming its file and line."""

from __future__ import annotations

import json

import pytest

from mlx_diffusiongemma.demo.files import SPECIAL_TOKENS, TURN_END, build_tokenizer
from mlx_diffusiongemma.prompts.render import render_messages
from mlx_diffusiongemma.train.data import (
    DataError, dataset_items, iterate_batches, load_dataset, load_examples,
)

END = SPECIAL_TOKENS.index(TURN_END)
EOS = SPECIAL_TOKENS.index("<eos>")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from mlx_lm.tokenizer_utils import load as load_tok

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return load_tok(folder, eos_token_ids=[EOS, END])


def write(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / name).write_text("\n".join(lines) + "\n")


def test_both_formats_render_like_generation(tok, tmp_path):
    write(tmp_path, "train.jsonl", [
        {"prompt": "Uppercase: cat", "completion": "CAT"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo"}, {"role": "user", "content": "Uppercase: dog"},
                      {"role": "assistant", "content": "DOG"}]},
        "",  # blank lines are skipped
    ])
    first, second = load_examples(tmp_path / "train.jsonl", tok)
    # The prompt is exactly what generation renders (ending with the model-turn header).
    assert list(first.prompt_ids) == render_messages(tok, [{"role": "user", "content": "Uppercase: cat"}])
    assert tok.decode(list(first.prompt_ids)).endswith("<|turn>model\n")
    # The answer is the reply's tokens followed by the turn end, nothing after it.
    assert list(first.answer_ids) == tok.encode("CAT", add_special_tokens=False) + [END]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "yo"}, {"role": "user", "content": "Uppercase: dog"}]
    assert list(second.prompt_ids) == render_messages(tok, history)
    assert tok.decode(list(second.answer_ids)) == "DOG" + TURN_END


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"text": "hello"}, "expected 'messages', or both 'prompt' and 'completion'"),
    ({"prompt": "a"}, "expected 'messages', or both"),
    ({"prompt": "a", "completion": 3}, "'completion' must be a string"),
    ({"prompt": "a", "completion": "  "}, "the answer is empty"),
    ({"prompt": "a", "completion": "b", "messages": []}, "not both"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}]}, "last message must be the assistant's"),
    ({"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}, "role 'robot'"),
    ({"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}, "no user message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "'role' and 'content'"),
    ({"prompt": "x" * 300, "completion": "y"}, "over --max-seq-length 256"),
])
def test_bad_lines_name_file_and_line(tok, tmp_path, line, message):
    write(tmp_path, "train.jsonl", [{"prompt": "ok", "completion": "fine"}, line])
    with pytest.raises(DataError) as e:
        load_examples(tmp_path / "train.jsonl", tok, max_seq_length=256)
    assert str(e.value).startswith("train.jsonl:2: ")
    assert message in str(e.value)


def test_folder_errors(tok, tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        load_dataset(tmp_path / "nope", tok)
    write(tmp_path, "valid.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="train.jsonl is missing"):
        load_dataset(tmp_path, tok)
    write(tmp_path, "train.jsonl", [""])
    with pytest.raises(DataError, match="no examples"):
        load_dataset(tmp_path, tok)
    write(tmp_path, "train.jsonl", [{"prompt": "a", "completion": "b"}])
    (tmp_path / "valid.jsonl").unlink()
    with pytest.raises(DataError, match="valid.jsonl is missing"):
        load_dataset(tmp_path, tok)
    data = load_dataset(tmp_path, tok, require_valid=False)
    assert len(data.train) == 1 and data.valid == [] and data.test == []


def test_oversized_line_is_refused(tok, tmp_path, monkeypatch):
    import mlx_diffusiongemma.train.data as D

    monkeypatch.setattr(D, "MAX_LINE_BYTES", 100)
    write(tmp_path, "train.jsonl", [{"prompt": "a" * 200, "completion": "b"}])
    with pytest.raises(DataError, match="train.jsonl:1: line of .* bytes is over the limit"):
        load_examples(tmp_path / "train.jsonl", tok)


def test_batches_cover_every_item_and_pad_left(tok, tmp_path):
    rows = [{"prompt": "p" * n, "completion": "a" * (n % 7 + 1)} for n in range(1, 12)]
    write(tmp_path, "train.jsonl", rows)
    examples = load_examples(tmp_path / "train.jsonl", tok)
    items = dataset_items(examples, 8, EOS)
    assert len(items) == len(rows)  # every answer here fits one canvas of 8
    assert all(it.target[-1] == EOS or it.target[-1] == END for it in items)
    batches = list(iterate_batches(items, 4, loop=False))
    assert [b.size for b in batches] == [4, 4, 3]
    seen = sorted(tuple(row) for b in batches for row in b.target.tolist())
    assert seen == sorted(it.target for it in items)
    b = batches[0]
    assert not b.context_valid[:, -1].tolist().count(False)  # padding on the left only
    # Looping batches are full, and the order depends on the seed.
    looped = iterate_batches(items, 4, seed=1)
    assert all(next(looped).size == 4 for _ in range(5))
    with pytest.raises(DataError, match="fewer than the batch size"):
        next(iterate_batches(items[:2], 4))
