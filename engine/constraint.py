"""Grammar-constrained decoding (xgrammar): what a constraint is, its compiled grammars, each slot's matcher.

- `Constraint` is a request's grammar as the engine keeps it: a kind (json_schema,
  json_object, regex, choice, ebnf) and its spec text. A choice is an EBNF alternation
  of its escaped values, so it needs no code of its own past `Constraint.choice`.
- `GrammarCache` compiles each distinct constraint once against the model's tokenizer
  (xgrammar's TokenizerInfo, sized to the model's vocabulary, its stop tokens the model's
  EOS ids, which are what the scheduler finishes a request on) and keeps the compiled
  grammars in a bounded LRU. It is thread-safe: the worker compiles in a thread pool when a
  request arrives (CompileConstraint, before the scheduler queues the request), the step
  thread only looks the grammar up at admission. A constraint that cannot be compiled raises
  ConstraintError naming the field (`constraint.json_schema`).
- `ConstraintTable` holds one matcher per slot and does the per-step work: `mask(slots)`
  fills the bitmask of the constrained rows and returns the function that applies it to
  their logits; `sampled(slots, tokens)` hands each constrained row's token to its matcher.

How constrained rows are scheduled: exactly like the others. The scheduler knows nothing of
grammars past admission; the mask of step N+1 needs step N's token, and the worker has it,
because it runs steps in order: at every overlap depth (0, 1, 2, ...) step N's tokens exist
on the device before step N+1 samples. What a constrained row costs is on the worker:
- on CUDA (the "staged" path) the tokens reach the matchers lazily: `sampled` starts their
  copy to pinned host memory, and the next step's `mask` waits for it, which is after that
  step's forward is queued, so the GPU computes step N+1 while the host waits for step N's
  tokens, accepts them and fills step N+1's bitmask; the packed bitmask rows are then copied
  to the device, scattered to their logits rows and applied by xgrammar's kernel. The GPU
  waits only where the fill outlasts the forward;
- on the CPU the same work runs in line (the forward is synchronous there anyway);
- a step with no constrained row pays one numpy check (no bitmask, no copy, no sync), and
  unconstrained rows beside constrained ones are never touched (the mask applies by row).
bench/constrained.py measures the fill and the apply at 1, 16 and 256 rows.

JSON is generated with fixed separators (`", "`, `": "`: xgrammar's any_whitespace=False, as
vLLM's disable_any_whitespace): a small model cannot loop on whitespace until max_tokens.
Once a matcher accepts a stop token it is terminated; the scheduler ends the request on that
EOS (a constrained request may not set ignore_eos or min_tokens, services/scheduler/validation.py),
so rows it samples later (overlap) are dropped and go unmasked. max_tokens may end an output
inside its grammar (finish "length"). After a retraction the request takes a slot again with
its outputs so far, which `admit` replays into a fresh matcher. xgrammar and torch are imported
lazily: the scheduler imports `Constraint` and must stay free of both.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

log = logging.getLogger("llmrpc.engine")

Backend = Literal["auto", "torch_native"]  # xgrammar's apply_token_bitmask_inplace backends we use

KINDS = ("json_schema", "json_object", "regex", "choice", "ebnf")
JSON_OBJECT_SCHEMA = '{"type": "object"}'
GRAMMAR_CACHE_SIZE = 512  # compiled grammars kept (a JSON schema's is tens of KB to a few MB)
BATCH_FILL_ROWS = 16  # from this many constrained rows, xgrammar fills the bitmask on several threads
# Threads of that fill: half the cores, 2 to 8 (the worker's step and result threads, the scheduler
# and the tokenizer need the rest). On the H200's 16-core host 256 rows took 23 ms on 2 threads.
BATCH_FILL_THREADS = max(2, min(8, (os.cpu_count() or 2) // 2))
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (?:Check failed: .*? is false: )?")


class ConstraintError(ValueError):
    """A constraint that cannot be served: `field` is its path under the request's sampling (`constraint.regex`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _ebnf_literal(value: str) -> str:
    """`value` as an EBNF string literal (xgrammar's escapes)."""
    out = []
    for ch in value:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@dataclass(frozen=True)
class Constraint:
    """One request's grammar: `kind` is one of KINDS, `spec` its text (a choice's is EBNF)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    @classmethod
    def choice(cls, values: Sequence[str]) -> Constraint:
        """The output is exactly one of `values`."""
        return cls("choice", "root ::= " + " | ".join(_ebnf_literal(v) for v in values))

    @property
    def field(self) -> str:
        """Where the constraint sits in the request's sampling, for errors."""
        return f"constraint.{self.kind}"


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ log prefix (`[12:00:00] /project/cpp/x.cc:94: `)."""
    return _XGRAMMAR_LOG_PREFIX.sub("", str(exc).strip()).strip()


class GrammarCache:
    """Compiled grammars by constraint, against one tokenizer; each distinct constraint compiles once."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], max_threads: int = 2,
                 capacity: int = GRAMMAR_CACHE_SIZE) -> None:
        import xgrammar as xgr

        if not eos_token_ids:
            raise ConstraintError("constraint", "the model declares no EOS token, which ends a constrained output")
        # The model's EOS ids, not the tokenizer's guess: the matcher allows only these once the
        # grammar is complete, and the scheduler finishes the request on exactly these.
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(eos_token_ids))
        # Our LRU is the cache: xgrammar's own would keep a second copy of every grammar.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._capacity = capacity
        self._lock = threading.Lock()
        # A Future per constraint: a second request for one being compiled waits for the same compile.
        self._grammars: OrderedDict[Constraint, Future[xgr.CompiledGrammar]] = OrderedDict()

    @property
    def size(self) -> int:
        return len(self._grammars)

    def get(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar (compiling it now if no one has); ConstraintError when it cannot be."""
        with self._lock:
            future = self._grammars.get(constraint)
            owner = future is None
            if future is None:
                future = self._grammars[constraint] = Future()
                while len(self._grammars) > self._capacity:
                    self._grammars.popitem(last=False)
            else:
                self._grammars.move_to_end(constraint)
        if owner:
            try:
                future.set_result(self._compile(constraint))
            except ConstraintError as exc:
                with self._lock:  # a failure is not cached: the answer is cheap to repeat
                    if self._grammars.get(constraint) is future:
                        del self._grammars[constraint]
                future.set_exception(exc)
        return future.result()

    def _compile(self, c: Constraint) -> xgr.CompiledGrammar:
        compiler = self._compiler
        try:
            if c.kind == "json_schema":
                return compiler.compile_json_schema(c.spec, any_whitespace=False)
            if c.kind == "json_object":
                return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
            if c.kind == "regex":
                return compiler.compile_regex(c.spec)
            return compiler.compile_grammar(c.spec)  # ebnf, choice
        except (RuntimeError, ValueError, json.JSONDecodeError) as exc:
            what = {"json_schema": "the JSON schema", "json_object": "the JSON grammar", "regex": "the regex",
                    "ebnf": "the EBNF grammar", "choice": "the choice"}[c.kind]
            raise ConstraintError(c.field, f"{what} cannot be compiled: {_reason(exc)}") from None


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices on `device`, copied without waiting for the device's queued work (a blocking
    copy would wait for the forward, and the GPU would idle while the host catches up)."""
    import torch

    return torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device, non_blocking=True)


class ConstraintTable:
    """Each slot's grammar matcher, and the bitmask work of a step's constrained rows.

    `staged` (the default on CUDA) is the device path: the filled bitmask rows are packed, copied to
    the device and scattered to their logits rows there, and the sampled tokens reach the matchers
    lazily (see the module docstring). Unstaged (the CPU's), the bitmask rows are the logits rows and
    tokens are accepted at once. Tests run the staged path on the CPU too.
    """

    def __init__(self, max_slots: int, vocab_size: int, device: torch.device, staged: bool | None = None) -> None:
        self.max_slots = max_slots
        self.vocab_size = vocab_size
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self._backend: Backend = "auto"  # xgrammar's: its Triton kernel on CUDA, C++ on the CPU
        self._matchers: list[xgr.GrammarMatcher | None] = [None] * max_slots
        self._constrained = np.zeros(max_slots, dtype=bool)
        self._batch: xgr.BatchGrammarMatcher | None = None
        self._host: torch.Tensor | None = None  # int32 [max_slots, ceil(V / 32)], pinned on CUDA
        self._packed: torch.Tensor | None = None  # staged: the filled rows as copied to the device ...
        self._aligned: torch.Tensor | None = None  # ... and scattered to their logits rows
        # Staged: the last step's constrained tokens on their way to the host, for their matchers.
        self._pending: tuple[list[xgr.GrammarMatcher], torch.Tensor, torch.cuda.Event | None] | None = None

    @property
    def num_constrained(self) -> int:
        return int(self._constrained.sum())

    def admit(self, slot: int, grammar: xgr.CompiledGrammar | None, replay: Sequence[int] = ()) -> None:
        """Slot `slot` starts a request: a fresh matcher for `grammar` (None: unconstrained), fed
        `replay`, the outputs it already has (a retracted request's recompute)."""
        matcher = None
        if grammar is not None:
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(grammar)
            for i, token in enumerate(replay):
                if not matcher.accept_token(int(token)):
                    raise ValueError(f"slot {slot}: output token {i} ({token}) does not match the grammar")
        # A pending token for the slot's previous matcher still reaches that (orphaned) matcher: harmless.
        self._matchers[slot] = matcher
        self._constrained[slot] = matcher is not None

    def _constrained_rows(self, slots: np.ndarray) -> list[tuple[int, xgr.GrammarMatcher]]:
        """(row, matcher) of every row whose slot has a matcher."""
        rows = []
        for r in np.flatnonzero(self._constrained[slots]).tolist():
            m = self._matchers[int(slots[r])]
            assert m is not None  # _constrained says so
            rows.append((r, m))
        return rows

    def mask(self, slots: np.ndarray) -> Callable[[torch.Tensor], None] | None:
        """For rows sampling `slots` (row i samples slots[i]): the function that masks their logits [S, V]
        in place, or None when no row is constrained (then nothing was done)."""
        self._resolve()
        if not self._constrained.any():
            return None
        # Terminated matchers (their EOS is sampled; the scheduler drops what follows) go unmasked.
        live = [(r, m) for r, m in self._constrained_rows(slots) if not m.is_terminated()]
        if not live:
            return None
        import torch
        import xgrammar as xgr

        if self._host is None:
            self._host = xgr.allocate_token_bitmask(self.max_slots, self.vocab_size)
            if self.device.type == "cuda":
                self._host = self._host.pin_memory()
            if self.staged:
                self._packed = torch.empty_like(self._host, device=self.device)
                self._aligned = torch.empty_like(self._host, device=self.device)
        row_ids = [r for r, _ in live]
        matchers = [m for _, m in live]
        # Unstaged, the bitmask rows are the logits rows; staged, the filled rows are packed for the copy.
        targets = list(range(len(live))) if self.staged else row_ids
        if len(live) >= BATCH_FILL_ROWS:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher(max_threads=BATCH_FILL_THREADS)
            self._batch.batch_fill_next_token_bitmask(matchers, self._host, targets)
        else:
            for matcher, target in zip(matchers, targets):
                matcher.fill_next_token_bitmask(self._host, target)
        bitmask, backend = self._host, self._backend
        if self.staged:
            assert self._packed is not None and self._aligned is not None
            # The pinned buffer is free to refill: the previous copy out of it was queued before the
            # tokens whose event _resolve waited on.
            k = len(live)
            self._packed[:k].copy_(self._host[:k], non_blocking=True)
            self._aligned[_index(row_ids, self.device)] = self._packed[:k]
            bitmask = self._aligned
        return lambda logits: xgr.apply_token_bitmask_inplace(logits, bitmask, indices=row_ids, backend=backend)

    def sampled(self, slots: np.ndarray, tokens: torch.Tensor) -> None:
        """Row i's token `tokens[i]` (on the device) was sampled for `slots[i]`: constrained slots' matchers take it."""
        if not self._constrained.any():
            return
        constrained = self._constrained_rows(slots)
        if not constrained:
            return
        import torch

        matchers = [m for _, m in constrained]
        rows = _index([r for r, _ in constrained], tokens.device)
        if not self.staged:
            self._accept(matchers, tokens[rows].tolist())
            return
        picked = tokens[rows]
        cuda = self.device.type == "cuda"
        host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=cuda)
        host.copy_(picked, non_blocking=cuda)
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._pending = (matchers, host, ready)

    def flush(self) -> None:
        """Every sampled token reached its matcher (tests and benches look at matchers between steps)."""
        self._resolve()

    def _resolve(self) -> None:
        if self._pending is not None:
            matchers, host, ready = self._pending
            self._pending = None
            if ready is not None:
                ready.synchronize()
            self._accept(matchers, host.tolist())

    @staticmethod
    def _accept(matchers: list[xgr.GrammarMatcher], tokens: list[int]) -> None:
        for matcher, token in zip(matchers, tokens):
            # Past its EOS a row's tokens are dropped anyway; before it, the mask let only matching ones through.
            if not matcher.is_terminated() and not matcher.accept_token(token):
                log.error("a sampled token (%d) does not match its grammar", token)

    def warm_up(self, logits: torch.Tensor) -> None:
        """Masks a copy of `logits` [1, V] once, so xgrammar's kernel is built at start-up; where its
        Triton kernel fails, its plain-torch one serves instead."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size).to(logits.device)
        try:
            xgr.apply_token_bitmask_inplace(logits.clone(), bitmask, indices=[0], backend=self._backend)
        except Exception:
            log.warning("xgrammar's bitmask kernel failed on %s; constrained rows use its torch ops",
                        logits.device, exc_info=True)
            self._backend = "torch_native"
            xgr.apply_token_bitmask_inplace(logits.clone(), bitmask, indices=[0], backend=self._backend)
