"""Import verl once, up front, with its own import-time deprecation warnings silenced.

verl 0.9.1 imports Ray's deprecated ``ray.experimental.state`` API (and a few modules
like it) at import time; with warnings as errors the first test to import verl would
fail on a warning that is not ours. Only ``DeprecationWarning``s raised while importing
verl's modules are ignored; once imported, the modules are cached, and every warning
during the tests is an error again. Without verl installed, nothing happens here and
the test modules skip themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

_MODULES = (
    "verl.checkpoint_engine",
    "verl.workers.config",
    "verl.workers.rollout",
    "verl.workers.rollout.sglang_rollout.utils",
    "verl.utils.sglang.sglang_fp8_utils",
    "verl.utils.import_utils",
)

if importlib.util.find_spec("verl") is not None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for _module in _MODULES:
            importlib.import_module(_module)
