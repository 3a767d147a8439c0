#!/usr/bin/env bash
# Proves the gpu-worker image (docker/Dockerfile) works on a fresh GPU host, without Docker: its
# exact Python packages (docker/requirements-gpu.txt) in a clean virtual environment, its
# environment (its CUDA's nvcc on PATH, as in the devel base; an empty FlashInfer JIT cache and
# home, as on a new volume), and its own command, `llmrpc worker --device cuda` (FlashInfer
# forced), serving one generation (prefill, then decode steps) through `llmrpc scheduler`.
#
#   bash bench/image_check.sh fetch   here, with network: the wheels to carry, into .whl-image/
#   bash bench/image_check.sh         on the GPU machine (no network), with .whl-image carried
#
# A device call carries at most 64 MiB and that machine reaches no registry, so the torch/CUDA
# stack (about 4 GB of wheels) and numpy are not carried: they are linked from the machine's own
# Python into the environment, and each must be the version pinned (a drift is reported and fails
# the check). Everything else comes from the carried wheels, at exactly the pinned versions.
# Exit: 0 the image works and matches; 1 it does not work; 2 it works, with linked versions drifting.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=docker/requirements-gpu.txt
WHEELS=.whl-image
# Linked from the GPU machine, not carried: what torch is built against, and numpy.
LINKED='^(torch|triton|numpy|sympy|mpmath|networkx|cuda-[a-z-]+|nvidia-(cublas|cuda-[a-z]+|cudnn-cu13|cufft|cufile|curand|cusolver|cusparse|cusparselt-cu13|nccl-cu13|nvjitlink|nvshmem-cu13|nvtx))=='

if [[ "${1:-}" == fetch ]]; then
  platforms=()
  for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  mkdir -p "$WHEELS"
  grep -E '^[a-z0-9]' "$LOCK" | grep -Ev "$LINKED" >"$WHEELS/carried.txt"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" -r "$WHEELS/carried.txt"
  du -sh "$WHEELS"
  exit 0
fi

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # this machine's rule
work=$(mktemp -d /tmp/image-check.XXXX)
venv=$work/venv
out=${OUT:-$work}
python3 -m venv --without-pip "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# 1. The pinned packages: carried wheels installed, the linked ones symlinked from this machine.
wheels=()
for pin in $(grep -E '^[a-z0-9]' "$LOCK" | grep -Ev "$LINKED"); do
  name=${pin%%==*} version=${pin##*==}
  wheel=$(ls "$WHEELS/$(tr - _ <<<"$name")-$version-"*.whl 2>/dev/null) \
    || { echo "missing wheel: $pin (run: bash bench/image_check.sh fetch)"; exit 1; }
  wheels+=("$wheel")
done
# --ignore-installed: a pin this interpreter already has would otherwise be skipped, not put in the venv
python3 -m pip install -q --no-index --no-deps --no-compile --ignore-installed --prefix "$venv" "${wheels[@]}"
grep -E "$LINKED" "$LOCK" >"$work/linked.txt"
python3 - "$work/linked.txt" "$site" "$out/linked-versions.json" <<'EOF'
"""Links each pinned distribution from this interpreter's site-packages; records its version here."""
import json
import sys
from importlib import metadata
from pathlib import Path

pins, site, report = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
versions = {}
for line in Path(pins).read_text().split():
    name, pinned = line.split("==")
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        versions[name] = {"pinned": pinned, "machine": None, "same": False}
        continue
    here = dist.version.split("+")[0]  # a local build tag (+cu130) names the same release
    versions[name] = {"pinned": pinned, "machine": dist.version, "same": here == pinned}
    for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        source = Path(dist.locate_file(top))
        if source.exists() and not (site / top).exists():
            (site / top).symlink_to(source)
Path(report).write_text(json.dumps(versions, indent=1))
drift = {n: v for n, v in versions.items() if not v["same"]}
print(f"linked {len(versions)} packages from {sys.prefix}; drift from the pins: {drift or 'none'}")
EOF
# llmrpc itself, built by the environment's own setuptools (pinned with the rest)
PYTHONPATH="$site" python3 -m pip install -q --no-index --no-deps --no-build-isolation --ignore-installed --prefix "$venv" .

# 2. The image's environment: its CUDA's nvcc (the devel base) on PATH, fresh home and JIT cache.
cuda=$(grep -oP '^ARG CUDA_IMAGE=nvidia/cuda:\K[0-9]+\.[0-9]+' docker/Dockerfile)
nvcc_dir=$(dirname "$(command -v nvcc)")
"$nvcc_dir/nvcc" --version | grep -q "release $cuda," || { echo "nvcc here is not CUDA $cuda"; exit 1; }
mkdir -p "$work/home" "$work/flashinfer-cache" "$work/models"
image_env=(PATH="$venv/bin:$nvcc_dir:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  HOME="$work/home" VIRTUAL_ENV="$venv" PYTHONUNBUFFERED=1 LLMRPC_CACHE_DIR="$work/models"
  FLASHINFER_WORKSPACE_BASE="$work/flashinfer-cache"
  LD_LIBRARY_PATH="/usr/local/nvidia/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1)

# 3. One generation through the image's worker command: the first prefill and decode steps build
# FlashInfer's kernels with that nvcc into the empty cache.
status=0
env -i "${image_env[@]}" "$venv/bin/python" - "$out" <<'EOF' || status=1
import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import flashinfer
import grpc
import torch
import xgrammar  # constrained decoding's grammars and token masks (engine/constraint.py)

from llmrpc.bench.offline import Stack, add_engine_args
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc

out = Path(sys.argv[1])
parser = argparse.ArgumentParser()
add_engine_args(parser)  # the benches' flags: llmrpc's own engine and scheduler flags
args = parser.parse_args(["--model", "bench/configs/qwen3-0.6b", "--device", "cuda", "--attention-backend", "flashinfer",
                          "--cuda-graph-max-bs", "8", "--max-running-requests", "8", "--log-dir", str(out)])


async def generate(target: str) -> list[int]:
    """64 prompt tokens, then 16 greedy ones (prefill, then decode steps)."""
    request = pb.GenerateRequest(tokens=pb.TokenIds(ids=list(range(100, 164))), stream=True,
                                 sampling=pb.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return [t async for r in stub.Generate(request, timeout=180) for t in r.token_ids]


started = time.time()
stack = Stack(args)  # `llmrpc worker --device cuda` (dummy Qwen3-0.6B weights) and `llmrpc scheduler`, serving
try:
    ready = time.time()
    tokens = asyncio.run(generate(stack.target))
finally:
    stack.close()
built = sorted(p.name for p in Path(os.environ["FLASHINFER_WORKSPACE_BASE"]).rglob("*.so"))
result = {"tokens": tokens, "worker_ready_s": round(ready - started, 1), "generate_s": round(time.time() - ready, 1),
          "jit_built": built, "torch": torch.__version__, "flashinfer": flashinfer.__version__,
          "gpu": torch.cuda.get_device_name(0)}
(out / "image_check.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
assert len(tokens) == 16, "the generation did not produce 16 tokens"
assert built, "FlashInfer built no kernel into the empty JIT cache"
EOF
if [[ $status != 0 ]]; then tail -40 "$out/worker-rank-0.log" || true; echo "FAIL: the image's worker did not serve"; exit 1; fi
if grep -q '"same": false' "$out/linked-versions.json"; then echo "PASS with drift (linked-versions.json)"; exit 2; fi
echo "PASS: the gpu-worker image's packages and environment serve a generation on this GPU"
