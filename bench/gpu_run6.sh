# Device run 6: run 5's latency sweep repeated in the other order (depth 2 first, then 1), 5 repeats,
# to check that depth 2's lower TTFT is not an artefact of which scheduler ran first.
source bench/gpu_env.sh
mkdir -p $OUT/logs
timeout 110 python3 -m llmrpc.bench.latency --model bench/configs/qwen3-0.6b --overlap-depths 2,1 --repeats 5 \
  --systems stack --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/latency-qwen3-0.6b-depths-rerun.json \
  2>&1 | tee $OUT/logs/latency.log | grep -v Warning
(cd $OUT && tar czf logs.tgz logs && rm -rf logs)
