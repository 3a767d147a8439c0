# Sourced at the start of every device run: FlashInfer from carried wheels, llmrpc from this tree,
# FlashInfer's JIT cache restored from .fi-cache when a previous run saved it.
# .whl (py3.12, manylinux x86_64, `pip download --no-deps`; the machine lacks all of them, ~16 MB in all):
# flashinfer-python==0.5.3 apache-tvm-ffi==0.1.15.post2 pyzmq xgrammar pydantic pydantic-core annotated-types
# typing-inspection googleapis-common-protos smg-grpc-proto, and grpcio-health-checking, grpcio-reflection and
# grpcio-status at the machine's grpcio (1.84.0: their generated code refuses an older runtime).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
# pip stamps every file it installs with the install time, so FlashInfer's ninja would find its sources
# newer than a restored cache's objects and rebuild every module (~100 s of each "warm" start).
find /tmp/site -exec touch -h -d @946684800 {} +
# llmrpc as `make install` installs it (pyproject.toml: the strict editable install, a link tree under
# build/), offline and on the machine's own torch and setuptools.
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . --config-settings editable_mode=strict \
  || exit 1
if ls .fi-cache/fi-cache.tgz.* >/dev/null 2>&1; then cat .fi-cache/fi-cache.tgz.* | tar xzf - -C "$HOME"; fi
# FlashInfer's JIT cache and Triton's, both restored above next time.
save_fi_cache() { (cd "$HOME" && tar czf - .cache/flashinfer $(ls -d .triton/cache 2>/dev/null)) | split -b 15m - "$OUT/fi-cache.tgz."; }
# step NAME SECONDS CMD...: runs CMD under `timeout`, given SECONDS or what is left of $BUDGET (the
# whole call's seconds), logging to $L/NAME.log; the scripts of each device run set BUDGET and L.
step() {
  local name=$1 want=$2; shift 2
  local left=$((${BUDGET:-520} - SECONDS)); [ "$left" -lt "$want" ] && want=$left
  if [ "$want" -lt 20 ]; then echo "== $name: skipped, no time left"; return; fi
  timeout "$want" "$@" > "$L/$name.log" 2>&1
  echo "== $name: rc=$? at ${SECONDS}s (limit ${want}s)"
}
# A run's layout: start_run sets $L (each step's log) and $OUT/raw (its JSON); pack_logs tars both into
# logs.tgz, since a device call returns at most 8 files. merge OUT IN...: the rows of result files as one list.
start_run() { COMMIT=${COMMIT:-unknown}; L=$OUT/logs; mkdir -p "$L" "$OUT/raw"; }
pack_logs() { (cd "$OUT" && tar czf logs.tgz logs raw && rm -rf logs raw); }
merge() {
  python3 -c "import json,sys; json.dump([r for f in sys.argv[2:] for r in json.load(open(f))], open(sys.argv[1], 'w'), indent=2)" "$@"
}
# mini-sglang (the seed) on the same shapes: $SEED CONFIG_DIR offline,decode,ttft
SEED="env PYTHONPATH=.anchors/mini-sglang/python:$PYTHONPATH python3 .anchors/run_minisglang.py"
# gpu_check_step SECONDS: gpu_check as step gpu_check (JSON in $OUT/raw), then its verdict lines.
gpu_check_step() {
  step gpu_check "$1" python3 -m llmrpc.bench.gpu_check --out "$OUT/raw/gpu_check.json"
  grep -E "^(greedy_qwen3_random|logits_vs_transformers) |ALL PASS|FAILED|Error" "$L/gpu_check.log" | cut -c1-300
}
# lat NAME SECONDS ARGS...: bench/latency.py on $M, 3 repeats, as step NAME; its rows in $OUT/raw/NAME.json.
lat() {
  local name=$1 secs=$2; shift 2
  step "$name" "$secs" python3 -m llmrpc.bench.latency --model "$M" --repeats 3 --commit "$COMMIT" --log-dir "$L" \
    --out "$OUT/raw/$name.json" "$@"
}
# seed_report MODEL FILES...: the latency and seed logs' figure lines; FILES' rows merged, in that order (the
# summary's engine and stack are the first rows of each), into $OUT/raw/latency-MODEL.json; seed_compare's table
# of them beside mini-sglang's from $L/seed.log.
seed_report() {
  local model=$1; shift
  grep -hE "^(engine|stack)[^:]*: |mini-sglang (single|TTFT)|Error" "$L"/latency_*.log "$L/seed.log" | cut -c1-200
  merge "$OUT/raw/latency-$model.json" "$@"
  python3 -m llmrpc.bench.seed_compare --model "$model" --latency "$OUT/raw/latency-$model.json" \
    --seed-log "$L/seed.log" --out-dir "$OUT" | grep -v "^wrote"
}
