#!/usr/bin/env bash
# The one device check. Writes $OUT/gpu_check.json (default OUT=./gpu_check_out): the
# device (null without one), each part's status (passed / failed / skipped, with why) and
# the figures of the parts that ran, plus each part's own log and JSON beside it.
#
# Without a CUDA device (CI, a laptop) it says so, runs what needs no device (the FP8
# kernel's ahead-of-time sm_90a report), lists the device parts as skipped and exits 0
# unless a part that ran failed. On a GPU machine it also runs the CUDA tests, the FP8
# kernel against the device's measured copy bandwidth (fraction of that roofline), and
# benchmarks/gpu_parts.py's parts: Fetch H2D from pinned staging against a plain pinned
# copy, Fetch -> Fp8Quantize end to end against the kernel alone, the local engine on
# CUDA generating while it syncs in each mode, and CUDA IPC of a flattened FP8 bucket to a
# second process decoding it with SGLang's own code. Everything lands in one JSON.
#
# Offline: on a bare device image (python3 with torch and Triton, nothing fetchable), run
# benchmarks/gpu_wheels.sh beforehand on a machine with network access and carry the
# gpu_wheels/ folder along; what is missing is installed from it with --no-index.
# Usage: benchmarks/gpu_check.sh            (from anywhere; PY=... to choose the python)
set -uo pipefail
SECONDS=0
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-gpu_check_out}
WHEELS=${WHEELS:-gpu_wheels}
mkdir -p "$OUT"
export OUT

# --- offline install of what the image lacks (never torch: the image's own stays) ------
missing=()
# module:distribution; the second group is what SGLang's decode path imports.
for pair in pytest:pytest pytest_asyncio:pytest-asyncio anyio:anyio numpy:numpy \
  safetensors:safetensors omegaconf:omegaconf prometheus_client:prometheus-client \
  msgspec:msgspec orjson:orjson pybase64:pybase64 zmq:pyzmq pydantic:pydantic \
  starlette:starlette IPython:ipython; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -d "$WHEELS" ]; then
    echo "gpu_check: installing ${missing[*]} from $WHEELS (offline)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}" \
      >"$OUT/pip.log" 2>&1 || echo "gpu_check: offline install failed, see $OUT/pip.log"
  else
    echo "gpu_check: missing ${missing[*]} and no $WHEELS/ (run benchmarks/gpu_wheels.sh)"
  fi
fi
if ! "$PY" -c "import sglang" 2>/dev/null && [ -d "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps sglang \
    >>"$OUT/pip.log" 2>&1 || echo "gpu_check: sglang (--no-deps) not installed, see $OUT/pip.log"
fi
if ! "$PY" -c "import weightpipe.stages.quantize" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$OUT/pip.log" 2>&1
fi

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
STATUS_FILE="$OUT/parts.tsv"
: >"$STATUS_FILE"
part() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$STATUS_FILE"; }

# --- needs no device: the kernel's registers, spills and access widths for sm_90a -------
if "$PY" -c "import triton, triton.backends.nvidia" 2>/dev/null; then
  if env -u TRITON_INTERPRET "$PY" -m benchmarks.kernel_report --json "$OUT/kernel_report.json" \
    >"$OUT/kernel_report.log" 2>&1; then
    part kernel_report passed "kernel_report.json"
  else
    part kernel_report failed "see kernel_report.log"
  fi
else
  part kernel_report skipped "triton (with its NVIDIA backend) is not importable"
fi

GPU_PARTS=(fetch_h2d end_to_end local_engine_cuda cuda_ipc_sglang)  # benchmarks/gpu_parts.py
DEVICE_PARTS=(cuda_tests fp8_vs_copy_bandwidth "${GPU_PARTS[@]}")
if [ -z "$device" ]; then
  echo "gpu_check: no CUDA device present; device parts skipped: ${DEVICE_PARTS[*]}"
  for p in "${DEVICE_PARTS[@]}"; do part "$p" skipped "no CUDA device"; done
  # The device parts' script still runs here, at a tiny size on the CPU (one part; all
  # four are dry-run by tests/test_gpu_parts.py), so a broken script shows before a lease.
  if "$PY" -m benchmarks.gpu_parts fetch_h2d --dry-run --json "$OUT/gpu_parts_dry_run.json" \
    >"$OUT/gpu_parts_dry_run.log" 2>&1; then
    part gpu_parts_dry_run passed "gpu_parts_dry_run.json"
  else
    part gpu_parts_dry_run failed "see gpu_parts_dry_run.log"
  fi
else
  echo "gpu_check: device $device"
  # Every test marked cuda (FP8 kernel and stage, Fetch's CUDA buckets, CUDA IPC into
  # SGLang's decoder, the local engine's sync modes on CUDA).
  if timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/stages/fp8/test_cuda.py \
    tests/stages/test_fetch.py tests/stages/engines/sglang/test_wire.py \
    tests/stages/test_sync_modes.py \
    --junitxml="$OUT/pytest_cuda.xml" >"$OUT/pytest_cuda.log" 2>&1; then
    part cuda_tests passed "pytest_cuda.xml"
  else
    part cuda_tests failed "see pytest_cuda.log"
  fi
  # The FP8 kernel's bytes moved per second against a device-to-device copy's (the
  # roofline this device actually reaches), on one large aligned bucket.
  if "$PY" - >"$OUT/fp8_vs_copy_bandwidth.log" 2>&1 <<'PYEOF'
import json, os, torch
from weightpipe.stages.fp8 import quantize_fp8_batch

def timed(fn, repeats=20):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record(); end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats

ws = [torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
src = torch.empty(sum(w.numel() for w in ws) * 2, dtype=torch.uint8, device="cuda")
dst = torch.empty_like(src)
copy_s = timed(lambda: dst.copy_(src))
copy_gbps = 2 * src.numel() / copy_s / 1e9  # read + write
kernel_s = timed(lambda: quantize_fp8_batch(ws, backend="triton"))
moved = sum(w.numel() * 3 + (w.numel() // (128 * 128)) * 4 for w in ws)  # 2 B in, 1 B out
kernel_gbps = moved / kernel_s / 1e9
result = {"copy_gbps": copy_gbps, "fp8_kernel_gbps": kernel_gbps,
          "fraction_of_copy_roofline": kernel_gbps / copy_gbps}
print(result)
with open(os.path.join(os.environ["OUT"], "fp8_vs_copy_bandwidth.json"), "w") as f:
    json.dump(result, f, indent=2)
PYEOF
  then
    part fp8_vs_copy_bandwidth passed "fp8_vs_copy_bandwidth.json"
  else
    part fp8_vs_copy_bandwidth failed "see fp8_vs_copy_bandwidth.log"
  fi
  for p in "${GPU_PARTS[@]}"; do
    # The whole check fits in 10 minutes: a part that would start past 8 is skipped.
    if [ "$SECONDS" -gt 480 ]; then
      part "$p" skipped "out of the 10-minute budget after ${SECONDS}s"
      continue
    fi
    if timeout 120 "$PY" -m benchmarks.gpu_parts "$p" --json "$OUT/$p.json" \
      >"$OUT/$p.log" 2>&1; then
      part "$p" passed "$p.json"
    else
      part "$p" failed "see $p.log"
    fi
  done
fi

# --- one JSON: device, parts, figures ----------------------------------------------------
DEVICE_NAME="$device" "$PY" - <<'PYEOF'
import json, os
out = os.environ["OUT"]
parts = {}
with open(os.path.join(out, "parts.tsv")) as f:
    for line in f:
        name, status, note = line.rstrip("\n").split("\t")
        parts[name] = {"status": status, "note": note}
        figures = os.path.join(out, f"{name}.json")
        if status == "passed" and os.path.exists(figures):
            with open(figures) as g:
                parts[name]["figures"] = json.load(g)
device = os.environ["DEVICE_NAME"] or None
try:
    import torch
    torch_version = torch.__version__
except ImportError:
    torch_version = None
result = {
    "device": device,
    "torch": torch_version,
    "parts": parts,
    "skipped": sorted(n for n, p in parts.items() if p["status"] == "skipped"),
    "failed": sorted(n for n, p in parts.items() if p["status"] == "failed"),
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=2)
print(f"gpu_check: wrote {os.path.join(out, 'gpu_check.json')}; failed: {result['failed'] or 'none'}")
raise SystemExit(1 if result["failed"] else 0)
PYEOF
