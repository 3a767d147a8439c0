# Device run 29 (issue 13): the fused decode attention with the next block's K/V loaded ahead, idle splits
# leaving at once and one split writing its output alone (8 warps, 2 programs an SM): kernel_check --decode
# (with a sweep of splits, tokens a step and warps at one row), gpu_check, single stream through the engine
# with it on and off and through the stack at 1 and 8 decode passes; mini-sglang's in the same call.
# Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=560
step kernel_check_decode 150 python3 -m llmrpc.bench.kernel_check --decode --out "$OUT/raw/kernel-check-decode.json"
grep -E "^qwen3|ALL PASS|FAILED|Error|error" "$L/kernel_check_decode.log" | cut -c1-400
gpu_check_step 150
lat latency_engine 60 --systems engine
lat latency_stack 60 --systems stack --decode-steps-list 1,8
lat latency_zfused0 60 --systems engine --fused-decode-max-rows 0
step seed 100 $SEED $M decode,ttft
seed_report qwen3-0.6b "$OUT"/raw/latency_*.json  # latency_zfused0 last: the summary's engine is the default
cp "$OUT/raw/kernel-check-decode.json" "$OUT/raw/gpu_check.json" "$OUT/" 2>/dev/null
pack_logs
