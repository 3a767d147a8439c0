# Device run 10 (issues 17 and 13), after run 9 on the same machine: the constrained-decoding bench
# (run 9's call lacked --load-format dummy), then Qwen3-0.6B latency through the stack and the engine
# beside mini-sglang's single stream and TTFT. Carry .whl, .fi-cache, .anchors and .tok.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=300
step constrained 110 python3 -m llmrpc.bench.constrained --model $M --tokenizer .tok/smollm2 --device cuda \
  --load-format dummy --out "$OUT/constrained-gpu.json"
step latency 90 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --commit "$COMMIT" \
  --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 70 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" python3 .anchors/run_minisglang.py $M decode,ttft
tail -12 "$L/constrained.log" | cut -c1-220
grep -hE "^(stack|engine)[^:]*: |RESULT|mini-sglang (single|TTFT)" "$L/latency.log" "$L/seed.log" | cut -c1-200
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)
