"""Reasoning content: the `<think>…</think>` part of a chat answer, kept apart from the answer itself.

`--reasoning-parser` chooses it (off by default, as in vLLM and SGLang):
- `qwen3`: the answer thinks when it starts with `<think>`, or when the prompt already opened one
  (the chat template ended its generation prompt inside `<think>`, as Qwen3's thinking-only
  models and DeepSeek-R1's newer templates do). With `chat_template_kwargs: {"enable_thinking":
  false}` Qwen3's template closes the think block in the prompt, so all of the answer is content.
- `deepseek_r1`: the answer starts thinking whatever the prompt says, `<think>` or not; the
  reasoning ends at `</think>`.
- `auto`: `qwen3` when the chat template mentions `<think>`, else off.
An answer that never closes its `</think>` (max_tokens ran out) is all reasoning. Whitespace
between the tags and the text they enclose is dropped.

`ReasoningSplitter` works on streamed pieces: a tag split across two pieces is held back until it
is whole, so the pieces it returns are exactly the whole answer's split.
"""
from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"
REASONING_PARSER_CHOICES = ("none", "auto", "qwen3", "deepseek_r1")

# The splitter's states, in the order an answer goes through them.
_START = "start"  # nothing seen yet but whitespace or the start of `<think>`
_THINK_START = "think_start"  # inside the reasoning, before its first text
_THINKING = "thinking"
_ANSWER_START = "answer_start"  # after `</think>`, before the answer's first text
_ANSWER = "answer"


@dataclass(frozen=True)
class ReasoningParser:
    """How one server splits reasoning off: `always` (deepseek_r1) or only when the answer or prompt opens `<think>`."""

    always: bool = False

    def splitter(self, prompt: str) -> ReasoningSplitter:
        """The splitter for one answer to `prompt` (the rendered chat)."""
        opened = prompt.rstrip().endswith(OPEN)
        return ReasoningSplitter(thinking=self.always or opened)


def reasoning_parser(name: str, chat_template: str | None) -> ReasoningParser | None:
    """The `--reasoning-parser` NAME's parser (None: off); `auto` reads the chat template."""
    if name == "auto":
        name = "qwen3" if OPEN in (chat_template or "") else "none"
    return {"none": None, "qwen3": ReasoningParser(), "deepseek_r1": ReasoningParser(always=True)}[name]


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningSplitter:
    """One answer's pieces → (reasoning, content) pieces."""

    def __init__(self, thinking: bool) -> None:
        # Already thinking (the prompt opened `<think>`): a `<think>` the model repeats is still skipped.
        self._state = _START
        self._thinking_from_start = thinking
        self._held = ""

    def push(self, piece: str, final: bool = False) -> tuple[str, str]:
        text = self._held + piece
        self._held = ""
        reasoning, content = [], []
        while text:
            if self._state == _START:
                stripped = text.lstrip()
                if stripped.startswith(OPEN):
                    text, self._state = stripped[len(OPEN):], _THINK_START
                elif OPEN.startswith(stripped) and not final:
                    self._held = text
                    text = ""
                else:
                    self._state = _THINK_START if self._thinking_from_start else _ANSWER
            elif self._state in (_THINK_START, _ANSWER_START):
                text = text.lstrip()
                if text:
                    self._state = _THINKING if self._state == _THINK_START else _ANSWER
            elif self._state == _THINKING:
                end = text.find(CLOSE)
                if end >= 0:
                    reasoning.append(text[:end].rstrip())
                    text, self._state = text[end + len(CLOSE):], _ANSWER_START
                    continue
                # Held back: a tag's first characters, and the whitespace before them (it may precede `</think>`).
                keep = 0 if final else _held_back(text, CLOSE)
                emit = text[:len(text) - keep]
                if not final:
                    emit = emit.rstrip()
                reasoning.append(emit)
                self._held = text[len(emit):]
                text = ""
            else:
                content.append(text)
                text = ""
        return "".join(reasoning), "".join(content)
