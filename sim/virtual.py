"""`fedpft-cloud simulate --engine virtual`: the same federation, with the broker and the device
processes gone.

Each client is the real edge agent (`EdgeAgent` + the edge's own ORT trainer on the lowered
graph), on a thread of this process, talking to the cloud's real `Federation` over an
`InMemoryHub`. So the wire protocol, validation, bounds, aggregation, alignment and metrics are
the production code paths; only sockets, the broker and process start-up (an interpreter, imports
and an ORT session per device) are saved, and the MQTT round trips of every blob chunk.

The clients share the machine through `fedpft.sim.pool`: at most `parallel` of them train at once
(largest shard first), each on an ORT session kept across rounds and reset to its opened state,
with the cores split among them; with more than one at once, in worker processes
(`fedpft.sim.workers`: a seeded run then repeats bit for bit, dropout included). On a CUDA
`--device` the sessions run on onnxruntime's CUDA provider when the installed onnxruntime has one.
Which client trains when, and on which session object, changes nothing in an update: a round is a
function of the task and the shard.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

from fedpft.cloud.config import ServeConfig
from fedpft.shared import topics
from fedpft.shared.config import AgentConfig
from fedpft.shared.messages import Presence, encode
from fedpft.shared.transport import InMemoryHub, InMemoryTransport, TransportError

from .pool import SessionPool, cores
from .workers import WorkerPool

log = logging.getLogger("fedpft.simulate")


class _DeviceThreads(logging.Filter):
    """Records made on a device's threads (its agent loop and its transport's dispatcher)."""

    def __init__(self, names: set[str], keep: bool, min_level: int = logging.NOTSET):
        super().__init__()
        self.names, self.keep, self.min_level = names, keep, min_level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.threadName in self.names
        return ours if self.keep else (not ours or record.levelno >= self.min_level)


@contextmanager
def device_logs(devices: dict[str, Path]):
    """Each device's log in its own agent.log, as the process engine writes it; the console gets
    only the devices' warnings, so N agents' round chatter does not drown the cloud's."""
    root, fedpft_log, agent_log = logging.getLogger(), logging.getLogger("fedpft"), logging.getLogger("fedpft.agent")
    # a device process logs at INFO (edge/cli.py); its agent.log must not depend on the caller's levels
    agent_level = agent_log.level
    if agent_log.getEffectiveLevel() > logging.INFO:
        agent_log.setLevel(logging.INFO)
    files, all_names = [], set()
    for dev, path in devices.items():
        names = {dev, f"dispatch-{dev}"}
        all_names |= names
        h = logging.FileHandler(path, mode="w", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h.addFilter(_DeviceThreads(names, keep=True))
        files.append(h)
        fedpft_log.addHandler(h)
    quiet = _DeviceThreads(all_names, keep=False, min_level=logging.WARNING)
    console = list(root.handlers)
    for h in console:
        h.addFilter(quiet)
    try:
        yield
    finally:
        agent_log.setLevel(agent_level)
        for h in console:
            h.removeFilter(quiet)
        for h in files:
            fedpft_log.removeHandler(h)
            h.close()


def _offline(run_id: str, dev: str, reason: str) -> tuple[str, bytes]:
    bye = Presence(run_id=run_id, sender=dev, device_id=dev, status="offline", reason=reason)
    return topics.device_topic(run_id, dev, topics.PRESENCE), encode(bye)


class VirtualDevice:
    """One edge agent on a thread, on a hub transport with the last will a real device leaves."""

    def __init__(self, hub: InMemoryHub, cfg: AgentConfig, pool: SessionPool | WorkerPool | None = None):
        from fedpft.edge.agent import EdgeAgent
        from fedpft.edge.task_training import make_trainer, rough_sample_count

        self.cfg = cfg
        # the client id doubles as the dispatcher thread's name, which device_logs routes by
        self.transport = InMemoryTransport(hub, cfg.device_id, will=_offline(cfg.run_id, cfg.device_id, "connection lost"))
        samples = rough_sample_count(cfg.data)
        trainer = make_trainer(cfg) if pool is None else pool.trainer(cfg, weight=samples)
        self.make_agent = lambda: EdgeAgent(cfg, self.transport, trainer, samples)
        self.agent = None
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name=cfg.device_id, daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            # made on the device's thread, so what it logs (the trust-key warning) lands in its agent.log
            self.agent = self.make_agent()
            self.agent.finished = self.stopping
            self.transport.connect()
            self.agent.serve()
        except BaseException as exc:  # noqa: BLE001 - a dead device must look dead to the cloud, as a crashed process does
            self.error = exc
            log.error("virtual device %s stopped: %s: %s", self.cfg.device_id, type(exc).__name__, exc, exc_info=True)
            self.transport.abort()  # the hub publishes the last will: the cloud stops waiting for it
            return
        topic, bye = _offline(self.cfg.run_id, self.cfg.device_id, "run ended")
        try:
            self.transport.publish(topic, bye, retain=True)
        except TransportError:
            pass
        self.transport.close()

    def stop(self) -> None:
        self.stopping = True
        if self.agent is not None:
            self.agent.finished = True  # the agent's loop looks at this at least once a second


def ort_providers(device: str) -> tuple[str, ...]:
    """The virtual clients' onnxruntime providers for the cloud's torch `--device`: CUDA when that
    is a CUDA GPU and the installed onnxruntime has the CUDA provider, else CPU."""
    from fedpft.cloud.device import resolve_device

    if resolve_device(device).type != "cuda":
        return ("cpu",)
    from fedpft.edge.runtime import ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log.warning("--device %s: this onnxruntime %s has no CUDA provider; the virtual clients train on CPU", device, ort.__version__)
        return ("cpu",)
    return ("cuda",)


def pick_trainer(trainer: str, device: str, precision: str = "fp32") -> str:
    """`auto`: the edge's own ORT trainer on CPU in fp32 (what devices run, bit for bit); the torch
    trainer on a GPU (torch's wheel brings the CUDA libraries it runs on; onnxruntime-training's CUDA
    provider needs a system CUDA and cuDNN of the versions it was built with) or for bf16."""
    if trainer != "auto":
        return trainer
    from fedpft.cloud.device import resolve_device

    return "ort" if resolve_device(device).type == "cpu" and precision == "fp32" else "torch"


def torch_opener(source: Path, device: str, precision: str):
    """SessionPool opener of `TorchSession`s on the cloud's torch device."""
    import torch

    from fedpft.cloud.device import resolve_device

    from .torch_session import check_precision

    where = resolve_device(device)
    log.info("torch trainer on %s", where)
    problem = check_precision(where, precision)
    if problem and where.type == "cuda":
        raise ValueError(f"--virtual-precision {precision}: {problem}; use fp32")
    if problem:
        log.warning("--virtual-precision %s: %s", precision, problem)
    if where.type == "cuda" and precision == "fp32":
        # parity mode: true fp32 as on devices, not TF32 (process-wide: the run is this process's job)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def open_(bundle_dir: Path, threads: int | None):
        from fedpft.shared.manifest import BundleManifest

        from .torch_session import TorchSession

        return TorchSession(bundle_dir, BundleManifest.load(bundle_dir), source, where, precision, threads)

    return open_


def plan_parallel(parallel: int | None, clients: int) -> tuple[int, int]:
    """(clients training at once, ORT intra-op threads each): by default one client per core, one
    thread each (independent clients fill the cores with no intra-op synchronisation), never more
    than there are clients; the cores are split evenly among the slots."""
    n = cores()
    slots = max(1, min(clients, parallel or n))
    return slots, max(1, n // slots)


def serve_virtual(serve_cfg: ServeConfig, shards: list[Path], run: Path, show_progress: bool = True,
                  parallel: int | None = None, trainer: str = "auto", precision: str = "fp32"):
    """Run the federation with one in-process edge agent per shard; returns the final RunState.
    parallel: clients training at once (default: the cores); trainer: ort | torch | auto
    (`pick_trainer`); precision: the torch trainer's fp32 | bf16."""
    from fedpft.cloud.serve import serve

    trainer = pick_trainer(trainer, serve_cfg.device, precision)
    slots, threads = plan_parallel(parallel, len(shards))
    if trainer == "torch":
        pool = SessionPool(slots, threads, opener=torch_opener(serve_cfg.bundle, serve_cfg.device, precision))
        providers = ("cpu",)  # unused by a torch session; what the agents' configs say
        log.info("virtual clients: %d training at once on the torch trainer (%s), %d thread(s) each", slots, precision, threads)
    else:
        if precision != "fp32":
            raise ValueError(f"--virtual-precision {precision} needs the torch trainer (the ORT trainer is fp32, as on devices)")
        providers = ort_providers(serve_cfg.device)
        # one client at a time per process, so each draws the dropout masks a device would (sim/workers.py)
        pool = SessionPool(slots, threads, providers) if slots == 1 else WorkerPool(slots, threads, providers)
        log.info("virtual clients: %d training at once%s, %d ORT thread(s) each, on %s", slots,
                 "" if slots == 1 else " in worker processes", threads, ", ".join(providers))
    hub = InMemoryHub(threaded=True)
    devices = []
    for i, shard in enumerate(shards):
        dev = f"client{i:03d}"
        cfg = AgentConfig(broker="memory://", device_id=dev, data=shard, cache=run / "clients" / dev / "cache",
                          run_id=serve_cfg.run_id, threads=threads, providers=providers)
        devices.append(VirtualDevice(hub, cfg, pool))
    with device_logs({d.cfg.device_id: run / "clients" / d.cfg.device_id / "agent.log" for d in devices}):
        for d in devices:
            d.thread.start()
        try:
            state = serve(serve_cfg, show_progress=show_progress, transport=hub.transport(f"fedpft-cloud-{serve_cfg.run_id}"))
        finally:
            try:
                for d in devices:
                    d.stop()
                for d in devices:
                    d.thread.join(timeout=60)
                    if d.thread.is_alive():
                        log.warning("virtual device %s still busy after the run; left behind", d.cfg.device_id)
            finally:
                pool.close()  # also on a second Ctrl-C: a process running simulate() again keeps no idle workers
    return state
