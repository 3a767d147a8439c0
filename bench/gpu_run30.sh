# Device run 30 (issue 13): the fused decode attention at run 29's fastest tile (4 warps, 32 tokens a step;
# 2 programs an SM): kernel_check --decode, gpu_check, single stream and TTFT through the engine (fused decode
# on and off) and the stack at 1 and 8 decode passes; mini-sglang's in the same call.
# Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=560
step kernel_check_decode 80 python3 -m llmrpc.bench.kernel_check --decode --out "$OUT/raw/kernel-check-decode.json"
step gpu_check 120 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
lat() { local name=$1; shift; step "$name" 50 python3 -m llmrpc.bench.latency --model $M --repeats 3 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/$name.json" "$@"; }
lat latency_engine --systems engine
lat latency_stack --systems stack --decode-steps-list 1,8
lat latency_zfused0 --systems engine --fused-decode-max-rows 0  # z: merged last, so the summary's engine is the default
step seed 160 $SEED $M decode,ttft
grep -E "^qwen3|ALL PASS|FAILED|Error|error" "$L/kernel_check_decode.log" | cut -c1-160
grep -E "^(greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
grep -hE "^(engine|stack)[^:]*: |mini-sglang (single|TTFT)|Error" "$L"/latency_*.log "$L/seed.log" | cut -c1-200
merge "$OUT/raw/latency-qwen3-0.6b.json" "$OUT"/raw/latency_*.json
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
cp "$OUT/raw/kernel-check-decode.json" "$OUT/raw/gpu_check.json" "$OUT/" 2>/dev/null
pack_logs
