"""The tokenizer of a checkpoint folder, through mlx-lm's TokenizerWrapper."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..model.args import GenerationDefaults
from .files import check_regular_file

# Files the tokenizer loader may open; each must be a regular file when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def check_tokenizer_files(folder: Path) -> None:
    """A tokenizer must be there (transformers otherwise builds an empty one silently and every
    prompt becomes <unk>), and nothing it reads may be a pipe or a device."""
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            check_regular_file(path)
    for path in folder.glob("*.jinja"):
        check_regular_file(path)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"{folder}: no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files "
            "of the original checkpoint into this folder"
        )


def load_tokenizer(folder: Path, generation: GenerationDefaults):
    """mlx_lm's TokenizerWrapper (streaming detokenizer, chat template) with the EOS set."""
    from mlx_lm.tokenizer_utils import load as load_tok

    check_tokenizer_files(Path(folder))
    try:
        return load_tok(Path(folder), eos_token_ids=list(generation.eos_token_ids))
    except Exception as e:  # transformers raises many kinds for a missing/broken tokenizer
        raise CheckpointError(f"{folder}: could not load the tokenizer ({type(e).__name__}: {e})") from None
