# Device run 32 (issue 13): gpu_check after the review's mends to the fused decode's host side (its staging
# buffer only for fused sizes, the workspace's shape checked, the dot's dtype chosen by the tensors' device).
# Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
BUDGET=200
step gpu_check 170 python3 -m llmrpc.bench.gpu_check --out "$OUT/gpu_check.json"
grep -E "^(greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
pack_logs
