"""The one door to onnxruntime's on-device training API, without importing torch.

`onnxruntime/training/__init__.py` imports `amp`, `artifacts` and `optim`, which import torch;
the on-device API (`onnxruntime/training/api/*`) needs only the compiled bindings. We register a
bare package object for `onnxruntime.training` (with the real `__path__`) before importing
`onnxruntime.training.api`, so Module/Optimizer/CheckpointState load on a device with no torch.
If an ORT build ever ships a torch-free `training/__init__`, this still works unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_PKG = "onnxruntime.training"


def _training_api():
    if _PKG not in sys.modules:
        import onnxruntime  # noqa: F401  (the inference core and the C bindings)

        spec = importlib.util.find_spec(_PKG)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "this onnxruntime has no training API: install onnxruntime-training (x86_64) or an ORT build with --enable_training_apis"
            )
        shell = types.ModuleType(_PKG)
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__spec__ = spec
        sys.modules[_PKG] = shell
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
