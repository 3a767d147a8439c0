# Device run 28 (issue 13): single stream with the fused decode attention, through the engine with it on
# (--fused-decode-max-rows 2, the default) and off, and through the stack at 1 and 8 decode passes a step;
# mini-sglang's in the same call. Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=540
lat() { local name=$1; shift; step "$name" 90 python3 -m llmrpc.bench.latency --model $M --repeats 3 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/$name.json" "$@"; }
lat latency_fused2 --systems engine
lat latency_fused0 --systems engine --fused-decode-max-rows 0
lat latency_stack --systems stack --decode-steps-list 1,8
step seed 110 $SEED $M decode,ttft
grep -hE "^(engine|stack)[^:]*: |mini-sglang (single|TTFT)|Error" "$L"/latency_*.log "$L/seed.log" | cut -c1-200
merge "$OUT/raw/latency-qwen3-0.6b.json" "$OUT"/raw/latency_*.json
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
