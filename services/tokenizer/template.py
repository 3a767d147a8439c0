"""Prompts: the model's tokenizer, its chat template, and the request input → prompt token ids.

The tokenizer comes from the model directory (Hugging Face tokenizer files) or from
a `.gguf` file, which carries its own vocabulary and chat template. Input problems
raise `InputError`, a FieldError naming the request field (INVALID_ARGUMENT with a
google.rpc.BadRequest, services/status.py).

The OpenAI front door also renders tools (OpenAI's function definitions, which the template
writes into the prompt as the model was trained to see them), messages that carry tool calls
or answer one, and `chat_template_kwargs` (e.g. Qwen3's `enable_thinking`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from llmrpc.engine.hub import load_tokenizer  # noqa: F401  # re-exported: the tokenizer service loads it from here
from llmrpc.services.status import FieldError

CHAT_ROLES = ("system", "user", "assistant", "tool")


class InputError(FieldError):
    """The request's input is unusable: `field` is the offending field, which the message starts with."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None  # who spoke (OpenAI's optional participant name, or a tool's name)
    tool_call_id: str | None = None  # role tool: the call this message answers
    tool_calls: tuple[Mapping[str, Any], ...] = ()  # role assistant: the calls it made, as templates read them

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it: only the fields it has."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [dict(c) for c in self.tool_calls]
        return out


def _template_parameters(tokenizer) -> frozenset[str]:
    """apply_chat_template's own parameters: template kwargs may not stand in for them."""
    return frozenset(inspect.signature(tokenizer.apply_chat_template).parameters) - {"kwargs"}


class PromptBuilder:
    """Turns text, chat messages or token ids into the prompt's token ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def from_text(self, text: str) -> list[int]:
        if not text:
            raise InputError("text", "text is empty")
        # Raw completion: the tokenizer adds its own special tokens (e.g. BOS) if it uses any.
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The chat template applied to `messages` (and `tools`, and extra template variables), as text."""
        if not messages:
            raise InputError("chat.messages", "chat.messages is empty")
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                field = f"chat.messages[{i}].role"
                raise InputError(field, f"{field} is {message.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if self.tokenizer.chat_template is None:
            raise InputError("chat", "chat: this model has no chat template; send text or tokens")
        kwargs = dict(template_kwargs or {})
        for name in sorted(kwargs.keys() & _template_parameters(self.tokenizer)):
            raise InputError(f"chat_template_kwargs.{name}",
                             f"chat_template_kwargs.{name} is a parameter of the template call itself, not a variable")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                [m.template_dict() for m in messages],
                tools=[dict(t) for t in tools] if tools else None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except TemplateError as exc:  # templates raise on e.g. roles that do not alternate
            raise InputError("chat.messages",
                             f"chat.messages: the model's chat template refused them: {exc}") from exc

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered chat's token ids."""
        # The template already writes every special token (BOS included where the model
        # uses one), so encoding must not add them a second time.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def from_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_rendered(self.render_chat(messages, add_generation_prompt))

    def from_tokens(self, token_ids: Sequence[int]) -> list[int]:
        if not token_ids:
            raise InputError("tokens.ids", "tokens.ids is empty")
        return list(token_ids)
