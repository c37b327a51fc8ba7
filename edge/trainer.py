"""One local round on a device: the bundle's ORT training artifacts, the local data, an update.

`train_round` is the library entry point (the CLI and the MQTT agent both call it):
verify the bundle -> load its parameters (with the cached adapters/FFN when present) -> put the
cloud's global adapters and re-aligned FFN weights in -> accuracy on a held-out
slice -> train (forward+backward, AdamW step, reset grads) summing the activation statistics
-> accuracy again -> RoundResult (adapters under their PEFT keys + statistics + metrics).
Torch-free: plain onnxruntime (via `runtime`), numpy, tokenizers and Pillow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fedpft.shared.edge_config import EdgeTrainConfig
from fedpft.shared.manifest import verify_bundle
from fedpft.shared.records import BatchMaker, DataError, Skips, batches, epoch_order, read_local_data

from .session import (  # noqa: F401  (the session's names stay importable from here, as before the split)
    AdapterError, EdgeSession, StepOutput, TrainError, cached_checkpoint, clear_cache, load_adapters, load_tensor_file,
    open_session, save_checkpoint,
)
from .update import RoundResult


def planned_steps(n_train: int, cfg: EdgeTrainConfig) -> int:
    steps = cfg.epochs * math.ceil(n_train / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def train_round(
    bundle_dir: Path,
    data_path: Path,
    cfg: EdgeTrainConfig,
    adapters: Mapping[str, np.ndarray] | None = None,
    ffn: Mapping[str, np.ndarray] | None = None,
    cache_dir: Path | None = None,
    on_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    session: EdgeSession | None = None,
) -> RoundResult:
    """Train the bundle's adapters on the local data for one round.

    adapters: global adapters (PEFT keys) to start from; None keeps the checkpoint's.
    ffn: re-aligned frozen FFN weights (manifest.ffn keys) to install first.
    cache_dir: start from the checkpoint cached there for this bundle, and save the result back.
    session: this bundle already open, in its opened state (a session kept across rounds, see
    `EdgeSession.reset`), instead of opening it; the caller has verified the bundle, and the
    session's threads and providers stand. Not with cache_dir.
    Raises BundleError, DataError, AdapterError or TrainError with a one-line message.
    """
    t0 = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    if session is not None and cache_dir is not None:
        raise ValueError("train_round: a given session does not load or save a cache_dir checkpoint")
    manifest = session.manifest if session is not None else verify_bundle(bundle_dir, device_only=True)
    data = read_local_data(data_path, manifest, cfg.max_record_bytes)
    train, held = data.split(cfg.holdout, cfg.holdout_seed)
    maker = BatchMaker(bundle_dir, manifest, cfg.max_record_tokens)
    session = session or open_session(bundle_dir, cache_dir, cfg.threads, manifest, cfg.providers)
    if adapters is not None:
        session.set_adapters(adapters)
    if ffn is not None:
        session.set_ffn(ffn)
    session.set_learning_rate(cfg.lr)
    skips = data.skips

    def held_out():
        return batches(held, maker, cfg.eval_batch_size, skips)

    acc_before = session.accuracy(held_out()) if held else None
    if cfg.dropout_seed is not None:
        session.seed_dropout(cfg.dropout_seed)
    if on_start:
        on_start(planned_steps(len(train), cfg))
    losses, stats, seen = _train(session, train, maker, cfg, skips, on_step)
    if not losses:
        raise DataError(f"data '{data_path}' holds no usable {manifest.input.kind} sample ({skips.summary() or 'empty training split'})")
    acc_after = session.accuracy(held_out()) if held else None
    if cache_dir is not None:
        session.save(cache_dir)
    return RoundResult(
        adapters=session.adapters(),
        stats=stats,
        num_samples=sum(1 for r in train if not skips.is_bad(r)),
        steps=len(losses),
        samples_seen=seen,
        mean_loss=float(np.mean(losses)),
        acc_before=acc_before,
        acc_after=acc_after,
        holdout_samples=sum(1 for r in held if not skips.is_bad(r)),
        bundle_id=manifest.bundle_id,
        bundle_version=manifest.bundle_version,
        skipped=skips.total,
        skipped_summary=skips.summary(),
        seconds=time.perf_counter() - t0,
        losses=losses,
    )


def _train(
    session: EdgeSession, train: list, maker: BatchMaker, cfg: EdgeTrainConfig, skips: Skips,
    on_step: Callable[[int, float], None] | None,
) -> tuple[list[float], dict[int, tuple[np.ndarray, float]], int]:
    """The round's steps over the epochs: losses, activation statistics summed per FM layer, samples seen."""
    losses: list[float] = []
    stats = {s.layer: (np.zeros(s.neurons, dtype=np.float64), 0.0) for s in session.manifest.stat_outputs} if cfg.report_stats else {}
    seen = 0
    for epoch in range(cfg.epochs):
        for batch in batches(train, maker, cfg.batch_size, skips, epoch_order(len(train), cfg.seed, epoch)):
            out = session.train_step(batch)
            if not math.isfinite(out.loss):
                raise TrainError(f"training diverged at step {len(losses) + 1}: loss is {out.loss} (try a lower --lr)")
            losses.append(out.loss)
            seen += len(batch.labels)
            for layer, (off, pos) in out.stats.items():
                if layer in stats:
                    acc_off, acc_pos = stats[layer]
                    stats[layer] = (acc_off + off, acc_pos + pos)
            if on_step:
                on_step(len(losses), out.loss)
            if cfg.max_steps and len(losses) >= cfg.max_steps:
                return losses, stats, seen
    return losses, stats, seen


def summarize(result: RoundResult) -> str:
    """One line for humans."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    return (
        f"{result.steps} steps on {result.num_samples} samples, mean loss {result.mean_loss:.4f}, "
        f"held-out accuracy {pct(result.acc_before)} -> {pct(result.acc_after)} ({result.seconds:.1f}s)"
    )


__all__ = [
    "AdapterError", "DataError", "EdgeSession", "StepOutput", "TrainError", "Skips", "cached_checkpoint", "clear_cache",
    "load_adapters", "load_tensor_file", "open_session", "planned_steps", "save_checkpoint", "summarize", "train_round",
]
