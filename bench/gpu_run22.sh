# Device run 22 (issue 13): which kernels offline decode wants, and the Qwen3-8B figures on fa3.
# Qwen3-0.6B offline through the engine on (fa2 prefill, tensor-core decode: run 15's kernels), (fa3, tensor
# cores) and (fa3, CUDA cores), each in a process of its own; the stack at 1 and 4 decode passes on the faster
# decode kernels; mini-sglang's offline. Qwen3-8B: latency through the stack and the engine, mini-sglang's single
# stream and TTFT; then, as time allows, 8B offline through the stack and mini-sglang's. Carry .whl, .fi-cache,
# .anchors and .tok.
source bench/gpu_env.sh
start_run
M=bench/configs/qwen3-0.6b
B=bench/configs/qwen3-8b
BUDGET=540
off() { local name=$1; shift; step "$name" 60 python3 -m llmrpc.bench.offline --model $M --systems engine "$@" \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/$name.json"; }
off engine_fa2_tc --flashinfer-prefill fa2 --flashinfer-decode tensor-cores
off engine_fa3_tc --flashinfer-decode tensor-cores
off engine_fa3_cc --flashinfer-decode cuda-cores
tok_s() { grep -oE "overlap=True decode_steps=1: [0-9]+" "$L/$1.log" | grep -oE "[0-9]+$" || echo 0; }
DECODE=cuda-cores; [ "$(tok_s engine_fa3_tc)" -gt "$(tok_s engine_fa3_cc)" ] && DECODE=tensor-cores
echo "decode kernels for the stack: $DECODE"
step offline_stack 80 python3 -m llmrpc.bench.offline --model $M --systems stack --decode-steps-list 1,4 \
  --flashinfer-decode $DECODE --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-stack.json"
step seed 60 $SEED $M offline
step latency8b 110 python3 -m llmrpc.bench.latency --model $B --systems stack,engine --repeats 3 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-qwen3-8b.json"
step seed8b 90 $SEED $B decode,ttft
step offline8b 100 python3 -m llmrpc.bench.offline --model $B --systems stack --commit "$COMMIT" --log-dir "$L" \
  --out "$OUT/raw/offline-qwen3-8b-stack.json"
step seed8b_offline 100 $SEED $B offline
save_fi_cache
grep -hE "^(stack|engine)[^:]*: |mini-sglang (offline|single|TTFT)|Error" "$L"/engine_*.log "$L/offline_stack.log" \
  "$L/seed.log" "$L/latency8b.log" "$L/seed8b.log" "$L/offline8b.log" "$L/seed8b_offline.log" 2>/dev/null | cut -c1-200
merge "$OUT/raw/offline-qwen3-0.6b.json" "$OUT/raw/offline-stack.json" "$OUT"/raw/engine_*.json
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --offline "$OUT/raw/offline-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
cat "$L/seed8b.log" "$L/seed8b_offline.log" 2>/dev/null > "$L/seed8b_all.log"
[ -f "$OUT/raw/offline-qwen3-8b-stack.json" ] && OFF8="--offline $OUT/raw/offline-qwen3-8b-stack.json"
python3 -m llmrpc.bench.seed_compare --model qwen3-8b $OFF8 --latency "$OUT/raw/latency-qwen3-8b.json" \
  --seed-log "$L/seed8b_all.log" --out-dir "$OUT" | grep -v "^wrote"
pack_logs
