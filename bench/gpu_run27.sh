# Device run 27 (issue 13): the fused decode attention (kernels/triton_decode.py) on the GPU: kernel_check
# --decode (checked against the Triton Q/K norm + RoPE, K/V store and FlashInfer decode it replaces, and timed
# against them at Qwen3-0.6B's and -8B's heads, 1-8 rows, 128-8,192 tokens), then gpu_check on the defaults
# (--fused-decode-max-rows 2); FlashInfer's and Triton's JIT caches saved for run 28.
# Carry .whl and .anchors (and .fi-cache when a run saved one).
source bench/gpu_env.sh
start_run
BUDGET=560
step kernel_check_decode 200 python3 -m llmrpc.bench.kernel_check --decode --out "$OUT/raw/kernel-check-decode.json"
grep -E "^qwen3|ALL PASS|FAILED|Error|error" "$L/kernel_check_decode.log" | cut -c1-250
gpu_check_step 330
cp "$OUT/raw/kernel-check-decode.json" "$OUT/raw/gpu_check.json" "$OUT/" 2>/dev/null
save_fi_cache
pack_logs
