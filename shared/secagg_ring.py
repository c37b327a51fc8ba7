"""Secure aggregation arithmetic: fixed-point values in the ring Z_{2^64} and the masks over it.

Ring and scale. Every value a device contributes (its weighted, clipped adapter change, its
FedAvg weight, its neuron counts) is encoded as round(x * 2^FRAC_BITS) in Z_{2^64}, i.e. a uint64
with numpy's wraparound doing the reduction for free. FRAC_BITS = 24 gives a resolution of
6e-8 per device, far below what LoRA deltas need. The masked sum decodes correctly iff the true
sum of the encoded values lies in [-2^63, 2^63), so the round must satisfy

    n_devices * value_bound * 2^FRAC_BITS < 2^63

where value_bound bounds |x| of every coordinate of one device (weight cap * clip C plus a noise
margin for the adapters; the cap on positions for counts). `check_capacity` enforces it; with
2^24 scale that leaves 2^39 for n * value_bound, e.g. 2,000 devices x 2.7e8.

Masks are pseudo-random ring vectors expanded from 32-byte seeds with ChaCha20 (deterministic:
the same seed gives the same mask on the device and in the cloud). Everything here is pure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

RING_BITS = 64
FRAC_BITS = 24
# Names inside the secure vector and the masked blob, shared by both sides.
WEIGHT_KEY = "__secagg__.weight"
MASKED_TENSOR = "secagg.masked"
_SIGNED_LIMIT = 2 ** (RING_BITS - 1)

Layout = Mapping[str, tuple[int, ...]]


def check_capacity(n_devices: int, value_bound: float, frac_bits: int = FRAC_BITS) -> None:
    """ValueError unless n devices each bounded by value_bound cannot overflow the signed ring."""
    need = n_devices * float(value_bound) * 2.0**frac_bits
    if not need < _SIGNED_LIMIT:
        raise ValueError(
            f"secure sum could overflow Z_2^{RING_BITS}: {n_devices} devices x bound {value_bound:g} x 2^{frac_bits} "
            f"= {need:.3g} >= 2^{RING_BITS - 1}; lower the clip, the weight cap or the devices per round"
        )


def layout_of(values: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in values[k].shape) for k in sorted(values)}


def layout_digest(layout: Layout) -> str:
    """sha256 of the names and shapes in sorted order: both sides agree on what the vector means."""
    text = json.dumps([[k, list(layout[k])] for k in sorted(layout)], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def layout_size(layout: Layout) -> int:
    return int(sum(int(np.prod(s, dtype=np.int64)) for s in layout.values()))


def encode_fixed(values: Mapping[str, np.ndarray], layout: Layout, value_bound: float,
                 frac_bits: int = FRAC_BITS) -> tuple[np.ndarray, int]:
    """Flatten `values` (in the layout's sorted order) to ring elements; (uint64 vector, number
    of coordinates clamped to +-value_bound). Clamping keeps the overflow bound a guarantee: only
    a Gaussian noise tail or a buggy device can exceed it."""
    if set(values) != set(layout):
        raise ValueError(f"values and layout disagree on names: {sorted(set(values) ^ set(layout))[:3]}")
    parts = []
    for k in sorted(layout):
        arr = np.asarray(values[k], dtype=np.float64)
        if arr.shape != tuple(layout[k]):
            raise ValueError(f"{k}: shape {arr.shape} != layout {tuple(layout[k])}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{k}: NaN or Inf cannot be encoded")
        parts.append(arr.reshape(-1))
    flat = np.concatenate(parts) if parts else np.zeros(0)
    clamped = int(np.count_nonzero(np.abs(flat) > value_bound))
    flat = np.clip(flat, -value_bound, value_bound)
    return np.rint(flat * 2.0**frac_bits).astype(np.int64).view(np.uint64), clamped


def decode_fixed(ring: np.ndarray, layout: Layout, frac_bits: int = FRAC_BITS) -> dict[str, np.ndarray]:
    """Ring vector -> named float64 arrays (two's complement: the upper half is negative)."""
    signed = np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits
    out, at = {}, 0
    for k in sorted(layout):
        size = int(np.prod(layout[k], dtype=np.int64))
        out[k] = signed[at : at + size].reshape(layout[k])
        at += size
    if at != signed.size:
        raise ValueError(f"ring vector of {signed.size} elements does not fit a layout of {at}")
    return out


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform ring elements from a 32-byte seed (ChaCha20 keystream, zero nonce: each
    seed is derived for one (run, round, task, pair) and expanded once per use, identically)."""
    if len(seed) != 32:
        raise ValueError(f"a mask seed is 32 bytes, got {len(seed)}")
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * length)), dtype=np.uint64).copy()


def pair_sign(me: str, peer: str) -> int:
    """+1 when `me` adds the pair's mask, -1 when it subtracts it: the two cancel in the sum."""
    if me == peer:
        raise ValueError("a device has no pairwise mask with itself")
    return 1 if me < peer else -1


def mask(vector: np.ndarray, self_seed: bytes, pair_seeds: Mapping[str, bytes], me: str) -> np.ndarray:
    """y = x + PRG(b) + sum_{v} sign(me, v) * PRG(s_{me,v})  in Z_2^64."""
    out = vector.astype(np.uint64, copy=True)
    out += prg(self_seed, out.size)
    for peer in sorted(pair_seeds):
        m = prg(pair_seeds[peer], out.size)
        if pair_sign(me, peer) > 0:
            out += m
        else:
            out -= m
    return out


def ring_sum(vectors: Sequence[np.ndarray], length: int) -> np.ndarray:
    acc = np.zeros(length, dtype=np.uint64)
    for v in vectors:
        acc += v
    return acc


def unmask_sum(masked_sum: np.ndarray, self_seeds: Sequence[bytes],
               orphan_pairs: Sequence[tuple[str, str, bytes]]) -> np.ndarray:
    """Remove the survivors' self-masks and the masks survivors share with dropped devices.

    orphan_pairs: (survivor, dropped, pair seed); the survivor's y_v carried
    sign(survivor, dropped) * PRG(seed), which nothing else cancels.
    """
    out = masked_sum.astype(np.uint64, copy=True)
    for seed in self_seeds:
        out -= prg(seed, out.size)
    for survivor, dropped, seed in orphan_pairs:
        m = prg(seed, out.size)
        if pair_sign(survivor, dropped) > 0:
            out -= m
        else:
            out += m
    return out
