# Device run 32 (issue 13): gpu_check after the review's mends to the fused decode's host side (its staging
# buffer only for fused sizes, the workspace's shape checked, the dot's dtype chosen by the tensors' device).
# Carry .whl, .anchors and .fi-cache (run 27's).
source bench/gpu_env.sh
start_run
BUDGET=200
gpu_check_step 170
cp "$OUT/raw/gpu_check.json" "$OUT/"
pack_logs
