# Device run 15 (issue 13): issue 13's Qwen3-0.6B table from one call, mini-sglang beside it. Start-up on
# the warm JIT cache; single stream and TTFT through the stack and the engine at 1 and 8 decode passes a
# step; the seed on the same workloads; offline through the engine (with the roofline) and through the
# stack at 1 and 4 passes, each in a process of its own (run 12 timed the stack after the engine in one
# process and found it 20% slower than alone). Carry .whl, .fi-cache and .anchors.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=520
step startup 60 python3 -m llmrpc.bench.startup --model $M --commit "$COMMIT" --log-dir "$L" \
  --out "$OUT/raw/startup-qwen3-0.6b.json"
step latency 120 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --decode-steps-list 1,8 \
  --repeats 5 --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 110 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" \
  python3 .anchors/run_minisglang.py $M offline,decode,ttft
step offline_engine 90 python3 -m llmrpc.bench.offline --model $M --systems roofline,engine \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-engine.json"
step offline_stack 80 python3 -m llmrpc.bench.offline --model $M --systems stack --decode-steps-list 1,4 \
  --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/offline-stack.json"
save_fi_cache
python3 -c "import json,sys; json.dump([r for f in sys.argv[2:] for r in json.load(open(f))], open(sys.argv[1], 'w'), indent=2)" \
  "$OUT/raw/offline-qwen3-0.6b.json" "$OUT/raw/offline-engine.json" "$OUT/raw/offline-stack.json"
grep -hE "ready in|^(stack|engine|roofline)[^:]*: |mini-sglang (offline|single|TTFT)" "$L"/startup.log "$L"/latency.log \
  "$L"/seed.log "$L"/offline_engine.log "$L"/offline_stack.log | cut -c1-220
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --offline "$OUT/raw/offline-qwen3-0.6b.json" \
  --latency "$OUT/raw/latency-qwen3-0.6b.json" --startup "$OUT/raw/startup-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)  # the device returns at most 8 files
