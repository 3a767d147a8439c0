# Device run 2: correctness again (fused norm/RoPE/activation now on), Qwen3-0.6B offline with
# engine + full stack + HF baseline, latency through the stack.
source bench/gpu_env.sh
mkdir -p $OUT/logs
timeout 150 python3 -m llmrpc.bench.gpu_check --out $OUT/gpu_check.json 2>&1 | tee $OUT/logs/gpu_check.log | grep -v Warning
save_fi_cache
timeout 200 python3 -m llmrpc.bench.offline --model bench/configs/qwen3-0.6b --systems roofline,engine,stack \
  --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/offline-qwen3-0.6b.json 2>&1 | tee $OUT/logs/offline.log | grep -v Warning
timeout 90 python3 -m llmrpc.bench.latency --model bench/configs/qwen3-0.6b --commit "$COMMIT" --log-dir $OUT/logs \
  --out $OUT/latency-qwen3-0.6b.json 2>&1 | tee $OUT/logs/latency.log | grep -v Warning
timeout 150 python3 -m llmrpc.bench.offline --model bench/configs/qwen3-0.6b --systems hf --hf-deadline-s 100 \
  --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/offline-hf-qwen3-0.6b.json 2>&1 | tee $OUT/logs/hf.log | grep -v Warning
rm -f $OUT/fi-cache.tgz.*; save_fi_cache
(cd $OUT && tar czf logs.tgz logs && rm -rf logs)
