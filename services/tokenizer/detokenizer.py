"""Incremental detokenization: token ids arriving a few at a time → stable text pieces.

Decoding each new token on its own is wrong for byte-level BPE (one emoji may span
four tokens) and for SentencePiece (a token's leading space depends on what precedes
it). So, as in vLLM and SGLang, each push decodes a small window — the tokens of the
last emitted piece ("surrounding" context) plus the new ones — and emits only the
part past the context. Text that ends in U+FFFD is held back: its last UTF-8
sequence is not complete yet. The pieces concatenate to exactly
`tokenizer.decode(all_ids, skip_special_tokens=True)`; `finish()` settles any
remainder against one full decode.
"""
from __future__ import annotations

from typing import Iterable, Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The part of a Hugging Face tokenizer that detokenization needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one completion's token stream into text pieces that never split a character."""

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._surround = 0  # window start: the tokens of the last emitted piece
        self._read = 0  # tokens before this index are already emitted as text

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds new tokens; returns the text that became stable (possibly empty)."""
        self.token_ids.extend(token_ids)
        if len(self.token_ids) == self._read:
            return ""
        context = self._decode(self.token_ids[self._surround : self._read])
        window = self._decode(self.token_ids[self._surround :])
        # A window that does not extend its context (a decoder that rewrites earlier
        # text) is held back too; finish() settles it against the full decode.
        if window.endswith(REPLACEMENT_CHAR) or not window.startswith(context):
            return ""
        piece = window[len(context) :]
        self._surround, self._read = self._read, len(self.token_ids)
        self.text += piece
        return piece

    def finish(self) -> str:
        """Returns the held-back rest, incomplete characters included, so the text is whole."""
        full = self._decode(self.token_ids)
        if full.startswith(self.text):
            piece = full[len(self.text) :]
        else:  # the emitted text can no longer change; best effort from the window
            context = self._decode(self.token_ids[self._surround : self._read])
            piece = self._decode(self.token_ids[self._surround :])[len(context) :]
        self._surround = self._read = len(self.token_ids)
        self.text += piece
        return piece

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
