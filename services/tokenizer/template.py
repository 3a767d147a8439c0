"""Prompts: the model's tokenizer, its chat template, and the request input → prompt token ids.

The tokenizer comes from the model directory (Hugging Face tokenizer files) or from
a `.gguf` file, which carries its own vocabulary and chat template. Input problems
raise `InputError`, a FieldError naming the request field (INVALID_ARGUMENT with a
google.rpc.BadRequest, services/status.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llmrpc.services.status import FieldError

CHAT_ROLES = ("system", "user", "assistant", "tool")


class InputError(FieldError):
    """The request's input is unusable: `field` is the offending field, which the message starts with."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def load_tokenizer(model_path: str | Path):
    """A fast Hugging Face tokenizer from an HF directory or a `.gguf` file."""
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is loaded

    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


class PromptBuilder:
    """Turns text, chat messages or token ids into the prompt's token ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def from_text(self, text: str) -> list[int]:
        if not text:
            raise InputError("text", "text is empty")
        # Raw completion: the tokenizer adds its own special tokens (e.g. BOS) if it uses any.
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text."""
        if not messages:
            raise InputError("chat.messages", "chat.messages is empty")
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                field = f"chat.messages[{i}].role"
                raise InputError(field, f"{field} is {message.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if self.tokenizer.chat_template is None:
            raise InputError("chat", "chat: this model has no chat template; send text or tokens")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except TemplateError as exc:  # templates raise on e.g. roles that do not alternate
            raise InputError("chat.messages",
                             f"chat.messages: the model's chat template refused them: {exc}") from exc

    def from_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        # The template already writes every special token (BOS included where the model
        # uses one), so encoding must not add them a second time.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def from_tokens(self, token_ids: Sequence[int]) -> list[int]:
        if not token_ids:
            raise InputError("tokens.ids", "tokens.ids is empty")
        return list(token_ids)
