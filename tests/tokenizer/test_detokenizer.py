"""IncrementalDetokenizer: streamed pieces concatenate to the full decode and never split a character."""
from __future__ import annotations

import random

import pytest

from llmrpc.services.tokenizer.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

MULTILINGUAL = [
    "héllo naïve café — déjà vu",
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ",
    "emoji 🎉🚀 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 and 🤖!",
    "Ελληνικά και русский текст, עברית, العربية",
    "math ∑∫√∞ ≠ ≤ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "plain ASCII with  double  spaces\nand\ttabs",
]


def stream(tokenizer, ids: list[int], chunk_sizes: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces, at = [], 0
    for size in chunk_sizes:
        pieces.append(detokenizer.push(ids[at : at + size]))
        at += size
    assert at >= len(ids)
    pieces.append(detokenizer.finish())
    assert detokenizer.text == "".join(pieces)
    return pieces


def check(tokenizer, ids: list[int], chunk_sizes: list[int]) -> list[str]:
    pieces = stream(tokenizer, ids, chunk_sizes)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in p for p in pieces), pieces
    return pieces


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_one_token_at_a_time_round_trips_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = check(tokenizer, ids, [1] * len(ids))
    assert "".join(pieces) == text


def test_emoji_split_over_byte_tokens_is_held_back_until_whole(tokenizer) -> None:
    ids = tokenizer.encode("a🎉", add_special_tokens=False)
    assert len(ids) >= 3  # byte-level BPE: the emoji's four bytes span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push([i]) for i in ids]
    assert pieces[0] == "a"
    assert pieces[1:-1] == [""] * (len(ids) - 2)
    assert pieces[-1] == "🎉"
    assert detokenizer.finish() == ""


def test_special_tokens_are_skipped(tokenizer) -> None:
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    body = tokenizer.encode("assistant\nHi 👋", add_special_tokens=False)
    ids = [special[0], *body, special[1]]
    pieces = check(tokenizer, ids, [1] * len(ids))
    assert "".join(pieces) == "assistant\nHi 👋"


def test_incomplete_character_at_the_end_is_returned_by_finish(tokenizer) -> None:
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)[:-1]  # cut inside the emoji
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.push([i]) for i in ids)
    assert streamed == "ok"
    rest = detokenizer.finish()
    assert streamed + rest == tokenizer.decode(ids, skip_special_tokens=True)
    assert rest.endswith(REPLACEMENT_CHAR)


def test_random_token_sequences(tokenizer) -> None:
    rng = random.Random(1234)
    vocab = len(tokenizer)
    # Tokens that are fragments of multi-byte characters, so sequences split characters often.
    fragments = sorted({i for text in MULTILINGUAL for i in tokenizer.encode(text, add_special_tokens=False)
                        if REPLACEMENT_CHAR in tokenizer.decode([i])})
    assert len(fragments) > 20
    multilingual_ids = [tokenizer.encode(t, add_special_tokens=False) for t in MULTILINGUAL]
    for _ in range(400):
        kind = rng.randrange(3)
        if kind == 0:  # anything in the vocabulary, special tokens included
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        elif kind == 1:  # mostly character fragments, in random order
            ids = [rng.choice(fragments) if rng.random() < 0.7 else rng.randrange(vocab)
                   for _ in range(rng.randrange(1, 40))]
        else:  # real text spliced at random token boundaries
            ids = []
            for _ in range(rng.randrange(1, 4)):
                source = rng.choice(multilingual_ids)
                a = rng.randrange(len(source))
                ids += source[a : rng.randrange(a + 1, len(source) + 1)]
        sizes = []
        while sum(sizes) < len(ids):
            sizes.append(rng.choice([1, 1, 1, 2, 3, 5]))
        check(tokenizer, ids, sizes)


def test_pushing_nothing_emits_nothing(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push([]) == ""
    assert detokenizer.push(tokenizer.encode("Hi", add_special_tokens=False)) == "Hi"
    assert detokenizer.push([]) == ""
    assert detokenizer.finish() == ""
