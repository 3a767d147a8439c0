"""Tensor parallelism in the engine: N rank processes over gloo against one rank.

Each rank is a real process (spawned) that joins the process group through
`ModelRunner`'s own init and executes the identical list of Steps, as the
scheduler's fan-out would send them. Tiny random Llama, Qwen3 and Qwen3-MoE
checkpoints (saved with transformers) cover KV heads split over the ranks and KV
heads replicated because there are fewer of them than ranks, a vocabulary that
does not divide by the ranks, tied and untied embeddings, experts whose
intermediate dimension is split over the ranks beside a dense layer, a step whose
only chunk samples nothing (an empty LM-head gather), mixed prefill/decode batches and a
multi-step decode (3 passes in one step, rank 0's draw broadcast after each).
"""
from __future__ import annotations

import multiprocessing as mp
import queue
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrpc.engine.config import EngineConfig
from llmrpc.engine.runner import ModelRunner
from llmrpc.engine.step import SlotParams, Step
from llmrpc.services.rpc import free_port

PAGE = 4
DECODE_STEPS = 8
ATOL = 1e-4
# (slot, prompt, sampling): two greedy requests and one drawn from the engine's own generator.
REQUESTS = [
    (0, [5, 17, 42, 99, 3, 250 - 1, 61], SlotParams(0, temperature=0.0)),
    (1, [11, 12, 13, 14, 15, 16, 17, 18, 200, 201, 202, 203], SlotParams(1, temperature=0.0)),
    (2, [7, 8, 9, 10, 240], SlotParams(2, temperature=1.0)),
]
PAGES = {0: [9, 2, 14, 5], 1: [0, 11, 3, 7, 12, 1], 2: [6, 13, 4, 8]}  # enough for prompt + decodes


def _i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def _steps() -> list[Step]:
    """Slot 1's prompt in two chunks (the first alone, sampling nothing), then mixed batches."""
    prompts = {slot: prompt for slot, prompt, _ in REQUESTS}
    params = {slot: p for slot, _, p in REQUESTS}
    first = Step(0, 0, slots=_i32([1]), starts=_i32([0]), chunk_lens=_i32([8]), chunk_tokens=_i32(prompts[1][:8]),
                 sample_chunks=np.array([False]), page_counts=_i32([len(PAGES[1])]), page_ids=_i32(PAGES[1]),
                 admissions=[params[1]])
    second = Step(1, 0, slots=_i32([0, 1, 2]), starts=_i32([0, 8, 0]), chunk_lens=_i32([7, 4, 5]),
                  chunk_tokens=_i32(prompts[0] + prompts[1][8:] + prompts[2]), sample_chunks=np.ones(3, bool),
                  page_counts=_i32([len(PAGES[0]), 0, len(PAGES[2])]), page_ids=_i32(PAGES[0] + PAGES[2]),
                  admissions=[params[0], params[2]])
    steps = [first, second]
    for i in range(DECODE_STEPS):
        lengths = [len(prompts[s]) + i for s in (0, 1, 2)]
        steps.append(Step(2 + i, 3, slots=_i32([0, 1, 2]), starts=_i32(lengths), page_counts=_i32([0, 0, 0])))
    return steps


def _block() -> Step:
    """After the decodes, one step of 3 decode passes; slot 0's positions 15-17 need one more page."""
    lengths = [len(prompt) + DECODE_STEPS for _, prompt, _ in REQUESTS]
    return Step(2 + DECODE_STEPS, 3, slots=_i32([0, 1, 2]), starts=_i32(lengths), page_counts=_i32([1, 0, 0]),
                page_ids=_i32([10]), decode_steps=3)


def _run(model_dir: Path, rank: int = 0, size: int = 1, addr: str | None = None) -> dict:
    """Every step through prepare/forward/sample; the logits and tokens of each."""
    # Different engine seeds per rank: rank 0's broadcast alone must keep slot 2's draws in agreement.
    runner = ModelRunner(EngineConfig(model_path=str(model_dir), page_size=PAGE, max_total_tokens=PAGE * 16,
                                      max_slots=4, max_context=64, seed=rank, tp_rank=rank, tp_size=size,
                                      dist_init_addr=addr))
    logits, tokens = [], []
    with torch.inference_mode():
        for step in _steps():
            batch = runner.prepare(step)
            step_logits = runner.forward(batch)
            logits.append(step_logits.numpy().copy())
            tokens.append(runner.sample(batch, step_logits).tokens.tolist())
        block = _block()
        tokens.extend(runner.launch(block).result().tokens.reshape(block.decode_steps, -1).tolist())
    return {"rank": rank, "num_pages": runner.info.num_pages, "logits": logits, "tokens": tokens}


def _rank_main(rank: int, size: int, model_dirs: list[str], addr: str, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        results.put([_run(Path(d), rank, size, addr) for d in model_dirs])
    except BaseException as exc:
        results.put(repr(exc))
        raise


def _tiny_model(kind: str, path: Path) -> Path:
    import transformers as tf

    common = dict(vocab_size=250, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama":  # 2 KV heads: split over 2 ranks, replicated over 4
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2,
                                                   tie_word_embeddings=True))
    elif kind == "qwen3":  # 1 KV head: replicated on every rank
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, intermediate_size=96, num_key_value_heads=1,
                                                   head_dim=32, tie_word_embeddings=False))
    else:  # layer 0 sparse (6 experts, 2 per token, 48 wide: 12 per rank at 4 ranks), layer 1 dense
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **common, intermediate_size=96, num_key_value_heads=2, head_dim=16, moe_intermediate_size=48,
            num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
            tie_word_embeddings=False))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    model.float().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {kind: _tiny_model(kind, tmp_path_factory.mktemp(kind)) for kind in ("llama", "qwen3", "qwen3_moe")}


@pytest.fixture(scope="module")
def one_rank(tiny_models: dict[str, Path]) -> dict[str, dict]:
    return {kind: _run(path) for kind, path in tiny_models.items()}


def _run_ranks(size: int, model_dirs: list[Path]) -> list[list[dict]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, size, [str(d) for d in model_dirs], addr, results))
             for r in range(size)]
    for p in procs:
        p.start()
    try:
        answers = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
    except queue.Empty:
        pytest.fail(f"ranks did not answer; exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = [a for a in answers if isinstance(a, str)]
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * size
    return sorted(answers, key=lambda runs: runs[0]["rank"])


@pytest.mark.parametrize("size", [2, 4])
def test_ranks_match_one_rank(size: int, tiny_models: dict[str, Path], one_rank: dict[str, dict]) -> None:
    kinds = list(tiny_models)
    per_rank = _run_ranks(size, [tiny_models[k] for k in kinds])
    for i, kind in enumerate(kinds):
        ref = one_rank[kind]
        runs = [answers[i] for answers in per_rank]
        # Every rank sized the same KV pool, and returned the same tokens (rank 0's, broadcast).
        assert [r["num_pages"] for r in runs] == [ref["num_pages"]] * size == [16] * size
        for r in runs[1:]:
            assert r["tokens"] == runs[0]["tokens"], f"{kind}: rank {r['rank']} left lockstep"
        # The sharded forward is the whole model's: logits close, greedy tokens identical.
        assert len(runs[0]["logits"]) == len(ref["logits"]) == 2 + DECODE_STEPS
        assert runs[0]["logits"][0].shape == (0, 250)  # the lone middle chunk: an empty LM-head gather
        for step, (got, want) in enumerate(zip(runs[0]["logits"], ref["logits"])):
            np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{kind} step {step}")
        greedy = [[row[:2] for row in step_tokens[1:]] for step_tokens in (runs[0]["tokens"], ref["tokens"])]
        assert greedy[0] == greedy[1], kind
        assert len({t for row in ref["tokens"][1:] for t in row[:2]}) > 3  # not a degenerate repeat
        assert len(ref["tokens"]) == 2 + DECODE_STEPS + 3  # the 3-pass block's tokens, a row per pass
