# Device run 5: the scheduler's --overlap-depth (steps in flight ahead of the oldest unread result).
# Qwen3-0.6B shape: single-stream decode and TTFT(2048) through the stack at depths 1, 2, 3 (one
# worker, the scheduler restarted per depth) and through the engine alone (what the services add);
# then offline throughput through the stack at depths 2 and 1.
source bench/gpu_env.sh
mkdir -p $OUT/logs
timeout 140 python3 -m llmrpc.bench.latency --model bench/configs/qwen3-0.6b --overlap-depths 1,2,3 \
  --systems stack,engine --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/latency-qwen3-0.6b-depths.json \
  2>&1 | tee $OUT/logs/latency.log | grep -v Warning
timeout 100 python3 -m llmrpc.bench.offline --model bench/configs/qwen3-0.6b --systems stack --overlap-depths 2,1 \
  --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/offline-qwen3-0.6b-depths.json \
  2>&1 | tee $OUT/logs/offline.log | grep -v Warning
(cd $OUT && tar czf logs.tgz logs && rm -rf logs)
