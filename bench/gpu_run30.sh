# Device run 30 (issue 13): the fused decode attention at run 29's fastest tile (4 warps, 32 tokens a step;
# 2 programs an SM): kernel_check --decode, gpu_check, single stream and TTFT through the engine (fused decode
# on and off) and the stack at 1 and 8 decode passes; mini-sglang's in the same call.
# Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=560
step kernel_check_decode 80 python3 -m llmrpc.bench.kernel_check --decode --out "$OUT/raw/kernel-check-decode.json"
grep -E "^qwen3|ALL PASS|FAILED|Error|error" "$L/kernel_check_decode.log" | cut -c1-160
gpu_check_step 120
lat latency_engine 50 --systems engine
lat latency_stack 50 --systems stack --decode-steps-list 1,8
lat latency_zfused0 50 --systems engine --fused-decode-max-rows 0
step seed 160 $SEED $M decode,ttft
seed_report qwen3-0.6b "$OUT"/raw/latency_*.json  # latency_zfused0 last: the summary's engine is the default
cp "$OUT/raw/kernel-check-decode.json" "$OUT/raw/gpu_check.json" "$OUT/" 2>/dev/null
pack_logs
