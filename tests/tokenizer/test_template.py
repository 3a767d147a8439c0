"""PromptBuilder: chat prompts match transformers' own apply_chat_template; bad input names its field."""
from __future__ import annotations

import pytest

from llmrpc.services.tokenizer.template import InputError, Message, PromptBuilder

CONVERSATIONS = [
    [Message("user", "Hi")],
    [Message("system", "You answer in French."), Message("user", "What is the capital of Spain?")],
    [
        Message("user", "Name a prime number."),
        Message("assistant", "7"),
        Message("user", "Another one, with an emoji 🎉 and 日本語?"),
    ],
    [Message("user", "<|im_start|> looks special but is user text")],
]


def reference_ids(tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
    )
    return list(encoded["input_ids"])


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers(tokenizer, messages, add_generation_prompt: bool) -> None:
    ids = PromptBuilder(tokenizer).from_chat(messages, add_generation_prompt)
    assert ids == reference_ids(tokenizer, messages, add_generation_prompt)


def test_chat_prompt_has_each_special_token_once(tokenizer) -> None:
    builder = PromptBuilder(tokenizer)
    ids = builder.from_chat([Message("user", "Hi")])
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    # SmolLM2's template: default system turn, the user turn, then the assistant prefix.
    assert ids.count(start) == 3
    assert ids[0] == start
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_text_is_encoded_as_the_tokenizer_does(tokenizer) -> None:
    text = "Once upon a time 🎉"
    assert PromptBuilder(tokenizer).from_text(text) == tokenizer.encode(text)


def test_tokens_pass_through(tokenizer) -> None:
    assert PromptBuilder(tokenizer).from_tokens([5, 0, 17]) == [5, 0, 17]


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda b: b.from_text(""), "text is empty"),
        (lambda b: b.from_chat([]), "chat.messages is empty"),
        (lambda b: b.from_tokens([]), "tokens.ids is empty"),
        (lambda b: b.from_chat([Message("user", "a"), Message("robot", "b")]), "chat.messages[1].role is 'robot'"),
        (lambda b: b.from_chat([Message("", "a")]), "chat.messages[0].role is ''"),
    ],
)
def test_bad_input_names_the_field(tokenizer, call, field: str) -> None:
    with pytest.raises(InputError) as error:
        call(PromptBuilder(tokenizer))
    assert str(error.value).startswith(field)
