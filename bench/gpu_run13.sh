# Device run 13 (issue 13): the first token's time by phase and kernel (bench/profile_prefill.py, 0.6B);
# the 0.6B offline stack in a process of its own (run 12 timed it after the engine in one process, which
# left it slower); Qwen3-8B through the stack at 1 and 4 decode passes a step (single stream, TTFT,
# offline) beside mini-sglang's 8B in the same call. Carry .whl, .fi-cache and .anchors.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
B=bench/configs/qwen3-8b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=560
step prefill 60 python3 -m llmrpc.bench.profile_prefill --model $M --out "$OUT/raw/prefill-phases-qwen3-0.6b.json"
step offline06 70 python3 -m llmrpc.bench.offline --model $M --systems stack --decode-steps-list 1,4 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-stack-qwen3-0.6b.json"
step latency8b 110 python3 -m llmrpc.bench.latency --model $B --systems stack --decode-steps-list 1,4 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-qwen3-8b.json"
step offline8b 130 python3 -m llmrpc.bench.offline --model $B --systems stack --decode-steps-list 1,4 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-qwen3-8b.json"
step seed8b 160 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" \
  python3 .anchors/run_minisglang.py $B offline,decode,ttft
save_fi_cache
grep -E "^PHASES|kernels launched" "$L/prefill.log" | cut -c1-600
grep -hE "^(stack|engine)[^:]*: |mini-sglang (offline|single|TTFT)" "$L"/offline06.log "$L"/latency8b.log \
  "$L"/offline8b.log "$L"/seed8b.log | cut -c1-220
python3 -m llmrpc.bench.seed_compare --model qwen3-8b --offline "$OUT/raw/offline-qwen3-8b.json" \
  --latency "$OUT/raw/latency-qwen3-8b.json" --seed-log "$L/seed8b.log" --out-dir "$OUT" | grep -v "^wrote"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)  # the device returns at most 8 files
