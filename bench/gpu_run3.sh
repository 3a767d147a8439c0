# Device run 3: final correctness report, Qwen3-8B offline (+ ablation without overlap), the full
# stack without overlap on Qwen3-0.6B, a profile of full-batch decode, and the PNG.
source bench/gpu_env.sh
mkdir -p $OUT/logs
timeout 120 python3 -m llmrpc.bench.gpu_check --out $OUT/gpu_check.json 2>&1 | tee $OUT/logs/gpu_check.log | grep -v Warning
timeout 200 python3 -m llmrpc.bench.offline --model bench/configs/qwen3-8b --systems roofline,engine,stack \
  --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/offline-qwen3-8b.json 2>&1 | tee $OUT/logs/offline8b.log | grep -v Warning
timeout 70 python3 -m llmrpc.bench.offline --model bench/configs/qwen3-0.6b --systems stack --disable-overlap \
  --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/offline-stack-nooverlap-qwen3-0.6b.json 2>&1 | tee $OUT/logs/nooverlap.log | grep -v Warning
timeout 60 python3 -m llmrpc.bench.profile_decode --model bench/configs/qwen3-0.6b > $OUT/logs/profile.txt 2>&1
cp $OUT/offline-*.json bench/results/ && python3 -m llmrpc.bench.plot --out $OUT/offline.png
grep -B2 -A28 "Name" $OUT/logs/profile.txt | cut -c1-160 | head -34
(cd $OUT && tar czf logs.tgz logs && rm -rf logs)
