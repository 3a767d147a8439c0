# Device run 11, after runs 9 and 10 on the same machine: the constrained-decoding bench again with the
# bitmask fill on up to 8 threads (engine/constraint.py BATCH_FILL_THREADS; run 10 filled on 2), then
# Qwen3-0.6B single stream and TTFT through the stack with the worker's GIL switch interval at CPython's
# 5 ms and at 0.5 ms (LLMRPC_SWITCH_INTERVAL_S), beside mini-sglang's. Carry .whl, .fi-cache, .anchors, .tok.
source bench/gpu_env.sh >/dev/null 2>&1
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=240
step constrained 80 python3 -m llmrpc.bench.constrained --model $M --tokenizer .tok/smollm2 --device cuda \
  --load-format dummy --out "$OUT/constrained-gpu.json"
for interval in 0.005 0.0005; do
  step "latency_switch_$interval" 60 env LLMRPC_SWITCH_INTERVAL_S=$interval python3 -m llmrpc.bench.latency \
    --model $M --systems stack --commit "$COMMIT" --log-dir "$L" --out "$OUT/raw/latency-stack-switch-$interval.json"
done
step seed 40 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" python3 .anchors/run_minisglang.py $M decode,ttft
tail -9 "$L/constrained.log" | cut -c1-220
for f in "$L"/latency_switch_*.log; do echo "$f"; grep -E "^stack" "$f"; done
grep -hE "mini-sglang (single|TTFT)" "$L/seed.log"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)
