#!/usr/bin/env bash
# Writes docker/requirements-gpu.txt: every Python package of the gpu-worker image, pinned, as pip
# resolves llmrpc (this tree) with torch and FlashInfer for the image's Python (3.12, x86_64 Linux).
# Run it from the repository root, with network, after a change to pyproject's dependencies.
set -euo pipefail
TORCH=2.11.0        # CUDA 13.0 on PyPI; the image's nvcc (docker/Dockerfile's CUDA_IMAGE) matches it
FLASHINFER=0.5.3    # the version the GPU results in bench/results were measured with
NUMPY=2.5.2         # the GPU machine's copy, so bench/image_check.sh can link it (carry limit)
platforms=()
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
report=$(mktemp)
pip install -q --dry-run --ignore-installed --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --target "$(mktemp -d)" \
  --report "$report" "llmrpc @ file://$PWD" "torch==$TORCH" "flashinfer-python==$FLASHINFER" "numpy==$NUMPY"
python3 - "$report" >docker/requirements-gpu.txt <<'EOF'
import json
import sys

# flashinfer-python requires these, but only its CuTe-DSL and cuDNN kernels import them; llmrpc
# runs neither (its FA2 attention, norm, RoPE and sampling kernels are JIT-built by nvcc), and
# they weigh 200 MB. The image installs this file with --no-deps, so they stay out.
LEFT_OUT = ("nvidia-cutlass-dsl", "nvidia-cudnn-frontend")
print("# The gpu-worker image's Python packages, pinned (written by docker/lock-gpu.sh; do not edit).")
print("# Installed with `pip install --no-deps -r`, then llmrpc itself with --no-deps.")
print("# Left out: " + ", ".join(f"{name}*" for name in LEFT_OUT) + " (flashinfer extras llmrpc never imports).")
rows = sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"])
              for i in json.load(open(sys.argv[1]))["install"])
for name, version in rows:
    if name != "llmrpc" and not name.startswith(LEFT_OUT):
        print(f"{name}=={version}")
EOF
echo "wrote docker/requirements-gpu.txt ($(grep -c '==' docker/requirements-gpu.txt) packages)"
