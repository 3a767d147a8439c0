# Device run 7 (issues 13 and 14), in two calls of one lease: `bash bench/gpu_run7.sh check` then
# `bash bench/gpu_run7.sh moe`. Carry .whl, .fi-cache and .anchors. Each call ends inside 9 minutes.
#   check: the fused attention kernels against torch (kernel_check), the whole GPU path against the torch
#          backend and transformers (gpu_check), the fused MoE against its torch reference (moe_check).
#   moe:   the Mistral-7B shape offline through the stack beside mini-sglang, with its roofline; the
#          Qwen3-30B-A3B shape offline, single stream and TTFT(2048) through the stack, with the MoE
#          roofline (mini-sglang's MoE path needs sgl-kernel, which that machine lacks: the roofline is
#          the anchor there).
# Everything but the caches comes back in one results.tgz (the device returns at most 8 files).
source bench/gpu_env.sh
COMMIT=${COMMIT:-unknown}
L=$OUT/logs
R=$OUT/results
mkdir -p "$L" "$R"
BUDGET=520
SEED=(env PYTHONPATH=".anchors/mini-sglang/python:$PYTHONPATH" python3 .anchors/run_minisglang.py)
case "$1" in
check)
  step kernel_check 110 python3 -m llmrpc.bench.kernel_check --with-fi-append --out "$R/kernel_check.json"
  grep -E "^(qk_norm_rope|rope|store_kv|race|filtered) |KERNEL" "$L/kernel_check.log" | cut -c1-200
  step gpu_check 130 python3 -m llmrpc.bench.gpu_check --out "$R/gpu_check.json"
  grep -E "^(greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAIL|Error" "$L/gpu_check.log" | cut -c1-300
  step moe_check 70 python3 -m llmrpc.bench.moe_check --out "$R/moe-check-qwen3-30b-a3b.json"
  tail -12 "$L/moe_check.log" | cut -c1-200
  ;;
moe)
  step mistral 60 python3 -m llmrpc.bench.offline --model bench/configs/mistral-7b --systems roofline,stack \
    --commit "$COMMIT" --log-dir "$L" --out "$R/offline-mistral-7b-llmrpc.json"
  step seed_mistral 110 "${SEED[@]}" bench/configs/mistral-7b offline
  grep -hE "^(stack|roofline)[^:]*: |RESULT" "$L/mistral.log" "$L/seed_mistral.log" | cut -c1-200
  python3 -m llmrpc.bench.seed_compare --model mistral-7b --offline "$R/offline-mistral-7b-llmrpc.json" \
    --seed-log "$L/seed_mistral.log" --seed-command "python3 .anchors/run_minisglang.py bench/configs/mistral-7b offline" \
    --out-dir "$R" | grep -v "^wrote"
  M=bench/configs/qwen3-30b-a3b
  step offline_30b 220 python3 -m llmrpc.bench.offline --model $M --systems roofline,stack \
    --commit "$COMMIT" --log-dir "$L" --out "$R/offline-qwen3-30b-a3b.json"
  step latency_30b 150 python3 -m llmrpc.bench.latency --model $M --systems stack \
    --commit "$COMMIT" --log-dir "$L" --out "$R/latency-qwen3-30b-a3b.json"
  python3 -m llmrpc.bench.roofline --model $M > "$R/roofline-qwen3-30b-a3b.txt" 2>&1
  grep -hE "^(stack|roofline)[^:]*: " "$L/offline_30b.log" "$L/latency_30b.log" | cut -c1-200
  tail -8 "$R/roofline-qwen3-30b-a3b.txt"
  ;;
esac
save_fi_cache
(cd "$OUT" && tar czf results.tgz results logs && rm -rf results logs)
