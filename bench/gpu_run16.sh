# Device run 16 (issue 13): why the engine's TTFT(2048) is ~9 ms in some measurements and ~16 ms in others
# (run 15: 16.1 ms at the first measurement, 8.9 ms at the second, on the same runner). The prefill's phases
# as started and after gc.freeze() (with the collector's runs and the allocator's cudaMallocs), then the
# latency bench's engine part three times over on one runner. Carry .whl, .fi-cache and .anchors.
source bench/gpu_env.sh >/dev/null 2>&1
M=bench/configs/qwen3-0.6b
L=$OUT/logs
mkdir -p "$L"
BUDGET=200
step prefill 70 python3 -m llmrpc.bench.profile_prefill --model $M --out "$OUT/prefill-gc-qwen3-0.6b.json"
step latency 90 python3 -m llmrpc.bench.latency --model $M --systems engine --decode-steps-list 1,1,1 \
  --out "$OUT/latency-engine-repeat.json"
grep -E "^PHASES" "$L/prefill.log" | cut -c1-700
grep -A5 "^system" "$L/latency.log"
(cd "$OUT" && tar czf logs.tgz logs && rm -rf logs)
