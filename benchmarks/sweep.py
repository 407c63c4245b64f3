"""``python -m benchmarks.sweep``: the depth x bucket sweep that ``weightpipe bench`` runs.

The sweep's logic lives in the library (``weightpipe.stages.app.bench``), since the
``weightpipe bench`` command runs it and the library never imports ``benchmarks``; this
script is the benchmark-suite entry point to the same code.
"""

from __future__ import annotations

from weightpipe.stages.app.bench import PRESETS, main, memory_bound, model_shapes, run_sweep

__all__ = ["PRESETS", "main", "memory_bound", "model_shapes", "run_sweep"]

if __name__ == "__main__":
    raise SystemExit(main())
