"""Constrained decoding's cost (engine/constraint.py): the per-step bitmask work, and end-to-end throughput.

  step  ConstraintTable.mask + the apply it returns, for R = 1, 16, 256 rows whose matchers are each
        part-way through a JSON-schema output: `fill_ms` is the host's part (the matchers fill the
        bitmask; on CUDA also the copy's launch), `apply_ms` the masking of the [R, V] logits on the
        device (synchronized); median of --repeats. `unconstrained_ms` is what a step without a
        constrained row pays (the table's check, R = 256). On the CPU, and on CUDA when present.
  e2e   services/llm.py's LLM (the scheduler core, the overlap pipeline, ModelRunner) on --requests chat
        prompts sampled at T = 0.8, with 0%, 50% and 100% of them constrained to a JSON schema; output
        tokens/s over all requests (the unconstrained ones run to --max-tokens, ignore_eos), after a
        full-size warm-up, the fastest of --passes interleaved runs; no prefix cache, so every run
        prefills in full.

    python3 -m llmrpc.bench.constrained --model PATH [--tokenizer DIR] [--device cuda] [--out FILE]

A model without tokenizer files (bench/configs/*, random weights) needs --tokenizer DIR: any Hugging Face
tokenizer directory (e.g. the default model's tokenizer.json, tokenizer_config.json, chat_template.jinja),
whose files join the model's in a temporary directory. Nothing is downloaded. Rows go to --out (default
bench/results/constrained-cpu.json, or -gpu.json on CUDA).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmrpc.bench.record import provenance, write_json
from llmrpc.engine.constraint import Constraint, ConstraintTable, GrammarCache
from llmrpc.services.llm import LLM
from llmrpc.v1 import generation_pb2 as pb

ROWS = (1, 16, 256)
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
# Where each row's matcher stands when timed: inside a string, a number, an array, a nested object.
PREFIXES = ['{"name": "Ada Love', '{"name": "Bo", "age": 4', '{"name": "Cy", "age": 30, "tags": ["a", "b',
            '{"name": "Di", "age": 7, "tags": [], "address": {"city": "Os']
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja")


def with_tokenizer(model: Path, tokenizer: Path, into: Path) -> Path:
    """A directory with `model`'s files (linked) and `tokenizer`'s tokenizer files (copied)."""
    for f in model.iterdir():
        if f.name not in TOKENIZER_FILES:
            (into / f.name).symlink_to(f.resolve())
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, into / name)
    return into


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(grammars: GrammarCache, tokenizer: Any, vocab: int, device: torch.device, repeats: int,
               dtype: torch.dtype) -> list[dict]:
    grammar = grammars.get(Constraint("json_schema", json.dumps(SCHEMA)))
    rows = []
    for n in ROWS:
        table = ConstraintTable(max(ROWS), vocab, device)
        for slot in range(n):
            table.admit(slot, grammar, tokenizer.encode(PREFIXES[slot % len(PREFIXES)], add_special_tokens=False))
        slots = np.arange(n)
        logits = torch.randn(n, vocab, device=device, dtype=dtype)
        fill, apply = [], []
        for i in range(repeats + 3):  # the first three warm up (allocations, kernels)
            _sync(device)
            t0 = time.perf_counter()
            masker = table.mask(slots)
            t1 = time.perf_counter()
            assert masker is not None
            masker(logits)
            _sync(device)
            t2 = time.perf_counter()
            if i >= 3:
                fill.append((t1 - t0) * 1e3)
                apply.append((t2 - t1) * 1e3)
        allowed = int(torch.isfinite(logits[0]).sum())
        row = {"rows": n, "device": str(device), "vocab": vocab, "fill_ms": round(statistics.median(fill), 4),
               "apply_ms": round(statistics.median(apply), 4),
               "total_ms": round(statistics.median(f + a for f, a in zip(fill, apply)), 4),
               "allowed_tokens_row0": allowed}
        print(f"step {device} rows={n}: fill {row['fill_ms']:.3f} ms, apply {row['apply_ms']:.3f} ms", flush=True)
        rows.append(row)
    idle = ConstraintTable(max(ROWS), vocab, device)
    slots = np.arange(max(ROWS))
    t0 = time.perf_counter()
    for _ in range(1000):
        idle.mask(slots)
    per_call_ms = (time.perf_counter() - t0) / 1000 * 1e3
    rows.append({"rows": max(ROWS), "device": str(device), "unconstrained_ms": round(per_call_ms, 6)})
    return rows


def bench_e2e(llm: LLM, requests: int, max_tokens: int, fractions: tuple[float, ...], passes: int) -> list[dict]:
    tok = llm.tokenizer
    prompts = []
    for i in range(requests):
        text = f"Describe person number {i} as a JSON object with name, age, tags and address."
        if tok.chat_template is not None:
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        prompts.append(list(tok.encode(text, add_special_tokens=False)))
    free = pb.SamplingParams(max_tokens=max_tokens, temperature=0.8, ignore_eos=True)
    constrained = pb.SamplingParams(max_tokens=max_tokens, temperature=0.8,
                                    constraint=pb.Constraint(json_schema=json.dumps(SCHEMA)))

    def mix(fraction: float) -> list[pb.SamplingParams]:
        k = round(fraction * requests)
        # Spread over the batch (not the first k), so every step mixes constrained and free rows.
        return [constrained if (i * 7919) % requests < k else free for i in range(requests)]

    llm.generate(prompts, mix(0.5))  # warm-up at full size: kernels, allocator, the grammar's compile
    walls: dict[float, list[float]] = {f: [] for f in fractions}
    last: dict[float, list[Any]] = {}
    for _ in range(passes):  # the mixes interleaved, so a drift in the machine's speed hits them alike
        for fraction in fractions:
            t0 = time.perf_counter()
            last[fraction] = llm.generate(prompts, mix(fraction))
            walls[fraction].append(time.perf_counter() - t0)
    rows = []
    for fraction in fractions:
        sampling, outputs, wall = mix(fraction), last[fraction], min(walls[fraction])
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        done = [o.outputs[0] for o, s in zip(outputs, sampling) if s is constrained]
        parsed = 0
        for c in done:
            try:
                json.loads(tok.decode(c.token_ids, skip_special_tokens=True))
                parsed += 1
            except ValueError:
                pass
        row = {"constrained_fraction": fraction, "requests": requests, "max_tokens": max_tokens,
               "output_tokens": produced, "wall_s": round(wall, 3), "walls_s": [round(w, 3) for w in walls[fraction]],
               "output_tokens_per_s": round(produced / wall, 1),
               "constrained_finished_stop": sum(c.finish_reason == "stop" for c in done),
               "constrained_parsed_json": parsed, "constrained": len(done)}
        print(f"e2e {fraction:.0%} constrained: {row['output_tokens_per_s']:.1f} tok/s "
              f"({produced} tokens in {wall:.2f} s)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    from llmrpc.services.cli import add_engine_flags, engine_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model directory (default: the default model, fetched if missing)")
    ap.add_argument("--tokenizer", default="", help="tokenizer directory for a model that has none")
    add_engine_flags(ap)
    ap.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu", max_context=2048)
    ap.add_argument("--requests", type=int, default=0, help="e2e requests (default: 256 on CUDA, 32 on the CPU)")
    ap.add_argument("--max-tokens", type=int, default=0, help="e2e max_tokens (default: 128 on CUDA, 24 on the CPU)")
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats of each step measurement")
    ap.add_argument("--passes", type=int, default=2, help="timed runs of each e2e mix (the fastest is kept)")
    ap.add_argument("--systems", default="step,e2e")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cuda = str(args.device).startswith("cuda")
    requests = args.requests or (256 if cuda else 32)
    max_tokens = args.max_tokens or (128 if cuda else 24)
    if not args.model:
        from llmrpc.engine.default_model import ensure_default_model
        from llmrpc.services.cli import default_cache_dir

        args.model = str(ensure_default_model(default_cache_dir()))
    with tempfile.TemporaryDirectory(prefix="llmrpc-constrained-") as tmp:
        model = Path(args.model)
        if args.tokenizer:
            model = with_tokenizer(model, Path(args.tokenizer), Path(tmp))
        # No prefix cache: each fraction's run prefills the same prompts in full, as the first did.
        llm = LLM(str(model), disable_radix_cache=True, **engine_options(args))
        info = llm.runner.info
        result: dict[str, Any] = {**provenance("llmrpc.bench.constrained",
                                               gpu=torch.cuda.get_device_name() if cuda else "none"),
                                  "benchmark": "constrained", "model": Path(args.model).name,
                                  "tokenizer": args.tokenizer or args.model, "device": info.device,
                                  "dtype": info.dtype, "load_format": args.load_format}
        systems = args.systems.split(",")
        if "step" in systems:
            grammars = llm.runner.grammars()
            rows = []
            devices = [torch.device("cpu")] + ([llm.runner.device] if cuda else [])
            for device in devices:
                dtype = llm.runner.dtype if device.type == "cuda" else torch.float32
                rows += bench_step(grammars, llm.tokenizer, info.vocab_size, device, args.repeats, dtype)
            result["step"] = rows
        if "e2e" in systems:
            result["e2e"] = bench_e2e(llm, requests, max_tokens, (0.0, 0.5, 1.0), args.passes)
    out = Path(args.out or f"bench/results/constrained-{'gpu' if cuda else 'cpu'}.json")
    write_json(out, result)


if __name__ == "__main__":
    main()
