"""Which torch device the cloud's model work runs on, and where reduced precision is allowed.

`--device` names are parsed by cloud/config.py (`parse_device`, no torch), which validates the
configs; resolving a name asks torch what this machine has, and refuses a device it lacks in one line
before any work starts. Nothing else in the cloud picks a device: the FM, the proxy,
distillation, alignment, evaluation and export all take the one resolved here.

Autocast policy (docs/architecture.md, "Hardware"):
- "inference" (evaluating the FM or the proxy): bf16 on a CUDA GPU that has it, else fp16 —
  forward passes only, logits and losses are taken in fp32.
- "training" (layer distillation in prepare, neuron-level alignment in serve): bf16 on CUDA
  only; fp16 would need loss scaling, so a GPU without bf16 stays fp32. The optimizer's
  parameters (the master copy) are fp32 throughout.
- "export" and everything on CPU or MPS: fp32. What goes into the ONNX export, the bundle and
  every saved tensor is a CPU fp32 model.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable, Literal

from fedpft.cloud.config import DEVICE_CHOICES, parse_device

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_CHOICES", "DeviceError", "autocast", "autocast_dtype", "exact_fp32", "model_device", "parse_device",
           "resolve_device", "to_device"]

Work = Literal["inference", "training", "export"]


class DeviceError(RuntimeError):
    """A --device that is malformed or that this machine does not have; one line for the user."""


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str, cuda_count: Callable[[], int] = _cuda_count,
                   mps_available: Callable[[], bool] = _mps_available) -> "torch.device":
    """`auto` = the first CUDA GPU, else MPS, else CPU; a named device must exist here.

    The probes are parameters so that the choice can be tested on a machine without GPUs."""
    import torch

    try:
        name = parse_device(name)
    except ValueError as exc:
        raise DeviceError(f"--device: {exc}") from None
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        if cuda_count() > 0:
            return torch.device("cuda", 0)
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise DeviceError("--device mps: Apple MPS is not available to this torch build on this machine")
        return torch.device("mps")
    index = int(name.partition(":")[2] or 0)
    n = cuda_count()
    if n == 0:
        raise DeviceError(f"--device {name}: no CUDA GPU is available to torch {torch.__version__} on this machine")
    if index >= n:
        raise DeviceError(f"--device {name}: this machine has {n} CUDA GPU{'s' if n > 1 else ''} (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", index)


def _bf16_supported(device: "torch.device") -> bool:
    import torch

    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


def autocast_dtype(device: "torch.device", work: Work,
                   bf16_supported: Callable[["torch.device"], bool] = _bf16_supported) -> "torch.dtype | None":
    """The reduced precision `work` may use on `device`, or None for fp32 (the policy above)."""
    import torch

    if work == "export" or device.type != "cuda":
        return None
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if work == "inference" else None


def autocast(device: "torch.device", work: Work):
    """A context that runs `work` under the policy's autocast, or does nothing (fp32)."""
    import torch

    dtype = autocast_dtype(device, work)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def model_device(model: "torch.nn.Module") -> "torch.device":
    """Where a model's parameters are (every model here keeps them on one device)."""
    return next(model.parameters()).device


def to_device(batch: dict, device: "torch.device") -> dict:
    """A batch of tensors on `device`; tensors already there are not copied."""
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def exact_fp32(device: "torch.device"):
    """No TF32 on CUDA while parity is checked: conv and matmul give true fp32, as ONNX Runtime on CPU does."""
    import torch

    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
