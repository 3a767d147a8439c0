"""FakeWorker: honours the step semantics and refuses page-accounting mistakes loudly."""
from __future__ import annotations

import numpy as np
import pytest

from llmrpc.bench.fake_worker import FakeWorker, HashModel, generate_alone
from llmrpc.engine.step import SlotParams, Step


def step(step_id: int, *, decode: list[tuple[int, int, list[int]]] = (), chunks=(), admit=()) -> Step:
    """decode rows: (slot, start, new pages); chunks: (slot, start, tokens, sample, pages)."""
    rows = list(decode) + [(s, st, pages) for s, st, _, _, pages in chunks]
    return Step(
        step_id=step_id, num_decode=len(decode),
        slots=np.array([r[0] for r in rows], np.int32), starts=np.array([r[1] for r in rows], np.int32),
        chunk_lens=np.array([len(c[2]) for c in chunks], np.int32),
        chunk_tokens=np.array([t for c in chunks for t in c[2]], np.int32),
        sample_chunks=np.array([c[3] for c in chunks], bool),
        page_counts=np.array([len(r[2]) for r in rows], np.int32),
        page_ids=np.array([p for r in rows for p in r[2]], np.int32),
        admissions=[SlotParams(slot=s) for s in admit],
    )


def test_it_generates_what_the_model_generates_alone_and_reads_cached_prefixes():
    model = HashModel(50)
    worker = FakeWorker(num_pages=8, page_size=2, max_slots=2, model=model)
    out = worker.execute(step(0, chunks=[(0, 0, [5, 6, 7], True, [0, 1])], admit=[0]))
    out2 = worker.execute(step(1, decode=[(0, 3, [])]))
    ref = generate_alone(model, [5, 6, 7], 2, eos_token_ids=(), ignore_eos=True)
    assert [int(out[0]), int(out2[0])] == ref.output_ids
    # Slot 1 reuses page 0 ([5, 6]) as a cached prefix and computes only its last token.
    out3 = worker.execute(step(2, chunks=[(1, 2, [7], True, [0, 3])], admit=[1]))
    assert int(out3[0]) == ref.output_ids[0]


def test_a_page_reused_while_its_slot_still_reads_it_is_caught():
    worker = FakeWorker(num_pages=8, page_size=2, max_slots=2, model=HashModel(50))
    worker.execute(step(0, chunks=[(0, 0, [5, 6, 7], True, [0, 1])], admit=[0]))
    worker.execute(step(1, chunks=[(1, 0, [9, 9], True, [1])], admit=[1]))  # page 1 is still slot 0's
    with pytest.raises(AssertionError, match="no longer hold its tokens"):
        worker.execute(step(2, decode=[(0, 3, [])]))


def test_missing_or_extra_pages_and_empty_chunks_are_caught():
    worker = FakeWorker(num_pages=8, page_size=2, max_slots=2, model=HashModel(50))
    with pytest.raises(AssertionError, match="1 pages for 3 positions"):
        worker.execute(step(0, chunks=[(0, 0, [5, 6, 7], True, [0])], admit=[0]))
    with pytest.raises(AssertionError, match="3 pages for 3 positions"):
        worker.execute(step(1, chunks=[(1, 0, [5, 6, 7], True, [2, 3, 4])], admit=[1]))
    with pytest.raises(AssertionError, match="empty prefill chunk"):
        worker.execute(step(2, chunks=[(0, 0, [], True, [])], admit=[0]))
