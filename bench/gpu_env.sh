# Sourced at the start of every device run: FlashInfer from carried wheels, llmrpc from this tree,
# FlashInfer's JIT cache restored from .fi-cache when a previous run saved it.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
# llmrpc's namespace maps top-level folders (pyproject's package-dir); links give the same layout.
mkdir -p /tmp/pkg/llmrpc
for d in engine kernels services bench; do ln -sfn "$PWD/$d" /tmp/pkg/llmrpc/$d; done
ln -sfn "$PWD/protos/llmrpc/v1" /tmp/pkg/llmrpc/v1
export PYTHONPATH=/tmp/pkg:/tmp/site
if ls .fi-cache/fi-cache.tgz.* >/dev/null 2>&1; then cat .fi-cache/fi-cache.tgz.* | tar xzf - -C "$HOME"; fi
save_fi_cache() { tar czf - -C "$HOME" .cache/flashinfer | split -b 15m - "$OUT/fi-cache.tgz."; ls -la "$OUT"; }
