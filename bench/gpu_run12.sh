# Device run 12 (issue 13): multi-step decode (--decode-steps) measured, with the seed in the same call.
# Qwen3-0.6B: gpu_check (correctness after the change), single stream and TTFT through the stack and the
# engine at 1, 4 and 8 decode passes a step; mini-sglang on the same workloads; offline through the
# engine and the stack at 1 and 4 passes; the kernel breakdown of a full-batch (256-row) decode step.
# Carry .whl, .fi-cache and .anchors. Ends inside 9.5 minutes; the table of figures comes last.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=560
step gpu_check 90 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
step latency 150 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --decode-steps-list 1,4,8 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 130 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" \
  python3 .anchors/run_minisglang.py $M offline,decode,ttft
step offline 130 python3 -m llmrpc.bench.offline --model $M --systems engine,stack --decode-steps-list 1,4 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-qwen3-0.6b.json"
step profile256 60 python3 -m llmrpc.bench.profile_decode --model $M --steps 20
save_fi_cache
tail -4 "$L/gpu_check.log" | cut -c1-200
grep -hE "^(stack|engine)[^:]*: |mini-sglang (offline|single|TTFT)" "$L/latency.log" "$L/seed.log" "$L/offline.log" | cut -c1-220
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --offline "$OUT/raw/offline-qwen3-0.6b.json" \
  --latency "$OUT/raw/latency-qwen3-0.6b.json" --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)  # the device returns at most 8 files
