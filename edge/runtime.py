"""The one door to onnxruntime's on-device training API, without importing torch.

`onnxruntime/training/__init__.py` imports `amp`, `artifacts` and `optim`, which import torch;
the on-device API (`onnxruntime/training/api/*`) needs only the compiled bindings. We register a
bare package object for `onnxruntime.training` (with the real `__path__`) before importing
`onnxruntime.training.api`, so Module/Optimizer/CheckpointState load on a device with no torch.
If an ORT build ever ships a torch-free `training/__init__`, this still works unchanged.
`import onnxruntime` itself probes `onnxruntime.training.ortmodule` (which imports torch when
torch is installed, as on a cloud machine running tests); when we are the first to import
onnxruntime we block that probe, so the edge never pulls torch in, installed or not.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_PKG = "onnxruntime.training"


_ORTMODULE = "onnxruntime.training.ortmodule"


def _training_api():
    if _PKG not in sys.modules:
        if "onnxruntime" in sys.modules:
            spec = importlib.util.find_spec(_PKG)
        else:
            # Not imported yet: find the training folder without running onnxruntime/__init__,
            # because that __init__ (capi/onnxruntime_validation.py) probes
            # `onnxruntime.training.ortmodule`, which imports torch whenever torch is installed.
            root = importlib.util.find_spec("onnxruntime")
            folder = Path(root.submodule_search_locations[0]) / "training" if root and root.submodule_search_locations else None
            init = folder / "__init__.py" if folder is not None else None
            spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[str(folder)]) if init and init.is_file() else None
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "this onnxruntime has no training API: install onnxruntime-training (x86_64) or an ORT build with --enable_training_apis"
            )
        shell = types.ModuleType(_PKG)
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__spec__ = spec
        sys.modules[_PKG] = shell
        if "onnxruntime" not in sys.modules:
            # None in sys.modules makes the validation probe's import raise ImportError, which it
            # reads as "no ORTModule" (true on a device); removed again right after.
            blocked = _ORTMODULE not in sys.modules
            if blocked:
                sys.modules[_ORTMODULE] = None
            try:
                import onnxruntime  # noqa: F401  (the inference core and the C bindings)
            finally:
                if blocked and sys.modules.get(_ORTMODULE, 0) is None:
                    del sys.modules[_ORTMODULE]
    from onnxruntime.training import api

    return api


def quiet() -> None:
    """ORT's default logger prints every graph transform at INFO; devices want warnings only."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


api = _training_api()
quiet()
CheckpointState = api.CheckpointState
Module = api.Module
Optimizer = api.Optimizer
