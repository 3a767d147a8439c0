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
step gpu_check 250 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
save_fi_cache
lat() { local name=$1; shift; step "$name" 55 python3 -m llmrpc.bench.latency --model $M --systems engine \
  --repeats 3 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/$name.json" "$@"; }
lat latency_gemv4 --gemv-max-rows 4
lat latency_gemv0 --gemv-max-rows 0
step seed 60 $SEED $M decode,ttft
grep -E "rows1|ALL PASS|FAILED|Error" "$L/gemv.log" | cut -c1-400
grep -E "^(greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
grep -hE "^(engine)[^:]*: |mini-sglang (single|TTFT)|Error" "$L"/latency_*.log "$L/seed.log" | cut -c1-200
merge "$OUT/raw/latency-qwen3-0.6b.json" "$OUT"/raw/latency_gemv*.json
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
