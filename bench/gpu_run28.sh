# Device run 28 (issue 13): single stream with the fused decode attention, through the engine with it on
# (--fused-decode-max-rows 2, the default) and off, and through the stack at 1 and 8 decode passes a step;
# mini-sglang's in the same call. Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=540
lat latency_fused2 90 --systems engine
lat latency_fused0 90 --systems engine --fused-decode-max-rows 0
lat latency_stack 90 --systems stack --decode-steps-list 1,8
step seed 110 $SEED $M decode,ttft
seed_report qwen3-0.6b "$OUT"/raw/latency_*.json
pack_logs
