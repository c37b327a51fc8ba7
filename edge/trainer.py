"""One local round on a device: the bundle's ORT training artifacts, the local data, an update.

`train_round` is the library entry point (the CLI and the MQTT agent both call it):
verify the bundle -> load the checkpoint (the cached one when present) -> put the cloud's
global adapters and re-aligned FFN weights into the checkpoint state -> accuracy on a held-out
slice -> train (forward+backward, AdamW step, reset grads) summing the activation statistics
-> accuracy again -> RoundResult (adapters under their PEFT keys + statistics + metrics).
Torch-free: only onnxruntime's on-device API (via `runtime`), numpy, tokenizers and Pillow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpft.shared.codec import check_tensors, decode_tensors
from fedpft.shared.edge_config import EdgeTrainConfig
from fedpft.shared.manifest import ROLE_CHECKPOINT, ROLE_EVAL, ROLE_OPTIMIZER, ROLE_TRAINING, BundleManifest, TensorSpec, verify_bundle
from fedpft.shared.messages import ProtocolError
from fedpft.shared.update import STATS_PREFIX

from .data import Batch, BatchMaker, DataError, Skips, batches, epoch_order, read_local_data
from .update import RoundResult

CACHE_CHECKPOINT = "checkpoint"
CACHE_META = "checkpoint.json"


class AdapterError(ValueError):
    """Adapters or FFN weights that do not fit the bundle (names, shapes, dtypes, NaN)."""


class TrainError(RuntimeError):
    """Training itself failed (e.g. the loss became NaN)."""


def load_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, header-checked (never pickle); AdapterError if unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return decode_tensors(data)[0]
    except ProtocolError as exc:
        raise AdapterError(f"{path}: {exc}") from exc


def load_adapters(path: Path) -> dict[str, np.ndarray]:
    """Adapters from a safetensors file of PEFT keys; an earlier update file works too (its
    activation statistics are dropped)."""
    return {k: v for k, v in load_tensor_file(path).items() if not k.startswith(STATS_PREFIX)}


def _check(tensors: Mapping[str, np.ndarray], specs: Iterable[TensorSpec], what: str, partial: bool) -> None:
    expected = {s.key: (s.shape, s.dtype) for s in specs}
    try:
        check_tensors(tensors, expected, allow_missing=partial)
    except ProtocolError as exc:
        raise AdapterError(f"{what}: {exc}") from exc


@dataclass
class StepOutput:
    loss: float
    logits: np.ndarray  # (batch, labels)
    stats: dict[int, tuple[np.ndarray, float]]  # FM layer -> (off_counts (neurons,), positions)


class EdgeSession:
    """One bundle's ORT training state: checkpoint state, training/eval module, optimizer."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, checkpoint: Path | None = None, threads: int | None = None):
        from .runtime import CheckpointState, Module, Optimizer  # first: it keeps torch out of `import onnxruntime`

        from onnxruntime import SessionOptions

        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        f = manifest.files
        ckpt = checkpoint or self.bundle_dir / f[ROLE_CHECKPOINT].path
        self.state = CheckpointState.load_checkpoint(str(ckpt))
        opts = SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.module = Module(
            str(self.bundle_dir / f[ROLE_TRAINING].path), self.state, str(self.bundle_dir / f[ROLE_EVAL].path),
            session_options=opts,
        )
        self.optimizer = Optimizer(str(self.bundle_dir / f[ROLE_OPTIMIZER].path), self.module)
        self._train_io = self._io()
        self.module.eval()
        self._eval_io = self._io()
        self.module.train()

    def _io(self) -> tuple[list[str], dict[str, int]]:
        outs = {n: i for i, n in enumerate(self.module.output_names())}
        return list(self.module.input_names()), outs

    # ---------------------------------------------------------------- weights in and out
    def set_adapters(self, tensors: Mapping[str, np.ndarray], what: str = "adapters") -> None:
        """Global adapters (PEFT keys -> arrays): all of manifest.trainable, checked first."""
        _check(tensors, self.manifest.trainable, what, partial=False)
        self._set(self.manifest.trainable, tensors)

    def adapters(self) -> dict[str, np.ndarray]:
        return {t.key: np.array(self.state.parameters[t.name].data, copy=True) for t in self.manifest.trainable}

    def set_ffn(self, tensors: Mapping[str, np.ndarray], what: str = "ffn weights") -> None:
        """Re-aligned frozen FFN weights pushed by the cloud, keyed like manifest.ffn (proxy state-dict
        keys; ORT names are accepted too). Any subset of the compressed layers' tensors."""
        by_name = {s.name: s.key for s in self.manifest.ffn}
        keyed = {by_name.get(k, k): v for k, v in tensors.items()}
        _check(keyed, self.manifest.ffn, what, partial=True)
        self._set(self.manifest.ffn, keyed)

    def ffn(self) -> dict[str, np.ndarray]:
        return {t.key: np.array(self.state.parameters[t.name].data, copy=True) for t in self.manifest.ffn}

    def _set(self, specs: Iterable[TensorSpec], tensors: Mapping[str, np.ndarray]) -> None:
        for s in specs:
            if s.key in tensors:
                self.state.parameters[s.name].data = np.ascontiguousarray(tensors[s.key])

    # ---------------------------------------------------------------- steps
    def _inputs(self, names: list[str], batch: Batch) -> list[np.ndarray]:
        feed = dict(batch.inputs, labels=batch.labels)
        return [feed[n] for n in names]

    def _stats(self, outs, index: dict[str, int]) -> dict[int, tuple[np.ndarray, float]]:
        return {
            s.layer: (np.asarray(outs[index[s.off_counts]], dtype=np.float64), float(outs[index[s.positions]]))
            for s in self.manifest.stat_outputs
        }

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def train_step(self, batch: Batch) -> StepOutput:
        """Forward + backward, one AdamW step, then reset the gradients."""
        names, index = self._train_io
        outs = self.module(*self._inputs(names, batch))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return StepOutput(float(outs[0]), outs[index[self.manifest.logits_output]], self._stats(outs, index))

    def predict(self, batch: Batch) -> np.ndarray:
        """Logits (batch, labels) of the eval model (dropout off)."""
        names, index = self._eval_io
        self.module.eval()
        try:
            outs = self.module(*self._inputs(names, batch))
        finally:
            self.module.train()
        return outs[index[self.manifest.logits_output]]

    def accuracy(self, stream: Iterable[Batch]) -> float | None:
        correct = total = 0
        for b in stream:
            correct += int((self.predict(b).argmax(axis=-1) == b.labels).sum())
            total += len(b.labels)
        return correct / total if total else None

    # ---------------------------------------------------------------- cache
    def save(self, cache_dir: Path) -> Path:
        """Save the checkpoint state (adapters + frozen weights, no optimizer state) into cache_dir."""
        return save_checkpoint(self, cache_dir)


def save_checkpoint(session: EdgeSession, cache_dir: Path) -> Path:
    """Atomically write the session's checkpoint to `cache_dir/<bundle_id>/checkpoint`, plus a note
    of which bundle it belongs to; returns the checkpoint path."""
    from .runtime import CheckpointState

    folder = Path(cache_dir) / session.manifest.bundle_id
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CACHE_CHECKPOINT}.tmp-{os.getpid()}"
    CheckpointState.save_checkpoint(session.state, str(tmp), include_optimizer_state=False)
    os.replace(tmp, folder / CACHE_CHECKPOINT)
    meta = {"bundle_id": session.manifest.bundle_id, "bundle_version": session.manifest.bundle_version, "saved": time.time()}
    (folder / f".{CACHE_META}.tmp").write_text(json.dumps(meta))
    os.replace(folder / f".{CACHE_META}.tmp", folder / CACHE_META)
    return folder / CACHE_CHECKPOINT


def cached_checkpoint(manifest: BundleManifest, cache_dir: Path | None) -> Path | None:
    """The checkpoint saved for this bundle in cache_dir, or None."""
    if cache_dir is None:
        return None
    folder = Path(cache_dir) / manifest.bundle_id
    try:
        meta = json.loads((folder / CACHE_META).read_text())
    except (OSError, ValueError):
        return None
    ok = meta.get("bundle_id") == manifest.bundle_id and (folder / CACHE_CHECKPOINT).is_file()
    return folder / CACHE_CHECKPOINT if ok else None


def clear_cache(manifest: BundleManifest, cache_dir: Path) -> None:
    shutil.rmtree(Path(cache_dir) / manifest.bundle_id, ignore_errors=True)


def open_session(bundle_dir: Path, cache_dir: Path | None = None, threads: int | None = None, manifest: BundleManifest | None = None) -> EdgeSession:
    """Verify the bundle (sha256 of every file) and open it, from the cached checkpoint if any."""
    manifest = manifest or verify_bundle(bundle_dir, device_only=True)
    return EdgeSession(bundle_dir, manifest, cached_checkpoint(manifest, cache_dir), threads)


# ---------------------------------------------------------------- the round

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
) -> RoundResult:
    """Train the bundle's adapters on the local data for one round.

    adapters: global adapters (PEFT keys) to start from; None keeps the checkpoint's.
    ffn: re-aligned frozen FFN weights (manifest.ffn keys) to install first.
    cache_dir: start from the checkpoint cached there for this bundle, and save the result back.
    Raises BundleError, DataError, AdapterError or TrainError with a one-line message.
    """
    t0 = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir, device_only=True)
    data = read_local_data(data_path, manifest)
    train, held = data.split(cfg.holdout, cfg.holdout_seed)
    maker = BatchMaker(bundle_dir, manifest)
    session = open_session(bundle_dir, cache_dir, cfg.threads, manifest)
    if adapters is not None:
        session.set_adapters(adapters)
    if ffn is not None:
        session.set_ffn(ffn)
    session.set_learning_rate(cfg.lr)
    skips = data.skips

    def held_out():
        return batches(held, maker, cfg.eval_batch_size, skips)

    acc_before = session.accuracy(held_out()) if held else None
    if on_start:
        on_start(planned_steps(len(train), cfg))
    losses: list[float] = []
    stats = {s.layer: (np.zeros(s.neurons, dtype=np.float64), 0.0) for s in manifest.stat_outputs} if cfg.report_stats else {}
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
                break
        else:
            continue
        break
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
