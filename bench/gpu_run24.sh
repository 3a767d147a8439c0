# Device run 24 (issue 13): the few-row linears on the fused Triton GEMV (kernels/triton_gemv.py). Each GEMV
# against the torch path it replaces and timed (kernel_check --gemv), gpu_check with the GEMV on (--gemv-max-rows 4;
# the default became 2 after this run), single stream and TTFT through the engine with the GEMV on and off, mini-sglang's in
# the same call. A fresh machine: FlashInfer's JIT builds its kernels inside gpu_check; the cache goes back.
# Carry .whl and .anchors (and .fi-cache when a previous call saved one).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=560
step gemv 130 python3 -m llmrpc.bench.kernel_check --gemv --out "$OUT/raw/kernel-check-gemv.json"
grep -E "rows1|ALL PASS|FAILED|Error" "$L/gemv.log" | cut -c1-400
gpu_check_step 250
save_fi_cache
lat latency_gemv4 55 --systems engine --gemv-max-rows 4
lat latency_gemv0 55 --systems engine --gemv-max-rows 0
step seed 60 $SEED $M decode,ttft
seed_report qwen3-0.6b "$OUT"/raw/latency_gemv*.json
pack_logs
