"""Tensors <-> safetensors bytes, and checks that what arrived is what was expected.

safetensors (never pickle) because a blob from the wire must not be able to run code; the
header is parsed and bounded here before safetensors sees the bytes, so a hostile header
cannot make us allocate or read past the payload.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from .messages import ProtocolError

DEFAULT_MAX_BYTES = 2 * 1024**3
_MAX_HEADER = 16 * 1024 * 1024
# dtypes numpy can hold that safetensors knows; bf16 has no numpy dtype, so it is not on the wire.
DTYPES = frozenset({"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"})

# name -> (shape, dtype name)
TensorSpecs = Mapping[str, tuple[Sequence[int], str]]


def encode_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named arrays to safetensors bytes; metadata is a flat str -> str map."""
    arrays: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"tensor name must be a non-empty string, got {name!r}")
        if not isinstance(arr, np.ndarray):
            raise ProtocolError(f"tensor {name!r} is a {type(arr).__name__}, not a numpy array")
        if arr.dtype.name not in DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {arr.dtype.name}, not one of {sorted(DTYPES)}")
        arrays[name] = np.ascontiguousarray(arr)
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ProtocolError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
    return _st_save(arrays, metadata=meta or None)


def decode_tensors(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into (arrays, metadata); ProtocolError on anything malformed."""
    if len(data) > max_bytes:
        raise ProtocolError(f"tensor blob of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    header = _read_header(data)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ProtocolError("safetensors metadata must map str to str")
    try:
        tensors = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise ProtocolError(f"malformed safetensors: {exc}") from None
    return tensors, dict(meta)


def _read_header(data: bytes) -> dict:
    if len(data) < 8:
        raise ProtocolError(f"malformed safetensors: {len(data)} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ProtocolError(f"malformed safetensors: header length {n} exceeds the payload")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed safetensors header: not a JSON object")
    return header


def spec_of(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The spec a set of arrays satisfies, e.g. to check a reply against what was sent."""
    return {k: (tuple(v.shape), v.dtype.name) for k, v in tensors.items()}


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    expected: TensorSpecs,
    *,
    allow_missing: bool = False,
    allow_extra: bool = False,
) -> None:
    """Names, shapes and dtypes must match `expected`, and every value must be finite."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing and not allow_missing:
        raise ProtocolError(f"missing tensors: {_few(missing)}")
    if extra and not allow_extra:
        raise ProtocolError(f"unexpected tensors: {_few(extra)}")
    for name in sorted(set(expected) & set(tensors)):
        shape, dtype = expected[name]
        arr = tensors[name]
        if tuple(arr.shape) != tuple(shape):
            raise ProtocolError(f"tensor {name!r}: shape {tuple(arr.shape)} != expected {tuple(shape)}")
        if arr.dtype.name != dtype:
            raise ProtocolError(f"tensor {name!r}: dtype {arr.dtype.name} != expected {dtype}")
    check_finite(tensors)


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    # One poisoned client update would turn the FedAvg mean into NaN for everyone.
    for name, arr in tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProtocolError(f"tensor {name!r} holds NaN or Inf")


def _few(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
