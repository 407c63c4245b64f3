"""Registers, spills and memory access widths of the Triton FP8 kernel, without a GPU.

The kernel in ``weightpipe.stages.fp8._triton`` is compiled ahead of time for sm_90a
(Hopper) with the options its launches use, once per input dtype, scale format and
access path (``aligned``: every row starts on 16 bytes, the vector path; ``unaligned``:
the scalar path in 32-row chunks). The PTX is assembled by the ``ptxas`` bundled with
Triton (``ptxas -v`` reports registers and spill bytes) and read for the widths of its
global loads and stores of the block (the 8-byte loads of the pointer tables are left
out). Target: no spills anywhere, and 16-byte loads on the aligned path.

Usage: ``python -m benchmarks.kernel_report --json out/kernel_report.json``
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from weightpipe.stages.app.report import print_table, write_json

__all__ = ["access_widths", "compile_report", "main", "ptxas_figures"]

_BLOCK = (128, 128)
_DTYPES = ("bfloat16", "float16", "float32")
# A PTX memory type's width in bytes (.b16, .u8, .f32, ...), times the vector length.
_TYPE_BITS = re.compile(r"\.[bsuf](8|16|32|64)\b")


def access_widths(ptx: str, op: str) -> list[int]:
    """The distinct widths in bytes of the ``op`` (``ld.global`` / ``st.global``) in ``ptx``.

    ``ld.global.v4.b32`` is 16 bytes, ``ld.global.b16`` 2; cache and eviction qualifiers
    are ignored.
    """
    widths: set[int] = set()
    for match in re.finditer(rf"\b{re.escape(op)}((?:\.\w+)*)", ptx):
        quals = match.group(1)
        bits = _TYPE_BITS.findall(quals)
        if not bits:
            continue
        vector = re.search(r"\.v(2|4|8)\b", quals)
        widths.add(int(bits[-1]) // 8 * (int(vector.group(1)) if vector else 1))
    return sorted(widths)


def ptxas_figures(text: str) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` output."""
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    if regs is None or stores is None or loads is None:
        raise RuntimeError(f"ptxas -v printed no register/spill figures:\n{text}")
    return {
        "registers": int(regs.group(1)),
        "spill_store_bytes": int(stores.group(1)),
        "spill_load_bytes": int(loads.group(1)),
    }


def _ptxas() -> Path:
    """Triton's bundled ptxas that accepts its PTX version for sm_90a."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # Triton's PTX may be newer than its plain ptxas accepts; the Blackwell one is the
    # newer toolkit and still targets sm_90a.
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).is_file():
            return bin_dir / name
    raise RuntimeError(f"no ptxas in {bin_dir}")


def _ptxas_version(ptxas: Path) -> str:
    out = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"release ([\d.]+), V([\d.]+)", out.stdout)
    return found.group(2) if found else out.stdout.strip().splitlines()[-1]


def compile_report(
    dtype: str, scale_fmt: str, aligned: bool, ptxas: Path, arithmetic: str = "sglang"
) -> dict[str, Any]:
    """One ahead-of-time compile of the kernel and its figures."""
    import triton
    from triton.backends.compiler import GPUTarget

    from weightpipe.stages.fp8 import _triton as kernel_module

    chunk_m = kernel_module.launch_chunk_m(_BLOCK, aligned)
    signature = {f"{k}_table": "*i64" for k in ("src", "dst", "scale", "rows", "cols", "owner")}
    signature |= {"flags": "*i32", "eps": "fp32"}
    constexprs: dict[str, Any] = {
        "SRC_DTYPE": getattr(triton.language, dtype),
        "BLOCK_M": _BLOCK[0],
        "BLOCK_N": _BLOCK[1],
        "UE8M0": scale_fmt == "ue8m0",
        "ALIGNED": aligned,
        "CHUNK_M": chunk_m,
        "VERL": arithmetic == "verl",
    }
    signature |= {k: "constexpr" for k in constexprs}
    source = triton.compiler.ASTSource(
        fn=kernel_module._fp8_block_kernel, signature=signature, constexprs=constexprs
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": kernel_module.NUM_WARPS, "enable_fp_fusion": False},
    )
    ptx: str = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        proc = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx_path), "-o", f"{tmp}/k.cubin"],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-2000:]}")
    figures = ptxas_figures(proc.stdout + proc.stderr)
    # 8-byte loads are the pointer tables (one per program), not the block's data.
    loads = [w for w in access_widths(ptx, "ld.global") if w != 8]
    # 4-byte stores are the scale (one per program); the codes are 1-byte elements.
    stores = [w for w in access_widths(ptx, "st.global") if w != 4] or [4]
    spill = figures["spill_store_bytes"] + figures["spill_load_bytes"]
    return {
        "dtype": dtype,
        "scale_fmt": scale_fmt,
        "arithmetic": arithmetic,
        "path": "aligned" if aligned else "unaligned",
        "num_warps": kernel_module.NUM_WARPS,
        "block": list(_BLOCK),
        "chunk_m": chunk_m,
        **figures,
        "spill_bytes": spill,
        "load_width_bytes": max(loads) if loads else None,
        "load_widths_bytes": loads,
        "store_width_bytes": max(stores),
        "store_widths_bytes": stores,
        "meets_target": spill == 0 and (not aligned or (max(loads) if loads else 0) >= 16),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    import triton

    from weightpipe.stages.fp8.spec import SCALE_FORMATS

    # The compile needs no device; keep a stray TRITON_INTERPRET from replacing the kernel.
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_report: unset TRITON_INTERPRET (it replaces the compiler)")
    ptxas = _ptxas()
    # SGLang's arithmetic in every scale format; verl's (float32 scales only) as well.
    variants = [("sglang", fmt) for fmt in SCALE_FORMATS] + [("verl", "float32")]
    kernels = [
        compile_report(dtype, fmt, aligned, ptxas, arithmetic)
        for dtype in _DTYPES
        for arithmetic, fmt in variants
        for aligned in (True, False)
    ]
    result: dict[str, Any] = {
        "benchmark": "kernel_report",
        "target": "sm_90a",
        "triton": triton.__version__,
        "ptxas": _ptxas_version(ptxas),
        "ptxas_binary": ptxas.name,
        "kernels": kernels,
        "meets_target": all(k["meets_target"] for k in kernels),
    }
    print_table(
        [
            [
                k["dtype"],
                k["arithmetic"],
                k["scale_fmt"],
                k["path"],
                k["registers"],
                k["spill_bytes"],
                k["load_width_bytes"],
                k["store_width_bytes"],
                k["meets_target"],
            ]
            for k in kernels
        ],
        ["dtype", "arithmetic", "scale", "path", "regs", "spill_B", "load_B", "store_B", "ok"],
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
