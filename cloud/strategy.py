"""What a method does with a round, along Flower's seams: `configure` (who trains, on what) and
`aggregate` (accepted updates -> the next global state and the round's metrics).

Which strategy a run gets is looked up in the one method table (`fedpft.shared.methods`), from
the method its bundle was prepared for; `prepare` and `simulate` read the same rows. Evaluation
and alignment are torch work done by the caller's objects, typed here as protocols so the round
loop never imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedpft.shared.codec import decode_tensors
from fedpft.cloud.config import ServeConfig
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import CLOUD_SENDER, MAX_TASK_DEVICES, BlobRef, ProtocolError, Task
from fedpft.shared.methods import Method, method
from fedpft.shared.update import UpdateMeta, split_update

from .aggregate import Tensors, aggregate, clip_update
from .fold import Bounds, RoundFold
from .sampling import round_rng, sample_devices
from .state import RunState, RunStore

log = logging.getLogger("fedpft.serve")

Stats = dict[int, tuple[np.ndarray, float]]


class Evaluator(Protocol):
    def __call__(self, adapters: dict[str, np.ndarray]) -> tuple[float, float]:
        """(accuracy, loss) of the FM with these adapters plugged in."""
        ...


class Aligner(Protocol):
    def __call__(self, adapters: dict[str, np.ndarray], stats: Stats, current_ffn: dict[str, np.ndarray] | None,
                 round_id: int) -> tuple[dict[str, np.ndarray], dict]:
        """({manifest.ffn key: re-aligned weights}, JSON-ready facts for the round's record)."""
        ...


@dataclass
class RoundBlobs:
    """What a round's devices download: the bundle, the global adapters, the re-aligned FFN weights."""

    bundle: BlobRef
    adapters: BlobRef
    ffn: BlobRef | None = None


def align_due(round_id: int, rounds: int, every: int | None) -> bool:
    """Align after every `every`-th round, but never after the last one: no device would ever
    train on that proxy in this run, and its cost would be wasted."""
    return bool(every) and (round_id + 1) % every == 0 and round_id + 1 < rounds


class AdapterStrategy:
    """FedAvg (or a robust aggregator) of bounded adapter updates, streamed into a RoundFold;
    then, for a method that aligns, neuron-level alignment on the round's activation counts."""

    def __init__(self, row: Method, cfg: ServeConfig, manifest: BundleManifest, store: RunStore,
                 evaluator: Evaluator | None = None, aligner: Aligner | None = None):
        self.method, self.cfg, self.manifest, self.store = row, cfg, manifest, store
        self.evaluator, self.aligner = evaluator, aligner
        self.expected = {t.key: (tuple(t.shape), t.dtype) for t in manifest.trainable}
        self.stat_layers = {s.layer: s.neurons for s in manifest.stat_outputs}

    def aligns(self, rnd: int) -> bool:
        cfg = self.cfg
        return (self.method.align and align_due(rnd, cfg.rounds, cfg.align_every) and bool(self.stat_layers)
                and self.aligner is not None)

    def configure(self, rnd: int, online: list[str], state: RunState, attempt: int, blobs: RoundBlobs) -> Task:
        """The round's task for a sample of the online devices (seeded by round and attempt)."""
        cfg = self.cfg
        selected = sample_devices(online, round_rng(cfg.seed, rnd, attempt), cfg.clients_per_round, cfg.fraction, MAX_TASK_DEVICES)
        return Task(
            run_id=cfg.run_id, round_id=rnd, sender=CLOUD_SENDER, devices=selected, bundle=blobs.bundle,
            bundle_version=f"{self.manifest.bundle_id}:{self.manifest.bundle_version}", adapters=blobs.adapters,
            ffn=blobs.ffn, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, max_steps=cfg.max_steps,
            report_stats=self.aligns(rnd), deadline=time.time() + cfg.round_timeout, seed=cfg.seed * 100003 + rnd,
        )

    def begin(self, rnd: int, state: RunState | None) -> RoundFold:
        """An empty running sum against the round's global adapters (the bundle's, without a state).
        Under DP every device weighs 1 (a sample-count weight would be a private sum of its own)."""
        if state is None:
            rel = self.manifest.files["adapters_init"].path
            ref = decode_tensors((Path(self.cfg.bundle) / rel).read_bytes())[0]
        else:
            rel, ref = state.adapters, self.store.read_tensors(state.adapters)
        return RoundFold(ref, 1 if self.cfg.dp_clip is not None else self.cfg.max_client_samples, label=f"round {rnd} on {rel}")

    def resume(self, rnd: int, state: RunState, devices: frozenset[str] | set[str]) -> RoundFold:
        """The running sum of the updates round `rnd` stored before a restart, for these devices:
        the persisted sum where it is intact, then the stored updates it does not hold yet."""
        fold = self.begin(rnd, state)
        stored = {d: p for d, p in self.store.stored_updates(rnd).items() if d in devices}
        data = self.store.load_fold(rnd)
        if data is not None:
            try:
                fold.restore(data)
                if not set(fold.folded) <= set(stored):
                    raise ValueError("it holds updates that are not stored for this attempt's devices")
            except (ValueError, KeyError, TypeError, ProtocolError) as exc:
                log.warning("round %d: running sum not used (%s); refolding the stored updates", rnd, exc)
                fold = self.begin(rnd, state)
        for device, path in sorted(stored.items()):
            if device in fold.folded:
                continue
            try:
                tensors, raw = decode_tensors(path.read_bytes(), self.cfg.max_update_bytes)
                adapters, stats = split_update(tensors, self.expected, self.stat_layers)
                meta = UpdateMeta.parse(raw)
            except (ProtocolError, ValueError) as exc:
                log.warning("stored update %s unusable (%s); the device will be asked again", path, exc)
                continue
            fold.add(fold.contribution(device, adapters, meta.num_samples, meta.mean_loss), adapters, stats)
        return fold

    def load(self, rnd: int) -> Callable[[str], Tensors]:
        """Reads one accepted update of round `rnd` back from the run folder (the second pass)."""
        return lambda device: split_update(decode_tensors(self.store.read_update(rnd, device), self.cfg.max_update_bytes)[0],
                                           self.expected, self.stat_layers)[0]

    def aggregate(self, rnd: int, fold: RoundFold, state: RunState,
                  noise: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]] | None = None) -> dict:
        """Writes the round's adapters (and FFN weights when it aligns) into `state`; the round's
        metrics. `noise(mean, n)`: central DP's noise on the mean of n updates."""
        cfg = self.cfg
        previous = next((h["typical_norm"] for h in reversed(state.history) if h.get("typical_norm") is not None), None)
        # DP: the clip C is the bound (devices clipped already; the cloud enforces it), not the round's median
        factor, ceiling = (0.0, cfg.dp_clip) if cfg.dp_clip is not None else (cfg.norm_bound_factor, cfg.max_update_norm)
        b = fold.bounds(factor, ceiling, previous, cfg.weight_cap_factor)
        record = self._bounds_record(rnd, fold, b)
        if cfg.aggregator == "fedavg":
            adapters = fold.finish(b, self.load(rnd))
        else:  # median and trimmed mean need every update at once: read back from disk, bounded, as sent
            load = self.load(rnd)
            updates = [load(d) if s == 1.0 else clip_update(load(d), fold.reference, b.bound) for d, s in zip(b.names, b.scales)]
            adapters = aggregate(updates, b.weights, cfg.aggregator, cfg.trim_fraction)
        if noise is not None:
            adapters = noise(adapters, len(b.names))
        losses = [fold.folded[d].mean_loss or 0.0 for d in b.names]
        record.update(clients=len(b.names), devices=b.names, aggregator=cfg.aggregator,
                      train_loss=float(np.average(losses, weights=b.weights)))
        record.update(self.finish_round(rnd, adapters, fold.stats() if fold.off else {}, state))
        return record

    def finish_round(self, rnd: int, adapters: dict[str, np.ndarray], stats: Stats, state: RunState) -> dict:
        """The aggregated adapters into `state`, the alignment when due, the FM's evaluation; their facts."""
        record: dict = {}
        state.adapters = self.store.write_tensors(f"checkpoints/adapters_round_{rnd:04d}.safetensors", adapters)
        if self.aligns(rnd) and stats:
            ffn, info = self.aligner(adapters, stats, self.store.read_tensors(state.ffn) if state.ffn else None, rnd)
            state.alignments += 1
            state.ffn = self.store.write_tensors(f"checkpoints/ffn_align_{state.alignments:03d}.safetensors", ffn)
            record.update(alignment=info, aligned=True)
        if self.evaluator is not None:
            acc, loss = self.evaluator(adapters)
            record.update(fm_accuracy=acc, fm_loss=loss)
        return record

    def _bounds_record(self, rnd: int, fold: RoundFold, b: Bounds) -> dict:
        """Logs every bounded update and capped weight, and returns them for the round's metrics."""
        cfg = self.cfg
        bounded = {}
        for d, s in zip(b.names, b.scales):
            if s < 1.0:
                n = fold.folded[d].norm
                bounded[d] = n
                log.warning("round %d: bounded update from %s: its change has L2 norm %.4g > bound %.4g; scaled by %.3g",
                            rnd, d, n, b.bound, s)
        capped = {}
        for d, w in zip(b.names, b.weights):
            c = fold.folded[d]
            claimed = max(c.num_samples, 1)
            if w < claimed:
                capped[d] = claimed
                log.warning("round %d: capped the weight of %s: claims %d samples, counted as %d (Hello: %s, --max-client-samples: %s, "
                            "%.3g x typical)", rnd, d, claimed, w, c.declared if c.declared is not None else "-",
                            cfg.max_client_samples or "-", cfg.weight_cap_factor)
        return dict(typical_norm=b.typical, norm_bound=b.bound, bounded=bounded, weights=dict(zip(b.names, b.weights)), capped=capped)


def make_strategy(manifest: BundleManifest, cfg: ServeConfig, store: RunStore, evaluator: Evaluator | None = None,
                  aligner: Aligner | None = None) -> AdapterStrategy:
    """The strategy of the method the bundle was prepared for (its row in the method table)."""
    return AdapterStrategy(method(manifest.method), cfg, manifest, store, evaluator, aligner)
