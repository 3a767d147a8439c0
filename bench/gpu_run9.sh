# Device run 9 (issues 13 and 17), Qwen3-0.6B shape on one H200, in priority order:
#   gpu_check       correctness after the constrained-decoding and FP8-KV changes (ALL PASS expected)
#   fp8_kv          --kv-cache-dtype fp8_e4m3 beside the bf16 pool: pool size, offline tok/s, greedy agreement
#   constrained     the per-step mask cost at 1/16/256 rows and throughput at 0/50/100% constrained
#                   (SmolLM2's tokenizer, carried in .tok/smollm2, over the 0.6B shape's vocabulary)
#   offline_switch  the stack at overlap depths 2 and 3 with the worker's GIL switch interval at CPython's
#                   5 ms and at 0.5 ms (LLMRPC_SWITCH_INTERVAL_S), beside mini-sglang's offline run
# Carry .whl (with the xgrammar wheel), .fi-cache, .anchors and .tok. The table of figures comes last.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=570
step gpu_check 110 python3 -m llmrpc.bench.gpu_check --out "$OUT/gpu_check.json"
grep -E "^(attention|greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED" "$L/gpu_check.log" | cut -c1-260
step fp8_kv 200 python3 -m llmrpc.bench.fp8_kv --model $M --commit "$COMMIT" --out "$OUT/fp8-kv-qwen3-0.6b.json"
step constrained 90 python3 -m llmrpc.bench.constrained --model $M --tokenizer .tok/smollm2 --device cuda --load-format dummy \
  --out "$OUT/constrained-gpu.json"
for interval in 0.005 0.0005; do
  step "offline_switch_$interval" 70 env LLMRPC_SWITCH_INTERVAL_S=$interval python3 -m llmrpc.bench.offline \
    --model $M --systems stack --overlap-depths 2,3 --commit "$COMMIT" --log-dir "$L" \
    --out "$OUT/raw/offline-stack-switch-$interval.json"
done
step seed 70 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" python3 .anchors/run_minisglang.py $M offline
save_fi_cache
tail -25 "$L/fp8_kv.log" | cut -c1-220
tail -14 "$L/constrained.log" | cut -c1-220
grep -hE "^llmrpc-stack|RESULT|mini-sglang offline" "$L"/offline_switch_*.log "$L/seed.log" | cut -c1-200
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)  # the device returns at most 8 files
