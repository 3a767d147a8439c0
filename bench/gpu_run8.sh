# Device run 8 (issue 13): where the stack's time goes beside the engine's, with the seed in the same call.
# Qwen3-0.6B: latency through the stack, the worker alone (its own Steps stream) and the engine, so the
# TTFT and single-stream gaps split into the worker's hop and the scheduler's; offline through the
# engine and the stack (stream=False answers now wake their handler once, at the finish); mini-sglang
# on the same workloads; one result file per figure with both systems and the ratio.
# Carry .whl, .fi-cache and .anchors. Ends inside 9 minutes; the table of figures comes last.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=530
step latency 210 python3 -m llmrpc.bench.latency --model $M --systems stack,worker,engine --commit "$COMMIT" \
  --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 160 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" \
  python3 .anchors/run_minisglang.py $M offline,decode,ttft
step offline 150 python3 -m llmrpc.bench.offline --model $M --systems engine,stack --commit "$COMMIT" \
  --log-dir "$L" --out "$OUT/raw/offline-qwen3-0.6b.json"
save_fi_cache
grep -hE "^(stack|engine|worker)[^:]*: |RESULT|mini-sglang (offline|single|TTFT)" "$L/latency.log" "$L/seed.log" "$L/offline.log" | cut -c1-200
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --offline "$OUT/raw/offline-qwen3-0.6b.json" \
  --latency "$OUT/raw/latency-qwen3-0.6b.json" --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)  # the device returns at most 8 files
