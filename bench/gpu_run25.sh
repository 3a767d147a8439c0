# Device run 25 (issue 13): the GEMV's defaults as committed (--gemv-max-rows 2, weights up to 8M elements:
# Qwen3-0.6B's linears, not -8B's): gpu_check, single stream and TTFT through the engine with the GEMV on and
# off and through the stack (1 and 8 decode passes a step), mini-sglang's in the same call.
# Carry .whl (with xgrammar, googleapis-common-protos, grpcio-status, pydantic), .anchors and .fi-cache.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=540
step gpu_check 150 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
lat() { local name=$1; shift; step "$name" 70 python3 -m llmrpc.bench.latency --model $M --repeats 3 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/$name.json" "$@"; }
lat latency_gemv2 --systems engine
lat latency_gemv0 --systems engine --gemv-max-rows 0
lat latency_stack --systems stack --decode-steps-list 1,8
step seed 110 $SEED $M decode,ttft
grep -E "^(greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
grep -hE "^(engine|stack)[^:]*: |mini-sglang (single|TTFT)|Error" "$L"/latency_*.log "$L/seed.log" | cut -c1-200
merge "$OUT/raw/latency-qwen3-0.6b.json" "$OUT"/raw/latency_*.json
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
