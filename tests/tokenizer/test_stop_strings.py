"""StopChecker and Completion: stop strings cut exactly, across pieces and tokens, never returned."""
from __future__ import annotations

import itertools
import random

import pytest

from llmrpc.services.tokenizer.completion import Completion
from llmrpc.services.tokenizer.stop_strings import StopChecker
from llmrpc.v1 import generation_pb2


def run(stop: list[str], pieces: list[str]) -> tuple[str, StopChecker]:
    checker = StopChecker(stop)
    out = []
    for piece in pieces:
        out.append(checker.push(piece))
        if checker.stopped:
            break
    out.append(checker.flush())
    return "".join(out), checker


def expected(text: str, stop: list[str]) -> str:
    hits = [text.find(s) for s in stop if s in text]
    return text[: min(hits)] if hits else text


def splits(text: str, cuts: tuple[int, ...]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_stop_split_across_pieces_is_cut_and_never_returned() -> None:
    checker = StopChecker(["<|end|>"])
    assert checker.push("Hello <") == "Hello "
    assert checker.push("|en") == ""
    assert checker.push("d|> and more") == ""
    assert checker.stopped and checker.matched == "<|end|>"
    assert checker.push("later") == ""
    assert checker.flush() == ""


def test_held_text_is_released_once_it_cannot_be_a_stop() -> None:
    checker = StopChecker(["<|end|>"])
    assert checker.push("a <|") == "a "
    assert checker.push("x") == "<|x"
    assert checker.push("<") == ""
    assert checker.flush() == "<"  # end of the completion: the held "<" was just text
    assert not checker.stopped and checker.matched is None


def test_earliest_stop_wins_over_list_order() -> None:
    text, checker = run(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert text == "hel"
    assert checker.matched == "lo w"


def test_stop_inside_one_piece() -> None:
    text, checker = run(["STOP"], ["abcSTOPdef"])
    assert (text, checker.matched) == ("abc", "STOP")


def test_no_stop_strings_passes_text_through() -> None:
    checker = StopChecker([])
    assert checker.push("<|end|>") == "<|end|>"
    assert checker.flush() == ""


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError):
        StopChecker(["ok", ""])


@pytest.mark.parametrize(
    "text,stop",
    [
        ("The answer is 42.\n\nQuestion: next", ["\n\n", "Question:"]),
        ("aaab", ["aab"]),  # the stop starts inside a run of its own prefix
        ("ababac", ["abac"]),
        ("no stop here at all", ["STOP", "xyz"]),
        ("ends with a partial sto", ["stop"]),
        ("x</s>y</s>", ["</s>"]),
        ("日本語の停止文字列テスト", ["停止"]),
    ],
)
def test_every_way_of_splitting_gives_the_same_cut(text: str, stop: list[str]) -> None:
    want = expected(text, stop)
    for k in (1, 2):
        for cuts in itertools.combinations(range(1, len(text)), k):
            got, checker = run(stop, splits(text, cuts))
            assert got == want, cuts
            assert checker.stopped == (want != text)
    got, _ = run(stop, list(text))  # one character at a time
    assert got == want


def test_random_texts_and_splits() -> None:
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice("ab<|>é") for _ in range(rng.randrange(0, 24)))
        stop = ["".join(rng.choice("ab<|>é") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 3))]
        cuts = tuple(sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 6))))) if len(text) > 1 else ()
        got, _ = run(stop, splits(text, cuts))
        assert got == expected(text, stop), (text, stop, cuts)


# ---- Completion: the same over real token streams ---------------------------------------


def token_messages(ids: list[int], finish=generation_pb2.FINISH_REASON_LENGTH) -> list[generation_pb2.GenerateResponse]:
    messages = [generation_pb2.GenerateResponse(request_id="r", token_ids=[i]) for i in ids]
    messages[-1].finish_reason = finish
    messages[-1].usage.CopyFrom(generation_pb2.Usage(prompt_tokens=5, completion_tokens=len(ids), cached_prompt_tokens=2))
    return messages


def complete(tokenizer, ids: list[int], stop: list[str], min_tokens: int = 0):
    completion = Completion(tokenizer, "r", 0, prompt_tokens=5, stop=stop, min_tokens=min_tokens)
    outs = []
    for message in token_messages(ids):
        outs.append(completion.advance(message))
        if completion.finished:
            break
    return completion, outs


def test_completion_stops_on_a_string_split_across_tokens(tokenizer) -> None:
    text = "Sure! The capital of France is Paris.\nUser: and of Spain?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = "\nUser:"
    # The stop string spans more than one token, so the cut happens across tokens.
    consumed = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    assert stop not in tokenizer.decode(ids[consumed - 1 : consumed])
    completion, outs = complete(tokenizer, ids, [stop])
    assert "".join(o.text for o in outs) == "Sure! The capital of France is Paris."
    assert [i for o in outs for i in o.token_ids] == ids[:consumed]
    last = outs[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, consumed)
    assert all(o.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for o in outs[:-1])


def test_completion_cuts_a_stop_string_that_ends_inside_a_token(tokenizer) -> None:
    text = "counting: one two three four"
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, outs = complete(tokenizer, ids, ["thr"])  # " three" is one token: the cut falls inside it
    assert "".join(o.text for o in outs) == "counting: one two "
    assert outs[-1].finish_reason == generation_pb2.FINISH_REASON_STOP


def test_completion_without_a_stop_passes_finish_and_usage_through(tokenizer) -> None:
    text = "Nothing to stop 🎉 here <|"
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, outs = complete(tokenizer, ids, ["<|end|>", "STOP"])
    assert "".join(o.text for o in outs) == text  # the held "<|" is released at the end
    assert outs[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert outs[-1].usage == generation_pb2.Usage(prompt_tokens=5, completion_tokens=len(ids), cached_prompt_tokens=2)


def test_stop_strings_count_only_after_min_tokens(tokenizer) -> None:
    text = "stop early, then go on and stop later"
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, outs = complete(tokenizer, ids, ["stop"], min_tokens=3)
    assert "".join(o.text for o in outs) == "stop early, then go on and "
    _, outs = complete(tokenizer, ids, ["stop"], min_tokens=0)
    assert "".join(o.text for o in outs) == ""
    assert outs[0].finish_reason == generation_pb2.FINISH_REASON_STOP
