"""Scale benchmark: one federated round with N simulated devices over a real MQTT broker.

The cloud is the real `Federation` (cloud/server.py) on an `MqttTransport`; the devices are
`simdevice.SimDevice`s — real MQTT clients, one connection and client id each, exchanging
real-sized blobs with the real protocol, but "training" by sleeping. Devices live in worker
processes (about 250 per process), the cloud in this one, so the cloud's RSS is its own.

    python benchmarks/scale.py --devices 10 100 1000 --bundle /tmp/scale-bundle --write BENCHMARKS.md

`--bundle` is a real bundle (`fedpft-cloud prepare --model minilm --out /tmp/scale-bundle
--num-labels 13 --distill-steps 0 -q`); without it a synthetic bundle-shaped folder with the
MiniLM r=8 adapter shapes is written (fast, no torch; what the smoke test uses).

Times (unix clock, one machine, so device and cloud clocks agree):
- t_start: the cloud starts sending the round (the broadcast of its adapters, then the Task;
  the Task alone when it does not broadcast); t_task: the cloud publishes the Task; t_end:
  `run_round` returns (FedAvg done, checkpoint and state committed).
- round wall = t_end - t_start.
- slowest device's work = max over devices of its simulated training time (what the round
  would take with an infinitely fast cloud, broker and network).
- overhead = round wall - slowest device's work: everything the federation adds (task fan-out,
  adapters download, upload, validation, acks, aggregation, commit), including CPU contention
  with the simulated fleet when they share a machine.
- also the brief's form: round wall - max over devices of (Task received -> update Ack received),
  i.e. the part of the round outside every device's own window (fan-out + close).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # simdevice, also in spawned workers

from simdevice import WorkerSpec, run_worker  # noqa: E402

from fedpft.cloud.provision import BROKER_MAX_INFLIGHT  # noqa: E402  (light: shared only)
from fedpft.shared import topics  # noqa: E402
from fedpft.shared.allocator import broker_malloc_env  # noqa: E402
from fedpft.shared.codec import encode_tensors  # noqa: E402
from fedpft.shared.manifest import (  # noqa: E402
    RUNTIME_PLAIN,
    BundleManifest, InputSpec, TensorSpec, file_entry, verify_bundle,
)
from fedpft.shared.mqtt import MqttTransport  # noqa: E402
from fedpft.shared.transport import Handler  # noqa: E402

log = logging.getLogger("fedpft.bench.scale")

SHARED_LINK_PER_WORKER = 250  # one connection and one dispatcher thread each: the GIL is what a process shares
MIN_SHARED_LINK_PER_WORKER = 25


def shared_link_per_worker(devices: int, fleet_cpus: int) -> int:
    """Devices per fleet process on a shared link: enough processes to use the fleet's CPUs (a link
    handles its devices' Tasks and updates one after another, and on 16 cores 250 per link left the
    fleet 4 processes: the Task reached the last device 1.2 s late, BENCHMARKS.md scale, session 11),
    never more than SHARED_LINK_PER_WORKER (a 2-core machine keeps its 250) nor fewer than 25."""
    return max(MIN_SHARED_LINK_PER_WORKER, min(SHARED_LINK_PER_WORKER, math.ceil(devices / max(1, fleet_cpus))))
DEVICES_PER_WORKER = 25  # one MQTT connection = 2 threads; more per process and the GIL convoys (see BENCHMARKS.md)
BEGIN, END = "<!-- scale -->", "<!-- /scale -->"


# ---- a bundle-shaped folder without torch ------------------------------------------------------


def synthetic_bundle(folder: Path, layers: int = 6, hidden: int = 384, rank: int = 8, labels: int = 13) -> Path:
    """A folder `verify_bundle` accepts, with MiniLM's adapter shapes (LoRA r on query, key,
    value, attention.output.dense of every layer, plus the classifier); the ONNX files are
    placeholders, which the cloud only hashes and packs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trainable: list[TensorSpec] = []
    modules = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    for layer in range(layers):
        for mod in modules:
            for part, shape in (("lora_A", (rank, hidden)), ("lora_B", (hidden, rank))):
                key = f"base_model.model.bert.encoder.layer.{layer}.{mod}.{part}.weight"
                trainable.append(TensorSpec(name=key.replace(f".{part}.", f".{part}.default."), key=key, shape=shape))
    trainable += [TensorSpec(name="classifier.weight", key="base_model.model.classifier.weight", shape=(labels, hidden)),
                  TensorSpec(name="classifier.bias", key="base_model.model.classifier.bias", shape=(labels,))]
    rng = np.random.default_rng(0)
    init = {t.key: (0.02 * rng.standard_normal(t.shape)).astype(np.float32) for t in trainable}
    (folder / "adapters_init.safetensors").write_bytes(encode_tensors(init))
    files = {"adapters_init": "adapters_init.safetensors"}
    for role, name, size in (("training_model", "training_model.onnx", 4096), ("eval_model", "eval_model.onnx", 4096),
                             ("parameters", "parameters.safetensors", 65536)):
        (folder / name).write_bytes(rng.bytes(size))
        files[role] = name
    m = BundleManifest(
        bundle_id=uuid.uuid4().hex, created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), fm_id="synthetic-minilm",
        family="bert", labels=[f"LABEL_{i}" for i in range(labels)], input=InputSpec(kind="text", names=("input_ids", "attention_mask")),
        trainable=trainable, files={role: file_entry(folder, rel) for role, rel in files.items()}, runtime=RUNTIME_PLAIN,
    )
    m.save(folder)
    verify_bundle(folder)
    return folder


# ---- measuring the cloud -------------------------------------------------------------------------


class CountingTransport:
    """Wraps the cloud's Transport: counts messages and bytes both ways, notes when the Task goes out."""

    def __init__(self, inner, run_id: str) -> None:
        self.inner, self.round_topic = inner, topics.round_topic(run_id)
        self.blob_prefix = topics.blob_topic(run_id, "x")[:-1]
        self.started_at: float | None = None  # the round's first publish: its broadcast, else the Task
        self.lock = threading.Lock()
        self.msgs_out = self.msgs_in = self.bytes_out = self.bytes_in = 0
        self.task_published_at: float | None = None
        self.inbox_published: list[float] = []  # when each inbox message's publish returned (Tasks first, then receipts)
        self.at_task: tuple[int, int, int, int] | None = None  # counters when the Task went out

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def connect(self) -> None:
        self.inner.connect()

    def close(self) -> None:
        self.inner.close()

    def counters(self) -> tuple[int, int, int, int]:
        with self.lock:
            return self.msgs_out, self.msgs_in, self.bytes_out, self.bytes_in

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        if self.started_at is None and (topic == self.round_topic or topic.startswith(self.blob_prefix)):
            self.started_at, self.at_task = time.time(), self.counters()
        # the Task: on the round topic, or (a round past 64 devices) its first copy in a device's
        # inbox, the first inbox message of the round (receipts come only after uploads)
        if topic == self.round_topic or (self.task_published_at is None and topic.endswith("/" + topics.INBOX)):
            self.task_published_at = time.time()
        self.inner.publish(topic, payload, qos=qos, retain=retain, wait=wait)
        if topic.endswith("/" + topics.INBOX):
            self.inbox_published.append(time.time())
        with self.lock:
            self.msgs_out += 1
            self.bytes_out += len(payload)

    def subscribe(self, pattern: str, handler: Handler) -> None:
        def counted(topic: str, payload: bytes) -> None:
            with self.lock:
                self.msgs_in += 1
                self.bytes_in += len(payload)
            handler(topic, payload)

        self.inner.subscribe(pattern, counted)

    def unsubscribe(self, pattern: str) -> None:
        self.inner.unsubscribe(pattern)

    def join(self, timeout: float | None = 10.0) -> bool:
        return self.inner.join(timeout)


def timed_federation_class():
    """The real Federation, noting when `run_round` returns and sampling RSS meanwhile. The cloud is
    imported here, not at module level: every spawned device worker re-imports this module, and the
    cloud's imports cost each of them ~70 MB of RSS it never uses (5 GB at 1,000 devices)."""
    from fedpft.cloud.server import Federation

    class TimedFederation(Federation):
        round_ended: float | None = None
        cpu_s: float = 0.0
        usage: dict = {}

        def run_round(self, state, bundle_ref):  # type: ignore[no-untyped-def]
            sampler = RssSampler()
            sampler.start()
            cpu0, use0 = _cpu_s(), _usage()
            checkers = [w.proc.pid for w in self.checks.workers] if self.checks is not None else []
            check0 = sum(_proc_cpu_s(p) for p in checkers)
            split0 = [_proc_user_system_s(p) for p in checkers]
            threads0 = _thread_cpu_s()
            try:
                return super().run_round(state, bundle_ref)
            finally:
                self.round_ended = time.time()
                self.cpu_s = _cpu_s() - cpu0
                self.usage = {k: v - use0[k] for k, v in _usage().items()}
                self.rss_peak = sampler.stop()
                # --check-processes: their CPU and memory are the cloud's too (counted apart, then added)
                self.check_cpu_s = sum(_proc_cpu_s(p) for p in checkers) - check0
                self.check_rss_peaks = [_status_kb(p, "VmHWM") * 1024 for p in checkers]
                self.check_rss_peak = sum(self.check_rss_peaks)
                self.usage["main_process_cpu_s"] = self.cpu_s
                # where the main process's CPU went, by thread (its network thread, dispatcher, loop, ...)
                by_thread: dict[str, float] = {}
                for name, cpu in _thread_cpu_s().items():
                    kind = _thread_kind(name)
                    by_thread[kind] = round(by_thread.get(kind, 0.0) + cpu - threads0.get(name, 0.0), 3)
                self.usage["main_process_threads_cpu_s"] = dict(sorted(by_thread.items(), key=lambda kv: -kv[1]))
                self.usage["check_processes_cpu_s"] = self.check_cpu_s
                # user vs system of the check processes: their fsyncs and pipe reads are system time
                split = [_proc_user_system_s(p) for p in checkers]
                self.usage["check_processes_user_system_s"] = [round(sum(a[i] - b[i] for a, b in zip(split, split0)), 2) for i in (0, 1)]
                self.cpu_s += self.check_cpu_s

    return TimedFederation


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds of each live Python thread of this process (by name, from /proc's per-task stat)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
            out[f"{t.name}#{t.native_id}"] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError, TypeError):
            pass
    return out


def _thread_kind(name: str) -> str:
    """A thread's role, without its number: check threads, check-process pipes, paho's network thread..."""
    base = name.split("#")[0]
    for prefix, kind in (("fedpft-check_", "check threads"), ("fedpft-check-", "check-process pipe threads"),
                         ("paho-mqtt-client", "MQTT network thread (paho)"), ("MainThread", "round loop"),
                         ("dispatch-", "MQTT dispatcher (message handlers)"), ("blob-sender-", "blob sender"),
                         ("fedpft-fold-saver", "fold saver"), ("rss-sampler", "benchmark's RSS sampler")):
        if base.startswith(prefix):
            return kind + (" (send)" if kind.startswith("check-process") and base.endswith("-send") else
                           " (read)" if kind.startswith("check-process") else "")
    return base.rstrip("0123456789_-") or base


def _cpu_s() -> float:
    u = _usage()
    return u["user_s"] + u["system_s"]


def _usage() -> dict:
    """Where the cloud's CPU time goes, beyond its total: user vs system, page faults (memory first
    touched: large buffers allocated per update), context switches (threads handing off the GIL)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": ru.ru_utime, "system_s": ru.ru_stime, "minor_faults": ru.ru_minflt,
            "voluntary_switches": ru.ru_nvcsw, "involuntary_switches": ru.ru_nivcsw}


def _status_kb(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    def __init__(self, period: float = 0.05) -> None:
        self.period, self.peak = period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("self", "VmRSS") * 1024)
            self._stop.wait(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kb("self", "VmRSS") * 1024)


class OwnBroker:
    """A private Mosquitto on a free port with our settings (the machine's broker keeps its own)."""

    def __init__(self, max_queued: int, max_inflight: int = 20, binary: str = "mosquitto", reuse_buffers: bool = True,
                 cpus: tuple[int, ...] = ()) -> None:
        self.max_queued, self.max_inflight, self.binary = max_queued, max_inflight, binary
        self.reuse_buffers, self.cpus = reuse_buffers, cpus
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    def __enter__(self) -> "OwnBroker":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="fedpft-scale-broker-"))
        conf = self.dir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"max_queued_messages {self.max_queued}\nmax_inflight_messages {self.max_inflight}\n"
                        f"log_dest file {self.dir / 'mosquitto.log'}\n")
        env = {**os.environ, **(broker_malloc_env() if self.reuse_buffers else {})}
        self.proc = subprocess.Popen([shutil.which(self.binary) or "/usr/sbin/mosquitto", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        end = time.time() + 10
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def drops(self) -> int:
        """Lines where Mosquitto says it dropped a client's outgoing messages."""
        log_file = self.dir / "mosquitto.log" if self.dir else None
        return log_file.read_text().count("Outgoing messages are being dropped") if log_file and log_file.is_file() else 0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _proc_cpu_s(pid: int | None) -> float:
    """user + system CPU seconds of another process (0 when unknown)."""
    return sum(_proc_user_system_s(pid))


def _proc_user_system_s(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of another process ((0, 0) when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0, 0.0


def _broker_pid() -> int | None:
    for p in ("/run/mosquitto/mosquitto.pid", "/var/run/mosquitto/mosquitto.pid"):
        try:
            return int(Path(p).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


# ---- one run -----------------------------------------------------------------------------------


@dataclass
class ScaleConfig:
    devices: int
    bundle: Path
    broker: str = "mqtt://127.0.0.1:1883"
    train_s: float = 2.0
    jitter_s: float = 0.5
    per_worker: int = DEVICES_PER_WORKER
    round_timeout: float = 300.0
    task_ack_timeout: float = 30.0  # serve's default
    ready_timeout: float = 180.0
    seed: int = 0
    broker_pid: int | None = None  # whose RSS to report; default: the system Mosquitto's pid file
    broker_label: str = "system"
    shared_broadcast: bool = False  # see WorkerSpec.shared_broadcast
    shared_link: bool = False  # see WorkerSpec.shared_link
    fleet_nice: int = 0  # see WorkerSpec.nice
    # CPUs of the cloud process, and of the device workers (empty: wherever the kernel puts them)
    cloud_cpus: tuple[int, ...] = ()
    fleet_cpus: tuple[int, ...] = ()
    device_ack_timeout: float = 30.0  # the devices' receipt timeout (WorkerSpec.ack_timeout)
    max_upload_buffer: int | None = None  # serve's --max-upload-buffer (None: its default)
    check_processes: int = 0  # serve's --check-processes


def _by_worker(got: list[dict], t_task: float) -> list[list[float]]:
    ws: dict[int, list[float]] = {}
    for d in got:
        ws.setdefault(d.get("worker", 0), []).append(d["task_at"] - t_task)
    return [ws[k] for k in sorted(ws)]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run_scale(sc: ScaleConfig) -> dict:
    """One round with `sc.devices` simulated devices; returns the measurements (see module doc)."""
    from fedpft.cloud.config import ServeConfig
    from fedpft.cloud.fanout import CLOUD_MAX_INFLIGHT

    TimedFederation = timed_federation_class()  # imported before the idle RSS is read
    manifest = BundleManifest.load(sc.bundle)
    expected = {t.key: (tuple(t.shape), t.dtype) for t in manifest.trainable}
    stat_layers = {s.layer: s.neurons for s in manifest.stat_outputs}
    run_id = f"scale{sc.devices}-{uuid.uuid4().hex[:8]}"
    ids = [f"sim-{run_id[-8:]}-{i:05d}" for i in range(sc.devices)]
    n_workers = max(1, math.ceil(sc.devices / sc.per_worker))
    ctx = mp.get_context("spawn")  # workers must not inherit the cloud's memory or threads
    workers = []
    t_start = time.time()
    for w in range(n_workers):
        spec = WorkerSpec(broker=sc.broker, run_id=run_id, device_ids=ids[w::n_workers], expected=expected,
                          stat_layers=stat_layers, train_s=sc.train_s, jitter_s=sc.jitter_s, seed=sc.seed * 1000 + w,
                          shared_broadcast=sc.shared_broadcast, shared_link=sc.shared_link, nice=sc.fleet_nice, cpus=sc.fleet_cpus,
                          ack_timeout=sc.device_ack_timeout)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=run_worker, args=(spec, child), name=f"simdev-{w}", daemon=True)
        proc.start()
        workers.append((proc, parent))
    out = Path(tempfile.mkdtemp(prefix=f"fedpft-{run_id}-"))
    cloud = None
    try:
        ready = []
        for proc, conn in workers:
            if not conn.poll(sc.ready_timeout):
                raise RuntimeError(f"worker {proc.name} not ready after {sc.ready_timeout:.0f}s")
            ready.append(conn.recv()[1])
        n_err = sum(r["n_errors"] for r in ready)
        if n_err:
            raise RuntimeError(f"{n_err} devices failed to connect, e.g. {ready[0]['errors'] or [r['errors'] for r in ready]}")
        fleet_up_s = time.time() - t_start

        cfg = ServeConfig(bundle=sc.bundle, out=out / "run", broker=sc.broker, run_id=run_id, rounds=1, min_clients=sc.devices,
                          clients_per_round=sc.devices, round_timeout=sc.round_timeout, wait_for_clients=60.0, max_round_retries=0,
                          task_ack_timeout=sc.task_ack_timeout, seed=sc.seed,
                          check_processes=sc.check_processes,
                          **({"max_upload_buffer": sc.max_upload_buffer} if sc.max_upload_buffer else {}))
        broker_pid = sc.broker_pid or _broker_pid()
        broker_rss0 = _status_kb(broker_pid, "VmRSS") * 1024 if broker_pid else 0
        cloud = CountingTransport(MqttTransport(sc.broker, client_id=f"fedpft-cloud-{run_id}", session_expiry=120,
                                                 max_inflight=CLOUD_MAX_INFLIGHT), run_id)
        cloud.connect()
        rss_idle = _status_kb("self", "VmRSS") * 1024
        fed = TimedFederation(cfg, cloud, show_progress=False)
        for proc, conn in workers:
            conn.send(("mark", None))
        broker_cpu0 = _proc_cpu_s(broker_pid)
        state = fed.run()
        broker_cpu = _proc_cpu_s(broker_pid) - broker_cpu0
        broker_rss1 = _status_kb(broker_pid, "VmRSS") * 1024 if broker_pid else 0
        # a retained EndOfRun is right for a real run; on a shared benchmark broker, clear it
        cloud.publish(topics.control_topic(run_id), b"", retain=True)

        timings, worker_rss, fleet_cpu = [], [], 0.0
        for proc, conn in workers:
            conn.send(("collect", 30.0))
        for k, (proc, conn) in enumerate(workers):
            if not conn.poll(60.0):
                raise RuntimeError(f"worker {proc.name} sent no results")
            _, tms, info = conn.recv()
            timings += [{**d, "worker": k} for d in tms]
            worker_rss.append(info["rss"])
            fleet_cpu += info["cpu_s"]
    finally:
        if cloud is not None:
            cloud.close()  # first: devices clearing their retained presence are no news to the cloud
        for proc, conn in workers:
            try:
                conn.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
        for proc, conn in workers:
            try:
                if conn.poll(60.0):
                    conn.recv()
            except (EOFError, OSError):
                pass
            proc.join(10.0)
            if proc.is_alive():
                proc.terminate()
        shutil.rmtree(out, ignore_errors=True)

    record = state.history[-1]
    t_start, t_task, t_end = cloud.started_at, cloud.task_published_at, fed.round_ended
    assert t_start is not None and t_task is not None and t_end is not None
    wall = t_end - t_start
    m_out0, m_in0, b_out0, b_in0 = cloud.at_task or (0, 0, 0, 0)
    m_out, m_in, b_out, b_in = cloud.counters()
    acked = [d for d in timings if d["acked_at"] is not None and d["ack_ok"]]
    got = [d for d in timings if d["task_at"] is not None]
    fetched = [d for d in timings if d["fetched_at"] is not None]
    uploaded = [d for d in acked if d["trained_at"] is not None]
    window = [d["acked_at"] - d["task_at"] for d in acked]
    max_train = max((d["train_s"] for d in fetched), default=0.0)
    last_ack = max((d["acked_at"] for d in acked), default=t_end)
    fleet_msgs = sum(d["msgs_out"] + d["msgs_in"] for d in timings)
    # Every device publish is on a topic the cloud subscribes to; only the Hellos sent before
    # the cloud subscribed are missed by design (devices say hello again when the cloud clears
    # the retained control topic, and only a Hello makes them eligible).
    device_to_cloud = sum(d["msgs_out"] for d in timings) - len(timings)
    res = {
        "devices": sc.devices,
        "broker": sc.broker_label + (", shared broadcast" if sc.shared_broadcast and not sc.shared_link else "")
        + (f", one connection per {sc.per_worker} devices" if sc.shared_link else "")
        + (f", fleet nice {sc.fleet_nice}" if sc.fleet_nice else "")
        + (f", cloud on CPU {','.join(map(str, sc.cloud_cpus))}" if sc.cloud_cpus else "")
        + (f", upload buffer {sc.max_upload_buffer / 2**20:.0f} MiB" if sc.max_upload_buffer else "")
        + (f", {sc.check_processes} check processes" if sc.check_processes else ""),
        "workers": n_workers,
        "accepted": record["clients"],
        "acked_ok": len(acked),
        "fetched": len(fetched),
        "fleet_up_s": fleet_up_s,
        "round_wall_s": wall,
        "max_train_s": max_train,
        "overhead_s": wall - max_train,
        "overhead_outside_device_windows_s": wall - max(window, default=0.0),
        "fanout_p50_s": _pct([d["task_at"] - t_task for d in got], 50),
        "fanout_max_s": _pct([d["task_at"] - t_task for d in got], 100),
        # the cloud's side of an addressed fan-out: its last Task copy handed to paho (the loop
        # publishes the copies back to back, before any receipt)
        "tasks_handed_s": (cloud.inbox_published[min(sc.devices, len(cloud.inbox_published)) - 1] - t_task
                           if sc.devices > 64 and cloud.inbox_published else None),
        # when the Tasks arrived, by device worker (its devices share a process and, with a shared
        # link, one connection): a worker far behind the others is the fleet's queue, not the cloud's
        "fanout_by_worker_p50_max_s": [[round(_pct(w, 50), 3), round(_pct(w, 100), 3)] for w in _by_worker(got, t_task)],
        "fanout_net_p50_max_s": [round(_pct(xs, q), 3) for xs in [[d["task_net_at"] - t_task for d in got if d.get("task_net_at")]] if xs for q in (50, 100)],
        "fetch_p50_s": _pct([d["fetched_at"] - d["task_at"] for d in fetched], 50),
        "fetch_max_s": _pct([d["fetched_at"] - d["task_at"] for d in fetched], 100),
        "upload_ack_p50_s": _pct([d["acked_at"] - d["trained_at"] for d in uploaded], 50),
        "upload_ack_max_s": _pct([d["acked_at"] - d["trained_at"] for d in uploaded], 100),
        "close_s": t_end - last_ack,
        "blob_requests": sum(d["blob_requests"] for d in timings),
        "broadcast_s": t_task - t_start,
        "resent_chunks": fed.blobs.resent_chunks,
        "resends_merged": fed.blobs.queue.merged,
        "uploads": sum(d["uploads"] for d in timings),
        "queued_notices": sum(d.get("queued", 0) for d in timings),
        "busy_notices": sum(d.get("busy", 0) for d in timings),
        "cloud_rss_idle_mb": rss_idle / 2**20,
        "cloud_rss_peak_round_mb": (fed.rss_peak + fed.check_rss_peak) / 2**20,  # with its check processes' peaks
        "cloud_rss_peak_main_mb": fed.rss_peak / 2**20,
        "check_processes_rss_peak_mb": [r / 2**20 for r in fed.check_rss_peaks],
        "cloud_cpu_round_s": fed.cpu_s,
        "cloud_usage_round": fed.usage,
        # the whole run (hellos, round, EndOfRun), not only the round as for the cloud
        "broker_cpu_s": broker_cpu,
        "fleet_cpu_s": fleet_cpu,
        "broker_rss_delta_mb": (broker_rss1 - broker_rss0) / 2**20,
        "worker_rss_mb": [r / 2**20 for r in worker_rss],
        "bytes_up_mb": record["bytes_up"] / 1e6,
        "bytes_down_mb": record["bytes_down"] / 1e6,
        "cloud_bytes_in_mb": (b_in - b_in0) / 1e6,
        "cloud_bytes_out_mb": (b_out - b_out0) / 1e6,
        "cloud_msgs": (m_in - m_in0) + (m_out - m_out0),
        "cloud_msgs_per_s": ((m_in - m_in0) + (m_out - m_out0)) / wall,
        "fleet_msgs_per_s": fleet_msgs / wall,
        "dropped_to_cloud": max(0, device_to_cloud - m_in),
        "errors": sorted({d["error"] for d in timings if d["error"]})[:3],
    }
    return res


def _isolated_child(sc: ScaleConfig, conn) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if sc.cloud_cpus:  # this process is the cloud's alone (its device workers pin themselves elsewhere)
        os.sched_setaffinity(0, sc.cloud_cpus)
    try:
        conn.send(("ok", run_scale(sc)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def run_isolated(sc: ScaleConfig) -> dict:
    """`run_scale` in a fresh process, so each run's cloud RSS starts from nothing."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_isolated_child, args=(sc, child), name=f"scale-cloud-{sc.devices}")
    proc.start()
    try:
        kind, value = parent.recv()
    except EOFError:
        kind, value = "error", f"cloud process died (exit code {proc.exitcode})"
    proc.join(30)
    if kind != "ok":
        raise RuntimeError(value)
    return value


# ---- report ------------------------------------------------------------------------------------


def _f(x: float, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    cols = [
        ("devices", lambda r: str(r["devices"])),
        ("broker", lambda r: r.get("broker", "-")),
        ("accepted", lambda r: f"{r['accepted']}/{r['devices']}"),
        ("round wall s", lambda r: _f(r["round_wall_s"])),
        ("slowest device s", lambda r: _f(r["max_train_s"])),
        ("**overhead s**", lambda r: f"**{_f(r['overhead_s'])}**"),
        ("outside device windows s", lambda r: _f(r["overhead_outside_device_windows_s"])),
        ("task fan-out p50/max s", lambda r: f"{_f(r['fanout_p50_s'], 3)}/{_f(r['fanout_max_s'], 3)}"),
        ("adapters fetch p50/max s", lambda r: f"{_f(r['fetch_p50_s'])}/{_f(r['fetch_max_s'])}"),
        ("upload->ack p50/max s", lambda r: f"{_f(r['upload_ack_p50_s'])}/{_f(r['upload_ack_max_s'])}"),
        ("close s", lambda r: _f(r["close_s"], 3)),
        ("cloud RSS idle/peak MB", lambda r: f"{_f(r['cloud_rss_idle_mb'], 0)}/{_f(r['cloud_rss_peak_round_mb'], 0)}"),
        ("CPU s cloud/broker/fleet", lambda r: f"{_f(r['cloud_cpu_round_s'], 1)}/{_f(r.get('broker_cpu_s'), 1)}/{_f(r.get('fleet_cpu_s'), 1)}"),
        ("up/down MB", lambda r: f"{_f(r['bytes_up_mb'], 1)}/{_f(r['bytes_down_mb'], 1)}"),
        ("cloud msgs/s", lambda r: _f(r["cloud_msgs_per_s"], 0)),
        ("fleet msgs/s", lambda r: _f(r["fleet_msgs_per_s"], 0)),
        ("blob requests/re-sent chunks/re-uploads/queued/busy notices",
         lambda r: f"{r['blob_requests']}/{r.get('resent_chunks', '-')}/{r['uploads'] - r['devices']}/{r.get('queued_notices', '-')}/{r.get('busy_notices', '-')}"),
        ("msgs lost to cloud", lambda r: str(r["dropped_to_cloud"])),
    ]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fn(r) for _, fn in cols) + " |" for r in results]
    return "\n".join(lines)


def section(results: list[dict], command: str, bundle_note: str, notes: list[str]) -> str:
    cpu = os.cpu_count()
    return "\n".join([
        BEGIN,
        "## Scale: one round, N simulated devices over Mosquitto",
        "",
        f"Command: `{command}`  ",
        f"Bundle: {bundle_note}  ",
        f"Machine: {cpu} CPUs, Python {platform.python_version()}, Mosquitto on 127.0.0.1:1883; cloud, broker and "
        f"every simulated device share these CPUs. Devices: real MQTT 5 clients (one `MqttTransport` each, "
        f"{DEVICES_PER_WORKER} per worker process), simulated training {results[0]['train_s'] if results and 'train_s' in results[0] else 2}"
        " s +- jitter, no bundle download (cached), real adapters download and real-sized update upload.",
        "",
        table(results),
        "",
        "- **round wall**: cloud starts sending the round (broadcast of the adapters blob, then the Task) -> "
        "`Federation.run_round` returns (FedAvg, checkpoint and state committed).",
        "- **slowest device**: the longest simulated training time drawn; **overhead** = round wall - slowest device, i.e. "
        "everything the federation adds to the critical path.",
        "- **outside device windows** = round wall - max over devices of (Task received -> update Ack received): fan-out + close only.",
        "- fan-out: Task published -> received by device; fetch: Task received -> adapters blob verified "
        "(broadcast chunks kept ahead of the Task; a BlobRequest and a re-send on `resend/` only for what they lack); "
        "upload->ack: training over -> Ack(update) received; "
        "close: last Ack -> `run_round` returned.",
        "- RSS: cloud process (this one; devices run in other processes), idle = connected, before the Federation; "
        "peak = sampled every 50 ms during the round. up/down: the Federation's own counters (update chunks in, blob chunks out). "
        "msgs/s: MQTT messages in+out during the round at the cloud client, and summed over all device clients.",
        "",
        *[f"- {n}" for n in notes],
        END,
    ])


def write_section(path: Path, text: str) -> None:
    """`text` carries its own markers (see `section`); the one writer of BENCHMARKS.md sections does the rest."""
    from common import write_section as write_named

    write_named("scale", text.strip().removeprefix(BEGIN).removesuffix(END), path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--bundle", type=Path, default=None, help="a real bundle folder; default: a synthetic MiniLM-shaped one")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--train-s", type=float, default=2.0)
    ap.add_argument("--jitter-s", type=float, default=0.5)
    ap.add_argument("--brokers", nargs="+", default=["system"], metavar="system|MAX_QUEUED",
                    help="run every device count on each: 'system' = --broker; a number = a private Mosquitto with that "
                         "max_queued_messages (1000 is Mosquitto's default; 0 = unlimited)")
    ap.add_argument("--inflight", type=int, default=BROKER_MAX_INFLIGHT,
                    help="max_inflight_messages of a private Mosquitto: the window it grants each client (the cloud asks "
                         "for MQTT's largest); 0 = no maximum, as provision writes; 20 is Mosquitto's default")
    ap.add_argument("--broker-malloc", choices=["reuse", "default"], default="reuse",
                    help="a private Mosquitto's glibc malloc: 'reuse' = large buffers kept for reuse "
                         "(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, as docs/deployment.md recommends); "
                         "'default' = glibc's own thresholds")
    ap.add_argument("--fleet", choices=["clients", "shared-link"], default="clients",
                    help="'clients' = one real MQTT client (connection, network thread, dispatcher thread) per "
                         "simulated device; 'shared-link' = the devices of one worker process share one connection: "
                         "the same messages reach the cloud, at a fraction of the fleet's CPU on this machine (the "
                         "broker then serves one connection per process, so its own CPU is not a fleet's)")
    ap.add_argument("--fleet-nice", type=int, default=0,
                    help="nice value added to the simulated devices' processes: the cloud gets a core first when "
                         "both want one, as a cloud whose devices run elsewhere would (0 = same priority)")
    ap.add_argument("--pin-cloud", type=int, default=0, metavar="N",
                    help="the cloud process on this machine's first N CPUs, a private broker and the simulated devices "
                         "on the others: the cloud then has cores of its own, as beside a real fleet (0 = no pinning)")
    ap.add_argument("--per-worker", type=int, default=None,
                    help=f"devices per worker process (default {DEVICES_PER_WORKER}; with --fleet shared-link, the devices over the "
                         f"fleet's CPUs, between {MIN_SHARED_LINK_PER_WORKER} and {SHARED_LINK_PER_WORKER})")
    ap.add_argument("--shared-broadcast", action="store_true",
                    help="one broadcast subscription per device worker process, handed to its devices: takes the "
                         "fleet's own parsing of the broadcast (and 1 - 1/per-worker of the broker's fan-out) off this "
                         "machine's CPUs, which real devices would not share")
    ap.add_argument("--check-processes", type=int, default=0, metavar="N",
                    help="serve's --check-processes: uploads checked in N processes (their CPU and peak RSS added to the cloud's); "
                         "0 here, as in the commands of the older tables, though serve itself defaults to 2 on 2+ cores since session 14")
    ap.add_argument("--round-timeout", type=float, default=300.0)
    ap.add_argument("--max-upload-buffer", type=int, default=None, metavar="BYTES",
                    help="the cloud's serve --max-upload-buffer (default: serve's); what bounds its peak RSS under a flood")
    ap.add_argument("--device-ack-timeout", type=float, default=30.0,
                    help="the simulated devices' receipt timeout before they upload again (default 30, the agent's); "
                         "shorter makes a cloud's backlog of checks outlast it, as 5,000 devices do at 30 s")
    ap.add_argument("--task-ack-timeout", type=float, default=30.0,
                    help="serve's --task-ack-timeout (default 30, serve's): a simulated fleet of thousands on this "
                         "machine's CPUs may take longer than a real device to ack its Task")
    ap.add_argument("--write", type=Path, default=None, help="replace the scale section of this markdown file")
    ap.add_argument("--json", type=Path, default=None, help="also dump the raw results here")
    ap.add_argument("--note", action="append", default=[], help="a line added under the table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    cloud_cpus: tuple[int, ...] = ()
    fleet_cpus: tuple[int, ...] = ()
    if args.pin_cloud:
        cpus = sorted(os.sched_getaffinity(0))
        if not 0 < args.pin_cloud < len(cpus):
            ap.error(f"--pin-cloud {args.pin_cloud}: this process may run on {len(cpus)} CPUs; leave the devices at least one")
        if "system" in args.brokers:
            ap.error("--pin-cloud needs a private broker (--brokers MAX_QUEUED): the system's is not ours to move")
        cloud_cpus, fleet_cpus = tuple(cpus[: args.pin_cloud]), tuple(cpus[args.pin_cloud :])
    tmp = None
    bundle = args.bundle
    if bundle is None:
        tmp = Path(tempfile.mkdtemp(prefix="fedpft-scale-bundle-"))
        bundle = synthetic_bundle(tmp)
        note = "synthetic (MiniLM r=8 adapter shapes, placeholder ONNX files)"
    else:
        m = verify_bundle(bundle)
        note = f"`{bundle}` ({m.fm_id}, {len(m.trainable)} trainable tensors, adapters blob {(bundle / m.files['adapters_init'].path).stat().st_size / 1e6:.2f} MB)"
    results = []
    try:
        for queued in [None if b == "system" else int(b) for b in args.brokers]:
            for n in args.devices:
                t0 = time.time()
                print(f"--- {n} devices, broker: {'--broker' if queued is None else f'own, max_queued_messages {queued}'}", flush=True)
                sc = ScaleConfig(devices=n, bundle=bundle, broker=args.broker, train_s=args.train_s, jitter_s=args.jitter_s,
                                 per_worker=args.per_worker or (shared_link_per_worker(n, len(fleet_cpus or os.sched_getaffinity(0)))
                                                                if args.fleet == "shared-link" else DEVICES_PER_WORKER),
                                 shared_link=args.fleet == "shared-link", fleet_nice=args.fleet_nice,
                                 cloud_cpus=cloud_cpus, fleet_cpus=fleet_cpus,
                                 round_timeout=args.round_timeout, shared_broadcast=args.shared_broadcast,
                                 task_ack_timeout=args.task_ack_timeout, device_ack_timeout=args.device_ack_timeout,
                                 max_upload_buffer=args.max_upload_buffer, check_processes=args.check_processes)
                if queued is None:
                    res = run_isolated(sc)
                else:
                    with OwnBroker(queued, max_inflight=args.inflight, reuse_buffers=args.broker_malloc == "reuse", cpus=fleet_cpus) as ob:
                        sc.broker, sc.broker_pid = ob.url, ob.proc.pid
                        sc.broker_label = (f"max_queued {queued or 'unlimited'}, inflight {args.inflight or 'unlimited'}"
                                           + (", malloc reuse" if args.broker_malloc == "reuse" else ""))
                        res = run_isolated(sc)
                        res["broker_drop_lines"] = ob.drops()
                res["train_s"], res["bench_s"] = args.train_s, time.time() - t0
                print(json.dumps(res, indent=1, default=str), flush=True)
                results.append(res)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.write:
        cmd = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(args.write, section(results, cmd, note, args.note))
    return 0 if all(r["accepted"] == r["devices"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
