#!/usr/bin/env bash
# One device check for FP8 quantization: the CUDA tests, then the quantize benchmark on
# the GPU (and, for the record, on this machine's CPU). Results go under $OUT (default
# ./out/gpu_check): pytest's JUnit XML and log, and benchmark JSON.
# Usage: benchmarks/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
# A bare device machine has torch (CUDA) but not this package: install it in place,
# offline (no dependencies are fetched).
if ! "$PY" -c "import weightpipe.stages.quantize" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
PYEOF
status=0
"$PY" -m pytest -m cuda tests/stages/test_fp8_cuda.py -q -p no:cacheprovider \
  --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
"$PY" -m benchmarks.quantize --device cuda --repeats 20 --json "$OUT/quantize_cuda.json" \
  2>&1 | tee "$OUT/quantize_cuda.log" || status=1
"$PY" -m benchmarks.quantize --device cpu --repeats 3 --no-sglang --json "$OUT/quantize_cpu.json" \
  2>&1 | tee "$OUT/quantize_cpu.log" || status=1
exit $status
