"""A bundle's proxy trained in torch, as a stand-in for the edge's ORT session (virtual clients only).

The device graph in a bundle is exported from `export.training.TrainingGraph` around the proxy and
its LoRA adapters; the cloud keeps that proxy in the bundle (`cloud.bundle_model.load_proxy`). So
the same function can be run by torch directly: same parameters (the bundle's parameter file, by
the graph's own names), same inputs and batches, same loss (mean cross-entropy), same activation
statistics, and the device's own optimizer (`edge.optim.AdamW`, numpy, on an fp32 master copy of
the adapters). What changes is only the kernel library that computes forward and backward.

Why: on the CPUs this project measures on, torch's oneDNN kernels train the MiniLM proxy about
twice as fast as onnxruntime's on the lowered graph, and where the CPU has AMX or the machine a GPU,
bf16 autocast doubles that again. The multi-seed benchmarks (issue 15) are bound by exactly this.

`precision`: "fp32" (the parity mode: within float32 rounding of the ORT path) or "bf16" (autocast
of matmuls on CPU with AMX/AVX512-BF16, or on a GPU; the adapters, optimizer state and loss stay
fp32; weights stay fp32 in memory). bf16 is a research speed setting, not what devices run; the
parity test states its own tolerance.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedpft.cloud.bundle_model import load_proxy
from fedpft.edge.optim import AdamW
from fedpft.edge.session import AdapterError, SessionWeights, StepOutput, load_parameters
from fedpft.export.training import TrainingGraph, stat_names
from fedpft.shared.manifest import ROLE_PARAMETERS, BundleManifest, BundleError
from fedpft.shared.records import Batch

PRECISIONS = ("fp32", "bf16")
_BUILD = threading.Lock()  # sessions are built on the pool's threads; one at a time (see fork_rng)


def _grad(p: torch.Tensor) -> np.ndarray:
    # a trainable tensor the loss does not reach (the lowered graph would have refused it) has no grad
    return np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.detach().cpu().numpy()


def check_precision(device: torch.device, precision: str) -> str | None:
    """None if `precision` runs natively on `device`; else why not (CUDA without bf16 is refused by
    the caller; a CPU without AMX/AVX512-BF16 only emulates it, slower than fp32)."""
    if precision != "bf16":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: absent in some torch
        if probe is not None and not probe():
            return "this CPU has no native bf16 (AMX or AVX512-BF16): torch emulates it, slower than fp32"
    return None


class TorchSession(SessionWeights):
    """`EdgeSession`'s interface (set/get adapters and FFN weights, train_step, predict, accuracy,
    reset) over the bundle's torch proxy on `device`.

    bundle_dir: the bundle as a device holds it (device files only); source: the cloud's copy of
    the same bundle, which also holds the proxy's architecture (ProxySpec, FM config). threads:
    torch intra-op threads of the thread that trains (torch keeps the setting per thread)."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, source: Path | None = None,
                 device: str | torch.device = "cpu", precision: str = "fp32", threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
        self.bundle_dir, self.manifest = Path(bundle_dir), manifest
        source = Path(source) if source is not None else self.bundle_dir
        cloud_id = BundleManifest.load(source).bundle_id
        if cloud_id != manifest.bundle_id:
            raise BundleError(f"{source}: bundle {cloud_id}, not the {manifest.bundle_id} this client trains")
        self.device = torch.device(device)
        self.precision, self.threads = precision, threads
        with _BUILD, torch.random.fork_rng(devices=[]):
            # load_proxy seeds torch's global generator (peft's LoRA init): without the fork that
            # would reseed the dropout of sessions training on other threads meanwhile
            proxy, spec = load_proxy(source, with_adapters=True)
        position = {stat_names(p)[0]: p for p in range(len(spec.layer_map))}  # output name -> proxy layer
        odd = [s.off_counts for s in manifest.stat_outputs if s.off_counts not in position]
        if odd:
            raise BundleError(f"{source}: statistics output '{odd[0]}' names no layer of the proxy")
        self._stat_layers = [(position[s.off_counts], s.layer) for s in manifest.stat_outputs]
        self.graph = TrainingGraph(proxy, [p for p, _ in self._stat_layers]).to(self.device)
        self._torch = dict(self.graph.named_parameters())
        self._trainable = [t.name for t in manifest.trainable]
        self._mutable = [*manifest.trainable, *manifest.ffn]
        missing = [s.name for s in self._mutable if s.name not in self._torch]
        if missing:
            raise BundleError(f"{self.bundle_dir}: the torch proxy has no parameter '{missing[0]}' ({len(missing)} missing)")
        trainable = set(self._trainable)
        for name, p in self._torch.items():
            p.requires_grad_(name in trainable)
        # the master copy of what changes (adapters, FFN): fp32 numpy, as on a device
        self.params: dict[str, np.ndarray] = {}
        self._load_bundle_parameters()
        self.optimizer = AdamW(manifest.optimizer, {n: self.params[n] for n in self._trainable})

    def _load_bundle_parameters(self) -> None:
        """Every graph parameter from the bundle's parameter file: what a device starts from."""
        file = self.bundle_dir / self.manifest.files[ROLE_PARAMETERS].path
        loaded = load_parameters(file)
        # peft keeps the head it replaced as `original_module`; the forward never reads it, so the
        # exported graph (and its parameter file) has none
        absent = [n for n in self._torch if n not in loaded and ".original_module." not in n]
        if absent:
            raise BundleError(f"{file}: no tensor for the proxy parameter '{absent[0]}' ({len(absent)} missing)")
        with torch.no_grad():
            for name, p in self._torch.items():
                if name not in loaded:
                    continue
                src = loaded[name]
                if tuple(src.shape) != tuple(p.shape):
                    raise BundleError(f"{file}: '{name}' has shape {tuple(src.shape)}, the proxy {tuple(p.shape)}")
                p.copy_(torch.from_numpy(np.ascontiguousarray(src)))
        self.params = {s.name: np.array(loaded[s.name], dtype=np.float32) for s in self._mutable}

    def _changed(self, names: Iterable[str]) -> None:
        with torch.no_grad():
            for n in names:
                self._torch[n].copy_(torch.from_numpy(self.params[n]))

    def seed_dropout(self, seed: int) -> None:
        # torch's dropout draws from its global generator, shared, like onnxruntime's, by the
        # sessions training at once in this process
        torch.manual_seed(int(seed) % (1 << 63))

    def reset(self) -> None:
        """The bundle's adapters and FFN weights and a fresh optimizer, as a newly opened session."""
        self._reload()

    # ---------------------------------------------------------------- steps
    def _inputs(self, batch: Batch) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])).to(self.device) for n in self.manifest.input.names]

    def _forward(self, batch: Batch, stats: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """fp32 logits and, if asked, the statistics (always counted in fp32: a bf16 count stops at 256)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits, mask = self.graph.logits(*self._inputs(batch))
        return logits.float(), (self.graph.statistics(mask, torch.float32) if stats else [])

    def _threads(self) -> None:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def train_step(self, batch: Batch) -> StepOutput:
        """Forward + backward, then the device's AdamW step on the fp32 master copy."""
        self._threads()
        self.graph.train()
        for n in self._trainable:
            self._torch[n].grad = None
        logits, counts = self._forward(batch, stats=True)
        labels = torch.from_numpy(np.asarray(batch.labels, dtype=np.int64)).to(self.device)
        loss_t = F.cross_entropy(logits, labels)
        loss_t.backward()
        loss = float(loss_t.detach())
        if math.isfinite(loss):  # a NaN step must not poison the weights
            grads = {n: _grad(self._torch[n]) for n in self._trainable}
            self.optimizer.step(grads)
            self._changed(self._trainable)
        stats = {  # to the host before float64: MPS has no float64
            layer: (counts[2 * k].detach().cpu().double().numpy(), float(counts[2 * k + 1].detach()))
            for k, (_p, layer) in enumerate(self._stat_layers)
        }
        return StepOutput(loss, logits.detach().cpu().numpy(), stats)

    def predict(self, batch: Batch) -> np.ndarray:
        self._threads()
        self.graph.eval()
        with torch.no_grad():
            return self._forward(batch, stats=False)[0].cpu().numpy()


__all__ = ["PRECISIONS", "AdapterError", "TorchSession"]
