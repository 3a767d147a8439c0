# Device run 23 (issue 13): the defaults as committed (fa3 prefill, ragged when nothing is cached, the prefill
# graphs storing K/V inside them, tensor-core decode): gpu_check, latency through the stack and the engine on
# Qwen3-0.6B, mini-sglang's single stream and TTFT in the same call. Carry .whl, .fi-cache and .anchors.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=200
step gpu_check 95 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
step latency 55 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --repeats 3 --commit "$COMMIT" \
  --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 40 $SEED $M decode,ttft
grep -E "^(greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
