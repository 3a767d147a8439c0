# Device run 25 (issue 13): the GEMV's defaults as committed (--gemv-max-rows 2, weights up to 8M elements:
# Qwen3-0.6B's linears, not -8B's): gpu_check, single stream and TTFT through the engine with the GEMV on and
# off and through the stack (1 and 8 decode passes a step), mini-sglang's in the same call.
# Carry .whl (with xgrammar, googleapis-common-protos, grpcio-status, pydantic), .anchors and .fi-cache.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=540
gpu_check_step 150
lat latency_gemv2 70 --systems engine
lat latency_gemv0 70 --systems engine --gemv-max-rows 0
lat latency_stack 70 --systems stack --decode-steps-list 1,8
step seed 110 $SEED $M decode,ttft
seed_report qwen3-0.6b "$OUT"/raw/latency_*.json
pack_logs
