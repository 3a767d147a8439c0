# Device run 4: the exponential-race sampler. Sampling microbenchmark (before vs after, on the
# device), Qwen3-0.6B offline through the engine and the full stack, then the correctness report.
source bench/gpu_env.sh
mkdir -p $OUT/logs
COMMIT=${COMMIT:-7a9ec84+race-sampler}
timeout 90 python3 -m llmrpc.bench.sampling_bench --out $OUT/sampling-bench.json 2>&1 | tee $OUT/logs/sampling.log | grep -v Warning
timeout 150 python3 -m llmrpc.bench.offline --model bench/configs/qwen3-0.6b --systems engine,stack \
  --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/offline-qwen3-0.6b-race-sampler.json 2>&1 | tee $OUT/logs/offline.log | grep -v Warning
if [ "$SECONDS" -lt 250 ]; then
  timeout $((390 - SECONDS)) python3 -m llmrpc.bench.gpu_check --out $OUT/gpu_check.json 2>&1 | tee $OUT/logs/gpu_check.log | grep -v Warning | tail -40
fi
(cd $OUT && tar czf logs.tgz logs && rm -rf logs)
