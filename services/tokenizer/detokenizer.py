"""Incremental detokenization: token ids arriving a few at a time → stable text pieces.

Decoding each new token on its own is wrong for byte-level BPE (one emoji may span
four tokens) and for SentencePiece (a token's leading space depends on what precedes
it). So, as in vLLM and SGLang, each push decodes a small window — the tokens of the
last emitted piece ("surrounding" context) plus the new ones — and emits only the
part past the context. Text that ends in U+FFFD is held back: its last UTF-8
sequence is not complete yet. The pieces concatenate to exactly
`tokenizer.decode(all_ids, skip_special_tokens=True)`; `finish()` settles any
remainder against one full decode.

A fast tokenizer runs that window in Rust (`tokenizers.decoders.DecodeStream`, the same
algorithm). It is not used where the Hugging Face `decode` post-processes the backend's
text (`clean_up_tokenization_spaces`), since the pieces must add up to that text, and it
is left for the Python window when it raises (a decoder that rewrites earlier text). No
prompt prefix is given to it: the text is the decode of the output tokens alone, so a
SentencePiece completion starts without the space a prefix would give its first token.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The part of a Hugging Face tokenizer that detokenization needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def _decode_stream(tokenizer: Decoder, skip_special_tokens: bool) -> tuple[Any, Any] | None:
    """(DecodeStream, its backend tokenizer) when the backend's decode is the tokenizer's decode, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    from tokenizers.decoders import DecodeStream

    return DecodeStream(skip_special_tokens=skip_special_tokens), backend


class IncrementalDetokenizer:
    """Turns one completion's token stream into text pieces that never split a character.

    `decode_stream=False` keeps to the Python window even for a fast tokenizer.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True, decode_stream: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = _decode_stream(tokenizer, skip_special_tokens) if decode_stream else None
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._surround = 0  # window start: the tokens of the last emitted piece
        self._read = 0  # tokens before this index are already emitted as text

    @property
    def streaming(self) -> bool:
        """Whether pushes run in tokenizers' DecodeStream (else the Python window)."""
        return self._stream is not None

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds new tokens; returns the text that became stable (possibly empty)."""
        new = list(token_ids)
        self.token_ids.extend(new)
        if len(self.token_ids) == self._read:
            return ""
        if self._stream is not None:
            stream, backend = self._stream
            try:
                piece = stream.step(backend, new)
            except Exception:  # "invalid prefix": the window rewrote its context
                self._stream = None  # the Python window holds it back; finish() settles it
            else:
                return "" if piece is None else self._emit(piece)
        context = self._decode(self.token_ids[self._surround : self._read])
        window = self._decode(self.token_ids[self._surround :])
        # A window that does not extend its context (a decoder that rewrites earlier
        # text) is held back too; finish() settles it against the full decode.
        if window.endswith(REPLACEMENT_CHAR) or not window.startswith(context):
            return ""
        return self._emit(window[len(context) :])

    def _emit(self, piece: str) -> str:
        # Both paths move the window the same way, so either can take over from the other.
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
        self._stream = None  # nothing follows a finish
        self.text += piece
        return piece

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
