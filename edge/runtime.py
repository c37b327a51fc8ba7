"""The one door to onnxruntime on a device: plain inference build, any platform, no torch.

Devices train on plain `onnxruntime` (x86_64, aarch64, Jetson's CUDA build, macOS, current
Pythons): the cloud lowers the training graph to standard ops (`fedpft.export.lowering`), so a
forward+backward is one `InferenceSession` run and the optimizer step is numpy (`edge/optim.py`).

On a cloud machine the `onnxruntime` module may come from onnxruntime-training instead (both
distributions own it); its `__init__` probes `onnxruntime.training.ortmodule`, which imports torch
whenever torch is installed. When we are the first to import onnxruntime we block that probe, so
the edge path never pulls torch in, installed or not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

_ORTMODULE = "onnxruntime.training.ortmodule"

# Short names users type (`--providers cuda,cpu`) -> onnxruntime execution provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}
DEFAULT_PROVIDERS = ("cpu",)


class ProviderError(ValueError):
    """An execution provider that is unknown or not in the installed onnxruntime."""


def _import():
    if "onnxruntime" not in sys.modules:
        # None in sys.modules makes the validation probe's import raise ImportError, which it
        # reads as "no ORTModule" (true on a device); removed again right after.
        blocked = _ORTMODULE not in sys.modules
        if blocked:
            sys.modules[_ORTMODULE] = None
        try:
            import onnxruntime  # noqa: F401
        finally:
            if blocked and sys.modules.get(_ORTMODULE, 0) is None:
                del sys.modules[_ORTMODULE]
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT logs every graph transform at INFO
    return onnxruntime


ort = _import()


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """User names (short aliases or full EP names) -> EP names this onnxruntime has, in order.
    CPU is appended as the fallback for nodes another provider does not take."""
    names = list(names or DEFAULT_PROVIDERS)
    available = ort.get_available_providers()
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        ep = PROVIDER_ALIASES.get(name.lower(), name)
        if ep not in PROVIDER_ALIASES.values() and ep not in available:
            raise ProviderError(f"unknown execution provider '{raw}' (known: {', '.join(PROVIDER_ALIASES)})")
        if ep not in available:
            raise ProviderError(
                f"execution provider '{raw}' ({ep}) is not in this onnxruntime {ort.__version__} "
                f"(available: {', '.join(available)}); install a build that has it, e.g. onnxruntime-gpu for CUDA"
            )
        if ep not in out:
            out.append(ep)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def session(path: str, providers: list[str], threads: int | None = None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # The memory pattern pre-plans one block per input shape on top of the arena's chunks: with
    # a training graph's activations that doubled the peak (ViT-base proxy, batch 4: 1,265 MB vs
    # 786 MB without) and was slower, and batch shapes vary between train and held-out batches.
    opts.enable_mem_pattern = False
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=providers)


def device_of(providers: list[str]) -> tuple[str, int]:
    """Where parameters live as OrtValues: the first provider's device (CUDA) or the host."""
    return ("cuda", 0) if providers and providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else ("cpu", 0)


def version() -> str:
    return ort.__version__
