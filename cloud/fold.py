"""Streaming aggregation (issue 13): each accepted update is folded into a float64 running sum as
it is accepted, so the cloud's memory does not grow with the number of devices.

What is folded per device: its change against the round's global adapters, times its *limit*
(the FedAvg weight it may claim on its own: its samples, at most its Hello's count and
--max-client-samples), and its activation statistics into running counts. Two bounds depend on the
whole round and so cannot be applied at accept time: the norm bound (a multiple of the round's
median change norm) and the weight cap (a multiple of the round's median weight). Both need only
one scalar per device, known at accept time and kept here (`Contribution`). At the round's end
(`finish`), the few devices whose coefficient the bounds changed are corrected with a second pass
over their stored update files: sum += (capped weight x clip scale - limit) x change. Accepted
updates stay on disk (RUN/updates/), never in memory.

The running sum is persisted (`RunStore.save_fold`: a sha256 side file written first, then the
bytes, atomically) at most every PERSIST_SECONDS; `--resume` restores it and folds the round's
other stored updates one by one. A sum that does not match its hash, or names a device whose
update is gone, is refolded from the stored updates. Float64 addition is exact to ~1e-16 in any
order, so the result equals an uninterrupted run's after the cast back to the adapters' dtype.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from fedpft.shared.codec import decode_tensors, encode_tensors

from .aggregate import Tensors, cap_weights, norm_bound

FOLD_VERSION = "1"
PERSIST_SECONDS = 2.0  # how much folding a crash may cost to redo from the stored updates


@dataclass
class Contribution:
    """One accepted update, in the scalars the round's bounds and record need."""

    device: str
    num_samples: int
    mean_loss: float | None
    norm: float  # L2 norm of its change against the round's global adapters
    declared: int | None = None  # num_samples of the device's Hello
    update_id: str | None = None

    def limit(self, max_client_samples: int | None) -> int:
        claimed = max(self.num_samples, 1)
        return min(claimed, self.declared or claimed, max_client_samples or claimed)


@dataclass
class Bounds:
    """What the round's bounds decided, per device (in fold order)."""

    names: list[str]
    weights: list[float]  # capped FedAvg weights
    scales: list[float]  # clip scale of each change, 1 when not bounded
    bound: float | None
    typical: float | None


class RoundFold:
    """A round's running weighted sum of changes (float64) and running activation counts."""

    def __init__(self, reference: Mapping[str, np.ndarray], max_client_samples: int | None = None, label: str = ""):
        self.reference = {k: np.asarray(v) for k, v in reference.items()}
        self.max_client_samples = max_client_samples
        self.label = label  # what the sum is relative to (the round's adapters file): a restored sum must match
        # One flat float64 buffer, `sum` holding views of it: folding an update is then one ufunc call,
        # not one per tensor (on the round loop, with the check workers holding the GIL in between,
        # 50 small calls per update cost milliseconds each at 1,000 devices).
        self._slices: dict[str, tuple[slice, tuple[int, ...]]] = {}
        at = 0
        for k, v in self.reference.items():
            self._slices[k] = (slice(at, at + v.size), v.shape)
            at += v.size
        self._reference_flat = self._flatten(self.reference)
        self.flat = np.zeros(at, np.float64)
        self.sum = self._views(self.flat)
        self.off: dict[int, np.ndarray] = {}
        self.positions: dict[int, float] = {}
        self.folded: dict[str, Contribution] = {}
        self._persisted = time.monotonic()
        # Check workers fold their accepted updates themselves (`take`), so a float64 change never
        # waits in memory for the round loop; the lock keeps the sum and `folded` in step for a
        # snapshot taken meanwhile.
        self._lock = threading.Lock()
        self._scratch = threading.local()  # each worker's change buffer, reused for every update it folds

    def _flatten(self, tensors: Tensors, out: np.ndarray | None = None) -> np.ndarray:
        if not self._slices:
            return np.zeros(0, np.float64)
        # cast while concatenating: one pass, into `out` or one new buffer
        parts = [np.asarray(tensors[k]).reshape(-1) for k in self._slices]
        return np.concatenate(parts, out=out) if out is not None else np.concatenate(parts, dtype=np.float64)

    def _views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {k: flat[sl].reshape(shape) for k, (sl, shape) in self._slices.items()}

    def change_flat(self, adapters: Tensors, out: np.ndarray | None = None) -> np.ndarray:
        """float64(adapters) - float64(reference), all tensors in one vector (the fold's order), in
        `out` (a float64 vector of the sum's size) when given."""
        d = self._flatten(adapters, out)
        d -= self._reference_flat
        return d

    def change(self, adapters: Tensors) -> dict[str, np.ndarray]:
        return self._views(self.change_flat(adapters))

    def contribution(self, device: str, adapters: Tensors, num_samples: int, mean_loss: float | None,
                     declared: int | None = None, update_id: str | None = None,
                     change: np.ndarray | None = None) -> Contribution:
        """`change`: `self.change_flat(adapters)`, when the caller made it already (a check worker
        does, so that the loop's `add` is one in-place sum)."""
        d = self.change_flat(adapters) if change is None else change
        # einsum, not np.dot: BLAS's worker threads spin after every call, which cost the cloud 3.7 CPU-s
        # per 1,000 updates called from the check pool
        return Contribution(device, num_samples, mean_loss, float(np.sqrt(np.einsum("i,i->", d, d))), declared, update_id)

    def add(self, c: Contribution, adapters: Tensors, stats: Mapping[int, tuple[np.ndarray, float]],
            change: np.ndarray | None = None) -> bool:
        """Fold one accepted update in, once; False if the device is already in the sum. A given
        `change` (from `self.change_flat(adapters)`) is consumed: it is scaled in place."""
        if c.device in self.folded:
            return False
        w = float(c.limit(self.max_client_samples))
        d = self.change_flat(adapters) if change is None else change
        d *= w
        with self._lock:
            if c.device in self.folded:
                return False
            self._check_stats(stats)
            self.flat += d
            self._add_stats(stats)
            self.folded[c.device] = c
        return True

    def _check_stats(self, stats: Mapping[int, tuple[np.ndarray, float]]) -> None:
        """Under the lock, before anything is added: a refused sum leaves this one as it was."""
        for layer, (off, _) in stats.items():
            if layer in self.off and self.off[layer].shape != off.shape:
                raise ValueError(f"layer {layer}: neuron count {off.shape} differs from {self.off[layer].shape}")

    def _add_stats(self, stats: Mapping[int, tuple[np.ndarray, float]]) -> None:
        for layer, (off, pos) in stats.items():
            self.off[layer] = self.off.get(layer, 0.0) + off.astype(np.float64)
            self.positions[layer] = self.positions.get(layer, 0.0) + float(pos)

    def take(self, device: str, adapters: Tensors, stats: Mapping[int, tuple[np.ndarray, float]], num_samples: int,
             mean_loss: float | None, declared: int | None = None, update_id: str | None = None) -> Contribution:
        """Measure and fold one accepted update on the calling thread (a check worker), through that
        thread's own change buffer: what an update costs in memory ends with its check, whatever the
        loop is doing (a change held for the loop was twice the update's size, BENCHMARKS.md scale)."""
        d = getattr(self._scratch, "buf", None)
        if d is None:
            d = self._scratch.buf = np.empty(self.flat.size, np.float64)
        c = self.contribution(device, adapters, num_samples, mean_loss, declared, update_id, self.change_flat(adapters, d))
        self.add(c, adapters, stats, d)
        return c

    def stats(self) -> dict[int, tuple[np.ndarray, float]]:
        """The round's summed (off_counts, positions) per layer, as `aggregate.sum_stats` gives them."""
        return {layer: (self.off[layer], self.positions[layer]) for layer in self.off}

    # -- the round's end
    def bounds(self, factor: float, ceiling: float | None, previous: float | None, weight_cap: float) -> Bounds:
        names = sorted(self.folded)
        norms = [self.folded[d].norm for d in names]
        bound, typical = norm_bound(norms, factor, ceiling, previous)
        weights = cap_weights([self.folded[d].limit(self.max_client_samples) for d in names], weight_cap)
        scales = [bound / n if bound is not None and n > bound else 1.0 for n in norms]
        return Bounds(names, weights, scales, bound, typical)

    def finish(self, b: Bounds, load: Callable[[str], Tensors]) -> dict[str, np.ndarray]:
        """FedAvg of the bounded updates: the running sum, corrected (second pass, from `load`) for
        each device whose coefficient the bounds changed, over the capped weights."""
        total = dict(self.sum)
        for d, w, s in zip(b.names, b.weights, b.scales):
            delta = w * s - self.folded[d].limit(self.max_client_samples)
            if delta != 0:
                for k, ch in self.change(load(d)).items():
                    total[k] = total[k] + delta * ch
        z = float(np.sum(b.weights))
        if z <= 0:
            raise ValueError("fedavg needs a positive sum of weights")
        return {k: (self.reference[k].astype(np.float64) + total[k] / z).astype(self.reference[k].dtype) for k in self.reference}

    # -- persistence
    def due(self) -> bool:
        return time.monotonic() - self._persisted >= PERSIST_SECONDS

    def snapshot(self) -> "RoundFold":
        """A copy to encode and persist on another thread while this one goes on folding (`add`
        replaces `off` arrays rather than changing them, so sharing them is safe)."""
        snap = copy.copy(self)
        with self._lock:
            snap.flat = self.flat.copy()
            snap.off, snap.positions, snap.folded = dict(self.off), dict(self.positions), dict(self.folded)
        snap.sum = snap._views(snap.flat)
        self._persisted = time.monotonic()
        return snap

    def to_bytes(self) -> bytes:
        self._persisted = time.monotonic()
        tensors = {f"sum.{k}": v for k, v in self.sum.items()}
        tensors.update({f"off.{layer}": v for layer, v in self.off.items()})
        meta = {"version": FOLD_VERSION, "label": self.label, "positions": json.dumps({str(k): v for k, v in self.positions.items()}),
                "folded": json.dumps([asdict(c) for c in self.folded.values()])}
        return encode_tensors(tensors, meta)

    def restore(self, data: bytes) -> None:
        """Take over a persisted sum (ValueError if it is not one of this round's)."""
        total, off, positions, folded = self._parse(data)
        for k, v in total.items():
            self.sum[k][...] = v
        self.off, self.positions, self.folded = off, positions, folded

    def merge(self, data: bytes) -> None:
        """Add another sum of this round's (a check process's partial sum, `to_bytes`) into this one.
        Their devices must be disjoint: each update is checked, and so folded, in one place."""
        total, off, positions, folded = self._parse(data)
        stats = {layer: (v, positions.get(layer, 0.0)) for layer, v in off.items()}
        with self._lock:
            both = self.folded.keys() & folded.keys()
            if both:
                raise ValueError(f"devices folded twice: {sorted(both)[:5]}")
            self._check_stats(stats)
            for k, v in total.items():
                self.sum[k] += v
            self._add_stats(stats)
            self.folded.update(folded)

    def _parse(self, data: bytes) -> tuple[dict, dict, dict, dict]:
        tensors, meta = decode_tensors(data, max(len(data), 1))
        if meta.get("version") != FOLD_VERSION or meta.get("label") != self.label:
            raise ValueError(f"a running sum of {meta.get('label')!r}, not of {self.label!r}")
        total = {k[4:]: v for k, v in tensors.items() if k.startswith("sum.")}
        if {k: v.shape for k, v in total.items()} != {k: v.shape for k, v in self.sum.items()}:
            raise ValueError("its tensors are not the round's adapters")
        off = {int(k[4:]): v.astype(np.float64) for k, v in tensors.items() if k.startswith("off.")}
        positions = {int(k): float(v) for k, v in json.loads(meta["positions"]).items()}
        folded = {c["device"]: Contribution(**c) for c in json.loads(meta["folded"])}
        return total, off, positions, folded
