# Device run 18 (issue 13): piecewise CUDA graphs of prefill steps (--prefill-graph-max-tokens, default 4096).
# gpu_check (the graphs' prefills against eager ones and the logits against transformers), the first token's
# phases (profile_prefill.py), TTFT and single stream through the stack and the engine, mini-sglang's in the
# same call. Carry .whl, .fi-cache and .anchors.
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L" "$OUT/raw"
BUDGET=265
step gpu_check 90 python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
step prefill 40 python3 -m llmrpc.bench.profile_prefill --model $M --repeats 6 --out "$OUT/raw/prefill-phases.json"
step latency 70 python3 -m llmrpc.bench.latency --model $M --systems stack,engine --commit "$COMMIT" \
  --log-dir "$L" --out "$OUT/raw/latency-qwen3-0.6b.json"
step seed 50 env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" python3 .anchors/run_minisglang.py $M decode,ttft
grep -E "^(attention|greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-400
grep -E "^PHASES|kernels launched|Error" "$L/prefill.log" | cut -c1-420
grep -hE "^(stack|engine)[^:]*: |mini-sglang (single|TTFT)|Error" "$L/latency.log" "$L/seed.log" | cut -c1-220
python3 -m llmrpc.bench.seed_compare --model qwen3-0.6b --latency "$OUT/raw/latency-qwen3-0.6b.json" \
  --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
(cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw)
