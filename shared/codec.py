"""Tensors <-> safetensors bytes, and checks that what arrived is what was expected.

safetensors (never pickle) because a blob from the wire must not be able to run code. Blobs are
written with the safetensors library and read here: the header is parsed, bounded and checked
against the format's rules, and the arrays are read-only views of the received bytes, so a
hostile header can neither make us allocate nor read past the payload.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from safetensors.numpy import save as _st_save

from .messages import ProtocolError

DEFAULT_MAX_BYTES = 2 * 1024**3
_MAX_HEADER = 16 * 1024 * 1024
# What travels: safetensors' dtype names -> numpy's, little-endian as the format is. bf16 has no
# numpy dtype, so it is not on the wire.
_WIRE_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I64": np.dtype("<i8"),
                "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
                "BOOL": np.dtype("bool")}
DTYPES = frozenset(d.name for d in _WIRE_DTYPES.values())
MAX_DIMS = 32  # of one tensor; ours have at most 4, numpy allows 64

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


def decode_tensors(data: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into (arrays, metadata); ProtocolError on anything malformed. The
    arrays are read-only views of `data` (copied first unless it is immutable bytes, or a view of them)."""
    if len(data) > max_bytes:
        raise ProtocolError(f"tensor blob of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    if not _immutable(data):  # a bytearray, or a view of one, could change under the arrays
        data = bytes(data)
    header = _read_header(data)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ProtocolError("safetensors metadata must map str to str")
    return _views(data, header, 8 + _header_len(data)), dict(meta)


def _views(data: bytes, header: dict, start: int) -> dict[str, np.ndarray]:
    """Read-only arrays over `data` itself, after the checks safetensors makes: known dtype, a
    shape of non-negative ints, offsets that hold exactly its bytes, and tensors that tile the
    byte buffer with no gap or overlap. Not `safetensors.numpy.load`: that copies every tensor
    into a new bytes object while holding the GIL, for every update the cloud receives (a 1,000-
    device round's largest Python-level cost in the check workers, py-spy, session 9)."""
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(f"malformed safetensors: tensor {name!r} is not {{dtype, shape, data_offsets}}")
        dtype = _WIRE_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise ProtocolError(f"malformed safetensors: tensor {name!r} has dtype {entry['dtype']!r}, not one of {sorted(_WIRE_DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        # each dimension at most the payload's size, and few of them: the element count below then
        # stays a small product (a header of huge dimensions made it cost minutes of big-int work)
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d <= len(data) for d in shape)):
            raise ProtocolError(f"malformed safetensors: tensor {name!r} has shape {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ProtocolError(f"malformed safetensors: tensor {name!r} has data_offsets {offsets!r}")
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != offsets[1] - offsets[0]:
            raise ProtocolError(f"malformed safetensors: tensor {name!r} of shape {shape} and dtype {entry['dtype']} "
                                f"does not fill its {offsets[1] - offsets[0]} bytes")
        spans.append((offsets[0], offsets[1], name, dtype, shape, count))
    end = 0
    for begin, stop, name, *_ in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin != end:
            raise ProtocolError(f"malformed safetensors: tensor {name!r} starts at byte {begin}, not {end} (a gap or an overlap)")
        end = stop
    if start + end != len(data):
        raise ProtocolError(f"malformed safetensors: tensors cover {end} bytes of a {len(data) - start}-byte buffer")
    try:
        return {name: np.frombuffer(data, dtype, count, start + begin).reshape(tuple(shape))
                for begin, _, name, dtype, shape, count in spans}  # header order, as safetensors gives them
    except ValueError as exc:  # numpy's own limits; the checks above should leave none
        raise ProtocolError(f"malformed safetensors: {exc}") from None


def _immutable(data: object) -> bool:
    return isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes)
                                       and data.contiguous and data.format == "B")


def _header_len(data: bytes) -> int:
    if len(data) < 8:
        raise ProtocolError(f"malformed safetensors: {len(data)} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ProtocolError(f"malformed safetensors: header length {n} exceeds the payload")
    return n


def _read_header(data: bytes) -> dict:
    n = _header_len(data)
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))  # the format's encoding, not json's guess
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
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
