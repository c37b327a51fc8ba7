"""Storage precision of a bundle's frozen weights (pure numpy: the cloud writes, devices read).

Devices download every frozen weight of the proxy, and most of a text bundle is its embedding
table (MiniLM: 30522 x 384 in fp32 is 47 MB of a 78 MB bundle). A bundle prepared with
`--frozen-dtype float16` stores its frozen weight matrices as float16: half the download and
the disk. Devices upcast them on load and compute in float32 exactly as before. The cloud first
rounds its own proxy to the same values (`fedpft.export.bundle.round_frozen_`), so the cloud's
proxy (alignment, evaluation) and the devices' graphs hold identical weights; only storage differs.

What stays float32: adapters (trained; their master copy is fp32 everywhere), biases and
LayerNorm vectors (a few KB each, and the most sensitive to rounding), and any matrix float16
cannot hold exactly - the writer stores a tensor in float16 only if that loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, get_args

import numpy as np

FrozenDtype = Literal["float32", "float16"]
FROZEN_DTYPES: tuple[str, ...] = get_args(FrozenDtype)


def half_exact(a: np.ndarray) -> bool:
    """A float32 matrix every value of which float16 holds exactly (one the cloud rounded)."""
    if a.dtype != np.float32 or a.ndim < 2:
        return False
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def for_storage(params: Mapping[str, np.ndarray], frozen: Iterable[str], dtype: FrozenDtype) -> dict[str, np.ndarray]:
    """The arrays a parameter file holds: with float16, each frozen matrix float16 holds exactly
    is stored as float16; everything else as it is."""
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen dtype must be one of {FROZEN_DTYPES}, not {dtype!r}")
    half = {n for n in frozen if dtype == "float16" and half_exact(params[n])}
    return {n: (a.astype(np.float16) if n in half else a) for n, a in params.items()}


def for_compute(a: np.ndarray) -> np.ndarray:
    """What the graphs take: float16 storage upcast to float32 (exact), float32 and integer tensors
    as stored. ValueError for any other float type (a bundle from a newer fedpft, or tampered
    with), which would otherwise fail deep inside onnxruntime."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if a.dtype.kind in "fc" and a.dtype != np.float32:
        raise ValueError(f"stored as {a.dtype}; this fedpft reads float32 and float16 parameters")
    return a

