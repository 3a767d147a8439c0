# Device run 1: correctness, then Qwen3-0.6B offline (roofline, engine with/without overlap, full stack).
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import flashinfer, torch; print('flashinfer', flashinfer.__version__, torch.__version__)" || exit 1
mkdir -p $OUT/logs
timeout 230 python3 -m llmrpc.bench.gpu_check --out $OUT/gpu_check.json 2>&1 | tee $OUT/logs/gpu_check.log | grep -v Warning
save_fi_cache
timeout 290 python3 -m llmrpc.bench.offline --model bench/configs/qwen3-0.6b --systems roofline,engine,stack \
  --commit "$COMMIT" --log-dir $OUT/logs --out $OUT/offline-qwen3-0.6b.json 2>&1 | tee $OUT/logs/offline.log | grep -v Warning
rm -f $OUT/fi-cache.tgz.*; save_fi_cache
tail -5 $OUT/logs/worker.log
(cd $OUT && tar czf logs.tgz logs && rm -rf logs)
