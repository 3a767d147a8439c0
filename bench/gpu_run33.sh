# Device run 33 (issue 13), exploration for the offline decode and the first token, no speed claim: the fused
# decode attention against the FlashInfer path at an offline run's batches (kernel_check --decode
# --decode-batch: 32-256 rows of mixed contexts, K/V read rates); the first token's engine phases with
# prepare split into pages, batch and plan (profile_prefill); every hop of the stack's first token
# (trace_ttft). Carry .whl, .anchors, .tok (and .fi-cache when a run saved one).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=580
step kernel_check_batch 240 python3 -m llmrpc.bench.kernel_check --decode --decode-batch \
  --out "$OUT/raw/kernel-check-decode-batch.json"
grep -E "^qwen3|ALL PASS|FAILED|Error|error" "$L/kernel_check_batch.log" | cut -c1-400
step prefill 150 python3 -m llmrpc.bench.profile_prefill --model $M --repeats 8 --out "$OUT/raw/prefill-phases.json"
grep -E "^PHASES|kernels launched|Error" "$L/prefill.log" | cut -c1-600
step trace 100 python3 -m llmrpc.bench.trace_ttft --model $M --tokenizer .tok/smollm2 --log-dir "$L"
grep -vE "^TRACE" "$L/trace.log" | tail -40
save_fi_cache
cp "$OUT/raw/kernel-check-decode-batch.json" "$OUT/raw/prefill-phases.json" "$OUT/" 2>/dev/null
cp "$L/trace.log" "$OUT/trace-ttft.txt" 2>/dev/null
pack_logs
