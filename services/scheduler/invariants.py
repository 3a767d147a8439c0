"""The KV accounting invariant, checked after every step when --check-kv-invariants is on.

Every page is, at every moment, exactly one of: free, owned by a running request,
or held by the radix index; a running request's leading pages are radix pages it
keeps locked; its page table covers exactly the positions fed so far; and every
slot is either free or held by exactly one running request.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from llmrpc.services.scheduler.kv_pages import KVPages
from llmrpc.services.scheduler.radix import RadixNode
from llmrpc.services.scheduler.request import Request, RequestState


def check_kv_invariants(
    kv: KVPages,
    running: Iterable[Request],
    free_slots: Iterable[int],
    max_slots: int,
) -> None:
    """Raises AssertionError naming the first broken rule."""
    running = list(running)
    pool, radix = kv.pool, kv.radix
    ps = radix.page_size
    radix.check()
    free = pool.free_pages()
    cached = radix.all_pages()
    private: list[int] = []
    locks: Counter[int] = Counter()
    for req in running:
        rid = req.request_id
        assert req.state is RequestState.RUNNING, f"request {rid} is in the running batch but {req.state.value}"
        assert len(req.pages) == -(-req.num_fed // ps), (
            f"request {rid} has {len(req.pages)} pages for {req.num_fed} fed positions (page size {ps})")
        assert req.num_fed <= req.max_kv_tokens, (
            f"request {rid} fed {req.num_fed} positions, more than it may ever need ({req.max_kv_tokens})")
        assert req.num_scheduled <= req.max_tokens, f"request {rid} scheduled {req.num_scheduled} > max_tokens outputs"
        node = req.radix_node
        assert node is not None, f"request {rid} holds no radix lock"
        path_pages: list[int] = []
        n: RadixNode | None = node
        while n is not None and n is not radix.root:
            path_pages[:0] = n.pages
            locks[id(n)] += 1
            n = n.parent
        assert path_pages == req.pages[: req.num_cached_pages], (
            f"request {rid}'s cached pages {req.pages[:req.num_cached_pages]} are not its radix path {path_pages}")
        private.extend(req.pages[req.num_cached_pages:])
    owners = Counter(free) + Counter(cached) + Counter(private)
    doubled = sorted(p for p, c in owners.items() if c > 1)
    assert not doubled, (
        f"pages with two owners: {doubled[:10]} (free {sorted(set(doubled) & set(free))[:10]}, "
        f"radix {sorted(set(doubled) & set(cached))[:10]}, running {sorted(set(doubled) & set(private))[:10]})")
    missing = sorted(set(range(pool.num_pages)) - owners.keys())
    assert not missing, f"leaked pages, neither free, cached nor owned: {missing[:10]}"
    stray = sorted(owners.keys() - set(range(pool.num_pages)))
    assert not stray, f"page ids outside the pool: {stray[:10]}"
    for node in radix.nodes():
        assert node.lock_ref == locks[id(node)], (
            f"radix node locked {node.lock_ref} times, {locks[id(node)]} running requests use it")
    slots = Counter(free_slots) + Counter(req.slot for req in running)
    assert sorted(slots.elements()) == list(range(max_slots)), f"slots are not each free or held once: {dict(slots)}"

