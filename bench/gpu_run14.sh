# Device run 14 (issue 13): the host cost of each eager-forward operation (bench/host_overhead.py), 0.6B.
source bench/gpu_env.sh >/dev/null 2>&1
python3 -m llmrpc.bench.host_overhead --model bench/configs/qwen3-0.6b --out $OUT/host-overhead-qwen3-0.6b.json 2>&1 | grep -E "^ +[0-9]+ |Error|error" | cut -c1-160
python3 -c "import triton, flashinfer, torch; print(triton.__version__, flashinfer.__version__, torch.__version__)"
lscpu | grep -E "Model name|MHz" | head -3
