# Device run 6 (issue 13). The attention block's fused kernels (Qwen3 Q/K norm + RoPE in one Triton launch,
# K and V stored in one launch), FlashInfer's filtered sampling and the start-up, each checked and timed;
# then Qwen3-0.6B TTFT(2048), single stream and offline through llmrpc's stack and engine, with
# mini-sglang measured in the same call; one result file per figure with both systems and the ratio.
# Carry .whl, .fi-cache and .anchors. Ends inside 9 minutes; the table of figures comes last.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=525
step kernel_check 150 python3 -m llmrpc.bench.kernel_check --with-fi-append --out "$OUT/kernel_check.json"
grep -E "^(qk_norm_rope|rope|store_kv|race|filtered) |KERNEL" "$L/kernel_check.log" | cut -c1-260
step gpu_check 120 python3 -m llmrpc.bench.gpu_check --out "$OUT/gpu_check.json"
grep -E "^(attention|greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED" "$L/gpu_check.log" | cut -c1-260
step startup 90 python3 -m llmrpc.bench.startup --model $M --commit "$COMMIT" --log-dir "$L" \
  --out "$OUT/raw/startup-qwen3-0.6b.json"
grep -A12 "ready in" "$L/startup.log" | grep -vE "listening|step stream" | cut -c1-200
step latency 160 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --commit "$COMMIT" \
  --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 160 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" \
  python3 .anchors/run_minisglang.py $M offline,decode,ttft
step offline 150 python3 -m llmrpc.bench.offline --model $M --systems engine,stack --commit "$COMMIT" \
  --log-dir "$L" --out "$OUT/raw/offline-qwen3-0.6b.json"
save_fi_cache
sed -n '/^qk_norm_rope, device/,/^Qwen3-0.6B, Q\/K/p' "$L/kernel_check.log" | cut -c1-200
grep -hE "^(stack|engine)[^:]*: |RESULT|mini-sglang (offline|single|TTFT)" "$L/latency.log" "$L/seed.log" "$L/offline.log" | cut -c1-200
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --offline "$OUT/raw/offline-qwen3-0.6b.json" \
  --latency "$OUT/raw/latency-qwen3-0.6b.json" --startup "$OUT/raw/startup-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)  # the device returns at most 8 files
