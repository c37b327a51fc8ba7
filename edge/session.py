"""A bundle opened on plain onnxruntime for training: `EdgeSession` (parameters bound once to the
training and eval graphs, numpy AdamW), the checks that a graph is a lowered fedpft graph, adapter
and parameter files, and the per-bundle checkpoint cache. `trainer.train_round` drives it for a round."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpft.shared.codec import check_tensors, decode_tensors, encode_tensors
from fedpft.shared.fsio import atomic_write
from fedpft.shared.manifest import GRAD_SUFFIX, ROLE_EVAL, ROLE_PARAMETERS, ROLE_TRAINING, BundleManifest, TensorSpec, verify_bundle
from fedpft.shared.messages import ProtocolError
from fedpft.shared.precision import for_compute
from fedpft.shared.records import Batch
from fedpft.shared.update import STATS_PREFIX

from .optim import AdamW

CACHE_CHECKPOINT = "checkpoint.safetensors"
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


def load_parameters(path: Path) -> dict[str, np.ndarray]:
    """A bundle's parameter file, tensor by tensor from the file (no whole-file copy in memory:
    a ViT-base proxy is 200 MB), frozen weights stored as float16 upcast to the float32 the graphs
    compute in. safetensors checks the header and offsets; BundleError if bad."""
    from safetensors import safe_open

    from fedpft.shared.manifest import BundleError

    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for k in f.keys():  # upcast one at a time: a float16 copy of every tensor at once would cost half again
                try:
                    out[k] = for_compute(f.get_tensor(k))
                except ValueError as exc:
                    raise BundleError(f"{path}: parameter '{k}' {exc}") from None
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise BundleError(f"{path}: unreadable parameters ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return out


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


class SessionWeights:
    """What every training session of a bundle does the same way, whatever computes its steps
    (`EdgeSession` here; the virtual engine's torch trainer): adapters and FFN weights in and out of
    the fp32 master arrays `params` (ONNX names), checked against the manifest first; `_changed`
    tells the compute side which arrays moved."""

    bundle_dir: Path
    manifest: BundleManifest
    params: dict[str, np.ndarray]
    optimizer: AdamW

    def _changed(self, names: Iterable[str]) -> None:
        raise NotImplementedError

    def set_adapters(self, tensors: Mapping[str, np.ndarray], what: str = "adapters") -> None:
        """Global adapters (PEFT keys -> arrays): all of manifest.trainable, checked first."""
        _check(tensors, self.manifest.trainable, what, partial=False)
        self._set(self.manifest.trainable, tensors)

    def adapters(self) -> dict[str, np.ndarray]:
        return {t.key: self.params[t.name].copy() for t in self.manifest.trainable}

    def set_ffn(self, tensors: Mapping[str, np.ndarray], what: str = "ffn weights") -> None:
        """Re-aligned frozen FFN weights pushed by the cloud, keyed like manifest.ffn (proxy state-dict
        keys; ORT names are accepted too). Any subset of the compressed layers' tensors."""
        by_name = {s.name: s.key for s in self.manifest.ffn}
        keyed = {by_name.get(k, k): v for k, v in tensors.items()}
        _check(keyed, self.manifest.ffn, what, partial=True)
        self._set(self.manifest.ffn, keyed)

    def ffn(self) -> dict[str, np.ndarray]:
        return {t.key: self.params[t.name].copy() for t in self.manifest.ffn}

    def _set(self, specs: Iterable[TensorSpec], tensors: Mapping[str, np.ndarray]) -> None:
        # in place: the bound OrtValues (and the optimizer) keep pointing at these arrays
        changed = []
        for s in specs:
            if s.key in tensors:
                self.params[s.name][...] = tensors[s.key]
                changed.append(s.name)
        self._changed(changed)

    def _reload(self, checkpoint: Path | None = None) -> None:
        """Adapters and FFN weights as the bundle's parameter file (then `checkpoint`) has them, and a
        fresh optimizer."""
        from safetensors import safe_open

        specs = [*self.manifest.trainable, *self.manifest.ffn]
        with safe_open(str(self.bundle_dir / self.manifest.files[ROLE_PARAMETERS].path), framework="np") as f:
            for s in specs:
                self.params[s.name][...] = f.get_tensor(s.name)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        self._changed([s.name for s in specs])
        trainable = [t.name for t in self.manifest.trainable]
        self.optimizer = AdamW(self.manifest.optimizer, {n: self.params[n] for n in trainable})

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.lr = float(lr)

    def seed_dropout(self, seed: int) -> None:
        """Seed the generator the training graph's dropout masks come from (process-wide)."""
        raise NotImplementedError

    def accuracy(self, stream: Iterable[Batch]) -> float | None:
        correct = total = 0
        for b in stream:
            correct += int((self.predict(b).argmax(axis=-1) == b.labels).sum())
            total += len(b.labels)
        return correct / total if total else None

    def predict(self, batch: Batch) -> np.ndarray:
        raise NotImplementedError


class EdgeSession(SessionWeights):
    """One bundle on plain onnxruntime: the parameters as OrtValues bound once to a training and
    an eval session (IOBinding), the lowered graph's gradients fed to a numpy AdamW.

    On CPU the OrtValues share the numpy arrays' memory, so optimizer steps and pushed FFN weights
    reach the graphs without a copy or a rebind; on an accelerator the changed tensors are copied
    to the device after each change.
    """

    def __init__(
        self, bundle_dir: Path, manifest: BundleManifest, checkpoint: Path | None = None, threads: int | None = None,
        providers: Sequence[str] | None = None,
    ):
        from . import runtime

        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        f = manifest.files
        self.providers = runtime.resolve_providers(providers)
        self.params = load_parameters(self.bundle_dir / f[ROLE_PARAMETERS].path)
        named = _by_name([*manifest.trainable, *manifest.ffn])
        _check({s.name: self.params[s.name] for s in named if s.name in self.params}, named, "bundle parameters", partial=False)
        self.params = {n: np.ascontiguousarray(a) for n, a in self.params.items()}
        self.checkpoint = checkpoint
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        self.device = runtime.device_of(self.providers)
        self.values = {n: runtime.ort.OrtValue.ortvalue_from_numpy(a, *self.device) for n, a in self.params.items()}
        self.train_session = _open_graph(runtime, self.bundle_dir / f[ROLE_TRAINING].path, self.providers, threads)
        self.eval_session = _open_graph(runtime, self.bundle_dir / f[ROLE_EVAL].path, self.providers, threads)
        _check_graph(self.train_session, self.bundle_dir / f[ROLE_TRAINING].path, manifest, set(self.params), training=True)
        _check_graph(self.eval_session, self.bundle_dir / f[ROLE_EVAL].path, manifest, set(self.params), training=False)
        self._train = self._bind(self.train_session)
        self._eval = self._bind(self.eval_session)
        self._trainable = [t.name for t in manifest.trainable]
        self.optimizer = AdamW(manifest.optimizer, {n: self.params[n] for n in self._trainable})

    def _bind(self, session) -> tuple:
        """Bind every parameter input once; returns (session, binding, batch input names, output index)."""
        binding = session.io_binding()
        batch_inputs = []
        for i in session.get_inputs():
            if i.name in self.values:
                binding.bind_ortvalue_input(i.name, self.values[i.name])
            else:
                batch_inputs.append(i.name)
        outs = [o.name for o in session.get_outputs()]
        return session, binding, batch_inputs, {n: k for k, n in enumerate(outs)}

    def _run(self, io: tuple, batch: Batch) -> list[np.ndarray]:
        session, binding, names, index = io
        feed = dict(batch.inputs, labels=batch.labels)
        for n in names:
            binding.bind_cpu_input(n, np.ascontiguousarray(feed[n]))
        # outputs are bound per run: a bound output keeps its first shape, and batches vary
        binding.clear_binding_outputs()
        for n in index:
            binding.bind_output(n, "cpu")
        session.run_with_iobinding(binding)
        # copies: the bound outputs are reused (overwritten) by the next run
        return binding.copy_outputs_to_cpu()

    def seed_dropout(self, seed: int) -> None:
        # the lowered graph's Dropout nodes carry no seed attribute: they draw from onnxruntime's
        # default generator, which set_seed resets (both the plain and the training build)
        from . import runtime

        runtime.ort.set_seed(int(seed) % (1 << 63))

    def _changed(self, names: Iterable[str]) -> None:
        if self.device[0] != "cpu":  # host arrays are the master copy; the device holds a mirror
            for n in names:
                self.values[n].update_inplace(self.params[n])

    def reset(self) -> None:
        """The state a newly opened session would have: the bundle's adapters and FFN weights (then
        those of the checkpoint file it was opened from, as that file is now) and a fresh optimizer,
        so a session kept across rounds trains a round exactly as a new one. Read again from the
        files rather than kept as a copy, which would cost a device its FFN weights' memory twice."""
        self._reload(self.checkpoint)

    def _load_checkpoint(self, path: Path) -> None:
        """Overlay a cached checkpoint (adapters + FFN weights under ONNX names) on the bundle's."""
        saved = load_tensor_file(path)
        specs = [*self.manifest.trainable, *self.manifest.ffn]
        _check(saved, _by_name(specs), f"cached checkpoint {path}", partial=True)
        for s in specs:
            if s.name in saved:
                self.params[s.name][...] = saved[s.name]

    # ---------------------------------------------------------------- steps
    def _stats(self, outs, index: dict[str, int]) -> dict[int, tuple[np.ndarray, float]]:
        return {
            s.layer: (np.asarray(outs[index[s.off_counts]], dtype=np.float64), float(outs[index[s.positions]]))
            for s in self.manifest.stat_outputs
        }

    def train_step(self, batch: Batch) -> StepOutput:
        """Forward + backward (one session run, gradients as outputs), then one AdamW step."""
        outs = self._run(self._train, batch)
        index = self._train[3]
        loss = float(outs[index[self.manifest.loss_output]])
        if math.isfinite(loss):  # a NaN step must not poison the weights the caller may still save
            self.optimizer.step({n: outs[index[n + GRAD_SUFFIX]] for n in self._trainable})
            self._changed(self._trainable)
        return StepOutput(loss, outs[index[self.manifest.logits_output]], self._stats(outs, index))

    def predict(self, batch: Batch) -> np.ndarray:
        """Logits (batch, labels) of the eval model (dropout off)."""
        outs = self._run(self._eval, batch)
        return outs[self._eval[3][self.manifest.logits_output]]

    # ---------------------------------------------------------------- cache
    def save(self, cache_dir: Path) -> Path:
        """Save the adapters and FFN weights (no optimizer state) into cache_dir."""
        return save_checkpoint(self, cache_dir)


def _by_name(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Specs keyed by their ONNX names: how parameter files and cached checkpoints store tensors."""
    return [TensorSpec(name=s.name, key=s.name, shape=s.shape, dtype=s.dtype) for s in specs]


def _open_graph(runtime, path: Path, providers: list[str], threads: int | None):
    """An InferenceSession, or one BundleError line (e.g. a graph that still needs training ops:
    "Could not find an implementation for GeluGrad(1) node ...")."""
    from fedpft.shared.manifest import BundleError

    try:
        return runtime.session(str(path), providers, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise BundleError(f"{path}: onnxruntime {runtime.version()} cannot load this graph: {first}") from None


def _check_graph(session, path: Path, manifest: BundleManifest, params: set[str], training: bool) -> None:
    """The graph takes only parameters, the model inputs and labels, and (training) outputs the
    loss and every trainable tensor's gradient: else it is not a lowered fedpft graph."""
    from fedpft.shared.manifest import BundleError

    allowed = params | set(manifest.input.names) | {"labels"}
    odd = [i.name for i in session.get_inputs() if i.name not in allowed]
    if odd:
        raise BundleError(f"{path}: graph input '{odd[0]}' is neither a parameter nor a model input (a graph built for onnxruntime-training?)")
    outputs = {o.name for o in session.get_outputs()}
    wanted = [manifest.logits_output] + ([manifest.loss_output or "?"] + [t.name + GRAD_SUFFIX for t in manifest.trainable] if training else [])
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise BundleError(f"{path}: graph lacks output '{missing[0]}' ({len(missing)} missing)")


def save_checkpoint(session: EdgeSession, cache_dir: Path) -> Path:
    """Atomically write the session's adapters and FFN weights to
    `cache_dir/<bundle_id>/checkpoint.safetensors`, plus a note of which bundle it belongs to;
    returns the checkpoint path. Frozen weights other than the FFN never change: the bundle has them."""
    folder = Path(cache_dir) / session.manifest.bundle_id
    folder.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in [*session.manifest.trainable, *session.manifest.ffn]]
    atomic_write(folder / CACHE_CHECKPOINT, encode_tensors({n: session.params[n] for n in names}))
    meta = {"bundle_id": session.manifest.bundle_id, "bundle_version": session.manifest.bundle_version, "saved": time.time()}
    atomic_write(folder / CACHE_META, json.dumps(meta).encode())
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


def open_session(
    bundle_dir: Path, cache_dir: Path | None = None, threads: int | None = None, manifest: BundleManifest | None = None,
    providers: Sequence[str] | None = None,
) -> EdgeSession:
    """Verify the bundle (sha256 of every file) and open it, from the cached checkpoint if any."""
    manifest = manifest or verify_bundle(bundle_dir, device_only=True)
    return EdgeSession(bundle_dir, manifest, cached_checkpoint(manifest, cache_dir), threads, providers)
