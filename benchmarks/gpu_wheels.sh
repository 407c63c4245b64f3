#!/usr/bin/env bash
# Download the wheels a bare GPU image lacks into gpu_wheels/ (ignored by git), so that
# benchmarks/gpu_check.sh can install them there with --no-index. Run it on a machine with
# network access and carry gpu_wheels/ along with the device call. Never torch (nor
# anything that pulls it): the image's CUDA build of torch must stay. sglang comes with
# --no-deps: only its own Python code (the IPC decode path) is needed.
# Usage: benchmarks/gpu_wheels.sh    (PY=... for the pip to use; PYVER=3.11 the image's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WHEELS=${WHEELS:-gpu_wheels}
PYVER=${PYVER:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
mkdir -p "$WHEELS"
common=(--dest "$WHEELS" --only-binary=:all: --python-version "$PYVER"
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any)
# What the tests and the package import beyond torch/Triton, with their own dependencies.
"$PY" -m pip download "${common[@]}" \
  pytest pytest-asyncio anyio numpy safetensors omegaconf prometheus-client
# SGLang's own code only (its dependencies would pull another torch), plus what its
# decode path (sglang.srt.utils, patch_torch, tensor_bucket) imports that the H100/H200
# image lacks, with their own dependencies (none of them needs torch).
"$PY" -m pip download "${common[@]}" --no-deps sglang
"$PY" -m pip download "${common[@]}" msgspec orjson pybase64 pyzmq pydantic starlette ipython
ls "$WHEELS" | wc -l | xargs echo "gpu_wheels: wheels in $WHEELS:"
