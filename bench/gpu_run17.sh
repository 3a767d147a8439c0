# Device run 17 (issue 13): what multi-step decode costs a request that arrives while blocks are in flight.
# One stack (Qwen3-0.6B, dummy weights, overlap depth 2) under Poisson load through bench/load.py, its
# scheduler restarted at --decode-steps 1 and 4 against the same worker: TTFT and TPOT percentiles and
# throughput at 16 and 48 requests/s (256 requests a level, 256-1024 prompt and 64-512 output tokens).
# Carry .whl, .fi-cache and .anchors.
source bench/gpu_env.sh >/dev/null 2>&1
M=bench/configs/qwen3-0.6b
mkdir -p "$OUT/logs"
timeout 420 python3 - "$M" "$OUT" <<'PY' > "$OUT/logs/load.log" 2>&1
import argparse, json, subprocess, sys
from llmrpc.bench.offline import Stack, add_engine_args
model, out = sys.argv[1], sys.argv[2]
ap = argparse.ArgumentParser()
add_engine_args(ap)
args = ap.parse_args(["--model", model, "--log-dir", f"{out}/logs"])
stack = Stack(args, 2, 1)
try:
    for k in (1, 4):
        stack.use((2, k))
        subprocess.run([sys.executable, "-m", "llmrpc.bench.load", "--target", stack.target, "--rate", "16,48",
                        "--num-requests", "256", "--input-len", "256:1024", "--output-len", "64:512",
                        "--warmup", "16", "--seed", "3", "--out", f"{out}/load-decode-steps-{k}"], check=True)
finally:
    stack.close()
for k in (1, 4):
    for level in json.load(open(f"{out}/load-decode-steps-{k}.json"))["levels"]:
        print(f"k={k} rate={level.get('request_rate')}: TTFT p50 {level['median_ttft_ms']:.1f} p99 {level['p99_ttft_ms']:.1f} ms, "
              f"TPOT p50 {level['median_tpot_ms']:.2f} p99 {level['p99_tpot_ms']:.2f} ms, out {level['output_throughput']:.0f} tok/s")
PY
echo "rc=$?"
tail -6 "$OUT/logs/load.log"
(cd "$OUT" && tar czf logs.tgz logs && rm -rf logs)
