"""One completion's way back to the client: token messages in, text messages out.

For each token-level `GenerateResponse` of one index it detokenizes the new tokens,
applies the stop strings (which count only once `min_tokens` tokens exist, as in
vLLM), and answers the text-level message to forward. When a stop string appears it
finishes the completion itself with FINISH_REASON_STOP; the servicer then cancels
the scheduler's call so the KV pages are freed at once. Its usage then counts the
tokens consumed so far, with the prompt and cached prompt tokens the scheduler
reported on the index's first message.
"""
from __future__ import annotations

from typing import Sequence

from llmrpc.services.tokenizer.detokenizer import Decoder, IncrementalDetokenizer
from llmrpc.services.tokenizer.stop_strings import StopChecker
from llmrpc.v1 import generation_pb2

FINISH_UNSPECIFIED = generation_pb2.FINISH_REASON_UNSPECIFIED


class Completion:
    """Detokenizer plus stop strings for one index of one request."""

    def __init__(
        self,
        tokenizer: Decoder,
        request_id: str,
        index: int,
        prompt_tokens: int,
        stop: Sequence[str] = (),
        min_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.index = index
        # The scheduler's counts as last reported (its first message of an index carries them).
        self._usage = generation_pb2.Usage(prompt_tokens=prompt_tokens)
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = StopChecker(stop)
        self._min_tokens = min_tokens
        self.completion_tokens = 0
        self.finished = False

    def advance(self, upstream: generation_pb2.GenerateResponse) -> generation_pb2.GenerateResponse:
        """The text-level message for one scheduler message of this index."""
        if self.finished:
            raise RuntimeError(f"completion {self.request_id}/{self.index} already finished")
        self.completion_tokens += len(upstream.token_ids)
        if upstream.HasField("usage"):
            self._usage.CopyFrom(upstream.usage)
        out = generation_pb2.GenerateResponse(
            request_id=self.request_id,
            index=self.index,
            token_ids=upstream.token_ids,
            logprobs=upstream.logprobs,
        )
        ending = upstream.finish_reason != FINISH_UNSPECIFIED
        piece = self._detokenizer.push(upstream.token_ids)
        if ending:
            piece += self._detokenizer.finish()
        if self.completion_tokens >= self._min_tokens:
            text = self._stop.push(piece)
        else:
            text = piece
        if self._stop.stopped:
            out.text = text
            out.finish_reason = generation_pb2.FINISH_REASON_STOP
            out.usage.CopyFrom(self._usage)
            out.usage.completion_tokens = self.completion_tokens
            self.finished = True
            return out
        if ending:
            text += self._stop.flush()
            out.finish_reason = upstream.finish_reason
            if upstream.HasField("usage"):
                out.usage.CopyFrom(upstream.usage)
            self.finished = True
        out.text = text
        return out
