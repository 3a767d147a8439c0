# Device run 19 (issue 13): what the stack adds to a first token, and which attention kernels to run.
# Latency through the stack, the tokenizer (text in), the worker alone and the engine with the prefill
# graphs on (the default), and through the stack and the engine with them off (--prefill-graph-max-tokens 0),
# each in a process of its own; mini-sglang's single stream and TTFT in the same call; then
# bench/attention_backends.py (FlashInfer fa2 against fa3, paged against ragged prefill, tensor-core against
# CUDA-core decode, split-KV on and off). Carry .whl, .fi-cache, .anchors and .tok.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=560
step latency 110 python3 -m llmrpc.bench.latency --model $M --systems stack,text,worker,engine \
  --tokenizer .tok/smollm2 --repeats 5 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-graphs.json"
step latency_eager 80 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --prefill-graph-max-tokens 0 \
  --repeats 5 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-eager.json"
step seed 60 $SEED $M decode,ttft
step attention 250 python3 -m llmrpc.bench.attention_backends --out "$OUT/raw/attention-backends.json"
save_fi_cache
grep -hE "^(stack|engine|worker|text)[^:]*: |mini-sglang (single|TTFT)|Error" "$L/latency.log" "$L/latency_eager.log" \
  "$L/seed.log" | cut -c1-220
grep -E "prefill|decode|Error" "$L/attention.log" | grep -v "^\[" | cut -c1-160
merge "$OUT/raw/latency-qwen3-0.6b.json" "$OUT/raw/latency-graphs.json" "$OUT/raw/latency-eager.json"
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
