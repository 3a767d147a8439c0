"""IncrementalDetokenizer: streamed pieces concatenate to the full decode and never split a character.

Every test runs on both paths: tokenizers' DecodeStream (what the default model's fast
tokenizer gets) and the Python window. The tokenizers built at the end show when each is taken.
"""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

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


@pytest.fixture(params=[True, False], ids=["decode-stream", "window"])
def decode_stream(request) -> bool:
    return request.param


def detokenizer_of(tokenizer, decode_stream: bool) -> IncrementalDetokenizer:
    detokenizer = IncrementalDetokenizer(tokenizer, decode_stream=decode_stream)
    assert detokenizer.streaming == decode_stream  # the default model's tokenizer can stream
    return detokenizer


def stream(tokenizer, ids: list[int], chunk_sizes: list[int], decode_stream: bool = True) -> list[str]:
    detokenizer = detokenizer_of(tokenizer, decode_stream)
    pieces, at = [], 0
    for size in chunk_sizes:
        pieces.append(detokenizer.push(ids[at : at + size]))
        at += size
    assert at >= len(ids)
    pieces.append(detokenizer.finish())
    assert detokenizer.text == "".join(pieces)
    return pieces


def check(tokenizer, ids: list[int], chunk_sizes: list[int], decode_stream: bool = True) -> list[str]:
    pieces = stream(tokenizer, ids, chunk_sizes, decode_stream)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in p for p in pieces), pieces
    return pieces


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_one_token_at_a_time_round_trips_text(tokenizer, decode_stream, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = check(tokenizer, ids, [1] * len(ids), decode_stream)
    assert "".join(pieces) == text


def test_emoji_split_over_byte_tokens_is_held_back_until_whole(tokenizer, decode_stream) -> None:
    ids = tokenizer.encode("a🎉", add_special_tokens=False)
    assert len(ids) >= 3  # byte-level BPE: the emoji's four bytes span several tokens
    detokenizer = detokenizer_of(tokenizer, decode_stream)
    pieces = [detokenizer.push([i]) for i in ids]
    assert pieces[0] == "a"
    assert pieces[1:-1] == [""] * (len(ids) - 2)
    assert pieces[-1] == "🎉"
    assert detokenizer.finish() == ""


def test_special_tokens_are_skipped(tokenizer, decode_stream) -> None:
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    body = tokenizer.encode("assistant\nHi 👋", add_special_tokens=False)
    ids = [special[0], *body, special[1]]
    pieces = check(tokenizer, ids, [1] * len(ids), decode_stream)
    assert "".join(pieces) == "assistant\nHi 👋"


def test_incomplete_character_at_the_end_is_returned_by_finish(tokenizer, decode_stream) -> None:
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)[:-1]  # cut inside the emoji
    detokenizer = detokenizer_of(tokenizer, decode_stream)
    streamed = "".join(detokenizer.push([i]) for i in ids)
    assert streamed == "ok"
    rest = detokenizer.finish()
    assert streamed + rest == tokenizer.decode(ids, skip_special_tokens=True)
    assert rest.endswith(REPLACEMENT_CHAR)


def test_random_token_sequences(tokenizer, decode_stream) -> None:
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
        check(tokenizer, ids, sizes, decode_stream)


def test_pushing_nothing_emits_nothing(tokenizer, decode_stream) -> None:
    detokenizer = detokenizer_of(tokenizer, decode_stream)
    assert detokenizer.push([]) == ""
    assert detokenizer.push(tokenizer.encode("Hi", add_special_tokens=False)) == "Hi"
    assert detokenizer.push([]) == ""
    assert detokenizer.finish() == ""


# ---- which path a tokenizer gets, and why ------------------------------------------------


def word_tokenizer(vocab: list[str], decoder, pre_tokenizer=None, **hf) -> PreTrainedTokenizerFast:
    """A real fast tokenizer over a tiny word vocabulary, with the given decoder."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.Whitespace()
    backend.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, **hf)


def test_decode_stream_gives_the_same_pieces_as_the_window(tokenizer) -> None:
    text = "emoji 🎉🚀 family 👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    ids = tokenizer.encode(text, add_special_tokens=False)
    sizes = [1, 2, 1, 3] * len(ids)
    assert stream(tokenizer, ids, sizes, True) == stream(tokenizer, ids, sizes, False)


def test_cleanup_of_tokenization_spaces_keeps_the_window(tokenizer) -> None:
    """The HF decode rewrites the backend's " ," to ","; pieces from the backend would not add up to it."""
    hf = word_tokenizer(["[UNK]", "hello", ",", "world", "."], decoders.WordPiece(cleanup=False),
                        pre_tokenizers.BertPreTokenizer(), clean_up_tokenization_spaces=True)
    ids = hf.encode("hello, world.", add_special_tokens=False)
    assert hf.decode(ids) == "hello, world." != hf.backend_tokenizer.decode(ids)
    backend_stream = DecodeStream()
    assert "".join(backend_stream.step(hf.backend_tokenizer, i) or "" for i in ids) == "hello , world ."
    detokenizer = IncrementalDetokenizer(hf)
    assert not detokenizer.streaming
    assert [detokenizer.push([i]) for i in ids] == ["hello", ",", " world", "."]
    assert detokenizer.finish() == "" and detokenizer.text == hf.decode(ids)


def test_a_prompt_prefix_would_change_the_first_piece() -> None:
    """SentencePiece's leading space: the text is decode(outputs), so DecodeStream gets no prompt prefix."""
    hf = word_tokenizer(["<unk>", "▁Say", "▁Hello", "▁world"], decoders.Metaspace(), pre_tokenizers.Metaspace())
    say, hello, world = hf.convert_tokens_to_ids(["▁Say", "▁Hello", "▁world"])
    with_prefix = DecodeStream(ids=[say], skip_special_tokens=True)
    assert [with_prefix.step(hf.backend_tokenizer, t) for t in (hello, world)] == [" Hello", " world"]
    detokenizer = IncrementalDetokenizer(hf)
    assert detokenizer.streaming
    assert [detokenizer.push([t]) for t in (hello, world)] == ["Hello", " world"]
    assert detokenizer.text == hf.decode([hello, world]) == "Hello world"


def test_a_decoder_that_rewrites_earlier_text_falls_back_to_the_window() -> None:
    """DecodeStream raises ("invalid prefix") where the window holds back; both then end alike."""
    rewriting = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "XYZ")])
    hf = word_tokenizer(["<unk>", "a", "b", "c"], rewriting)
    ids = hf.convert_tokens_to_ids(["a", "b", "c"])
    with pytest.raises(Exception, match="Invalid prefix"):
        probe = DecodeStream()
        for t in ids:
            probe.step(hf.backend_tokenizer, t)
    results = []
    for decode_stream in (True, False):
        detokenizer = IncrementalDetokenizer(hf, decode_stream=decode_stream)
        pieces = [detokenizer.push([t]) for t in ids]
        assert not detokenizer.streaming  # the stream gave up at "b" (or was never used)
        results.append(pieces + [detokenizer.finish()])
    # Text a decoder rewrites after it was emitted cannot be taken back, on either path.
    assert results[0] == results[1] == ["a", "", "", "YZc"]
