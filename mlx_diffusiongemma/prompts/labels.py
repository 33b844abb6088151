"""Token ids -> the text each decodes to alone: how drafts (argmax canvases) are shown, token by token,
in the terminal's live view and in the server's drafts stream."""

from __future__ import annotations

from typing import Iterable


class TokenLabels:
    """Token id -> its text decoded alone, cached (drafts repeat tokens from step to step).

    `eos_ids` and `pad_id` are the end tokens: `is_end` tells them apart, so a view can draw them
    as it likes instead of as their special-token text."""

    def __init__(self, tokenizer, eos_ids: Iterable[int] = (), pad_id: int | None = None):
        self._decode = tokenizer.decode
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = pad_id
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        label = self._cache.get(token)
        if label is None:
            label = self._cache[token] = self._decode([token])
        return label

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def is_pad(self, token: int) -> bool:
        return self.pad_id is not None and token == self.pad_id
