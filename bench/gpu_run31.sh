# Device run 31 (issue 13): Qwen3-8B single stream with the fused decode attention (its linears stay on cuBLAS),
# through the engine and the stack at 8 decode passes; mini-sglang's in the same call.
# Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-8b
BUDGET=400
step latency_8b 170 python3 -m llmrpc.bench.latency --model $M --repeats 2 --systems engine,stack \
  --decode-steps-list 8 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-qwen3-8b.json"
step seed 200 $SEED $M decode,ttft
seed_report qwen3-8b "$OUT/raw/latency-qwen3-8b.json"
pack_logs
