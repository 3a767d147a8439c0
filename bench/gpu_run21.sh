# Device run 21 (issue 13): issue 13's Qwen3-0.6B table from one call on fa3 prefill, the prefill graphs that
# store K/V inside them, and CUDA-core decode: gpu_check; latency through the stack, the tokenizer (text in)
# and the engine; the first token's phases; mini-sglang's offline, single stream and TTFT; offline through the
# stack at 1 and 4 decode passes and through the engine (with the roofline), each in a process of its own.
# Carry .whl, .fi-cache, .anchors and .tok.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=560
step gpu_check 100 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
step latency 80 python3 -m llmrpc.bench.latency --model $M --systems stack,text,engine --tokenizer .tok/smollm2 \
  --repeats 5 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step prefill 35 python3 -m llmrpc.bench.profile_prefill --model $M --repeats 6 --out "$OUT/raw/prefill-phases.json"
step seed 110 $SEED $M offline,decode,ttft
step offline_stack 90 python3 -m llmrpc.bench.offline --model $M --systems stack --decode-steps-list 1,4 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-stack.json"
step offline_engine 80 python3 -m llmrpc.bench.offline --model $M --systems roofline,engine \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-engine.json"
save_fi_cache
grep -E "^(attention|greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
grep -hE "^(stack|engine|text|roofline)[^:]*: |mini-sglang (offline|single|TTFT)|Error" "$L/latency.log" "$L/seed.log" \
  "$L/offline_stack.log" "$L/offline_engine.log" | cut -c1-200
grep -E "^PHASES|kernels launched|Error" "$L/prefill.log" | cut -c1-400
merge "$OUT/raw/offline-qwen3-0.6b.json" "$OUT/raw/offline-stack.json" "$OUT/raw/offline-engine.json"
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --offline "$OUT/raw/offline-qwen3-0.6b.json" \
  --latency "$OUT/raw/latency-qwen3-0.6b.json" --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
