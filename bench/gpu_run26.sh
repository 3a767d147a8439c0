# Device run 26 (issue 13): run 25's stack step, which lacked the smg-grpc-proto wheel: single stream and TTFT
# through the stack at 1 and 8 decode passes a step with the GEMV's defaults, mini-sglang's in the same call.
# Carry .whl, .anchors and .fi-cache.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=330
lat latency_stack 150 --systems stack --decode-steps-list 1,8
step seed 110 $SEED $M decode,ttft
seed_report qwen3-0.6b "$OUT/raw/latency_stack.json"
pack_logs
