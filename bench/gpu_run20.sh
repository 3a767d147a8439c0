# Device run 20 (issue 13): FlashInfer's fa3 prefill kernels (ragged when nothing is cached), the default now.
# gpu_check on them; latency through the stack, the tokenizer (text in) and the engine on fa3, and through the
# stack and the engine on fa2 (--flashinfer-prefill fa2), each in a process of its own; the first token's phases
# (profile_prefill.py); mini-sglang's single stream and TTFT in the same call. Carry .whl, .fi-cache, .anchors, .tok.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
BUDGET=520
step gpu_check 110 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
step latency 90 python3 -m llmrpc.bench.latency --model $M --systems stack,text,engine --tokenizer .tok/smollm2 \
  --repeats 5 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-fa3.json"
step latency_fa2 70 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --flashinfer-prefill fa2 \
  --repeats 5 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-fa2.json"
# Run 20 took this trace with a diagnostic patch; bench/trace_ttft.py (services/trace.py) carries its points now.
step trace 60 python3 -m llmrpc.bench.trace_ttft --model $M --tokenizer .tok/smollm2 --log-dir "$L"
step seed 60 $SEED $M decode,ttft
step prefill 45 python3 -m llmrpc.bench.profile_prefill --model $M --repeats 6 --out "$OUT/raw/prefill-phases.json"
save_fi_cache
grep -E "^(attention|greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
grep -hE "^(stack|engine|text)[^:]*: |mini-sglang (single|TTFT)|Error" "$L/latency.log" "$L/latency_fa2.log" "$L/seed.log" | cut -c1-200
[ -f "$L/trace.log" ] && grep -vE "^(loading|\[)" "$L/trace.log" | tail -40
grep -E "^PHASES|kernels launched|Error" "$L/prefill.log" | cut -c1-400
merge "$OUT/raw/latency-qwen3-0.6b.json" "$OUT/raw/latency-fa3.json" "$OUT/raw/latency-fa2.json"
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
