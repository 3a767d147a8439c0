# Device run 26 (issue 13): run 25's stack step, which lacked the smg-grpc-proto wheel: single stream and TTFT
# through the stack at 1 and 8 decode passes a step with the GEMV's defaults, mini-sglang's in the same call.
# Carry .whl, .anchors and .fi-cache.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=330
step latency_stack 150 python3 -m llmrpc.bench.latency --model $M --systems stack --decode-steps-list 1,8 \
  --repeats 3 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 110 $SEED $M decode,ttft
grep -hE "^(stack)[^:]*: |mini-sglang (single|TTFT)|Error" "$L"/latency_stack.log "$L/seed.log" | cut -c1-200
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
