"""`fedpft-cloud simulate`: a whole federation on one machine, with real devices.

Prepares the bundle for the method, partitions the training data, starts the broker (embedded
unless given), N real `fedpft-edge` processes each with its own shard, and the cloud; then writes
metrics.jsonl, report.md and accuracy.png. `engine="virtual"` runs the same edge agents on threads
of this process over an in-memory hub instead (`fedpft.sim.virtual`, found through the
`fedpft.engines` entry points: it hosts edge code, so it sits above the cloud, which never imports it).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fedpft.cloud.config import PrepareConfig, ServeConfig, SimulateConfig, load_prepare_config
from fedpft.shared.datasets import materialize, read_labels
from fedpft.shared.manifest import BundleError
from fedpft.shared.methods import method

from .partition import partition

log = logging.getLogger("fedpft.simulate")

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def data_folder(cfg: SimulateConfig, run: Path) -> Path:
    if cfg.data is not None:
        for name in ("train.jsonl", "test.jsonl", "labels.json"):
            if not (Path(cfg.data) / name).is_file():
                raise FileNotFoundError(f"--data {cfg.data}: missing {name}")
        return Path(cfg.data)
    return materialize(run / "data")


def bundle_config(cfg: SimulateConfig, data: Path, bundle: Path) -> PrepareConfig:
    """What `prepare` builds for the run's method (benchmarks call it to prepare one bundle for many seeds)."""
    row = method(cfg.method)
    public = data / "public.txt"
    return PrepareConfig(
        model=cfg.model, out=bundle, labels=read_labels(data), public_data=public if public.is_file() else None,
        proxy=row.proxy, distill_steps=cfg.distill_steps if row.distill else 0, ffn_keep=cfg.ffn_keep,
        max_length=cfg.max_length, seed=cfg.seed, device=cfg.device, frozen_dtype=cfg.frozen_dtype,
    )


# what a bundle given in the run folder is used for as it is, though the options ask otherwise;
# the seed is not among them (serve redraws the initial adapters for another seed)
BUNDLE_FIELDS = ("proxy", "ffn_keep", "distill_steps", "max_length", "frozen_dtype")


def warn_if_bundle_differs(bundle: Path, wanted: PrepareConfig) -> None:
    """One line when the run folder's own bundle was prepared otherwise than these options ask: a
    given bundle is used as it is (a benchmark shares one across seeds), never silently."""
    try:
        have = load_prepare_config(bundle)
    except BundleError as exc:
        log.warning("%s", exc)
        return
    diff = [f"{k}={getattr(have, k)} (asked {getattr(wanted, k)})" for k in BUNDLE_FIELDS if getattr(have, k) != getattr(wanted, k)]
    if diff:
        log.warning("%s was prepared with %s: using it as it is", bundle, ", ".join(diff))


def make_shards(cfg: SimulateConfig, data: Path, run: Path) -> tuple[list[Path], Path]:
    rng = np.random.default_rng(cfg.seed)
    train = read_jsonl(data / "train.jsonl")
    if cfg.max_samples is not None and cfg.max_samples < len(train):
        train = [train[i] for i in np.sort(rng.choice(len(train), cfg.max_samples, replace=False))]
    labels = read_labels(data)
    y = np.array([labels.index(r["label"]) for r in train])
    shards = []
    for i, idx in enumerate(partition(y, cfg.clients, cfg.partition, cfg.seed)):
        p = run / "clients" / f"client{i:03d}" / "train.jsonl"
        write_jsonl(p, [{"text": train[j]["text"], "label": train[j]["label"]} for j in idx])
        shards.append(p)
    test = read_jsonl(data / "test.jsonl")
    if cfg.eval_samples is not None and cfg.eval_samples < len(test):
        test = [test[i] for i in np.sort(rng.choice(len(test), cfg.eval_samples, replace=False))]
    eval_path = run / "eval.jsonl"
    write_jsonl(eval_path, test)
    sizes = [sum(1 for _ in open(s)) for s in shards]
    log.info("partition %s over %d clients: sizes %s", cfg.partition, cfg.clients, sizes)
    return shards, eval_path


def start_devices(shards: list[Path], url: str, run_id: str, run: Path, python: Path | None = None) -> list[subprocess.Popen]:
    procs = []
    for i, shard in enumerate(shards):
        dev = f"client{i:03d}"
        log_path = run / "clients" / dev / "agent.log"
        cmd = [str(python or sys.executable), "-m", "fedpft.edge.cli", "train", "--broker", url, "--device-id", dev,
               "--data", str(shard), "--cache", str(run / "clients" / dev / "cache"), "--run-id", run_id,
               # one thread each: N devices share this machine's cores, and ORT's default pool per
               # process would oversubscribe them (and spin)
               "--threads", "1"]
        procs.append(subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT))
    return procs


def watch(procs: list[subprocess.Popen], stop: threading.Event) -> None:
    """Say at once when a device process dies during the run (its log holds the why)."""
    reported = set()
    while not stop.is_set():
        for i, p in enumerate(procs):
            if i not in reported and p.poll() not in (None, 0):
                log.error("device client%03d exited with code %s during the run; see clients/client%03d/agent.log", i, p.returncode, i)
                reported.add(i)
        stop.wait(1.0)


def installed_engine(name: str):
    """The simulation engine registered as `name` in the `fedpft.engines` entry points."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="fedpft.engines"):
        if ep.name == name:
            return ep.load()
    raise RuntimeError(f"--engine {name}: no such engine is installed (reinstall fedpft: pip install -e .)")


def run_processes(cfg: SimulateConfig, serve_cfg: ServeConfig, shards: list[Path], run: Path, show_progress: bool) -> None:
    """The federation with real `fedpft-edge` processes over MQTT (the embedded broker unless given)."""
    from .broker import EmbeddedBroker
    from .serve import serve

    broker = None
    url = cfg.broker
    if url is None:
        broker = EmbeddedBroker()
        url = broker.start()
        print(f"embedded MQTT broker: {url}", flush=True)
    procs = start_devices(shards, url, serve_cfg.run_id, run, cfg.edge_python)
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(procs, stop), daemon=True)
    watcher.start()
    try:
        serve(serve_cfg.model_copy(update={"broker": url}), show_progress=show_progress)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.terminate()
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if broker is not None:
            broker.stop()


def simulate(cfg: SimulateConfig, show_progress: bool = True) -> Path:
    from .device import resolve_device
    from .prepare import prepare
    from .report import write_report

    resolve_device(cfg.device)  # an absent GPU is refused before any folder or process is made
    run = Path(cfg.out)
    if (run / "federation" / "state.json").is_file():
        raise FileExistsError(f"--out {run} already holds a simulation; choose another --out or delete it")
    run.mkdir(parents=True, exist_ok=True)
    (run / "simulate_config.json").write_text(cfg.model_dump_json(indent=2))
    t0 = time.time()
    data = data_folder(cfg, run)
    public = data / "public.txt"
    shards, eval_path = make_shards(cfg, data, run)
    bundle = run / "bundle"
    if not (bundle / "manifest.json").is_file():
        res = prepare(bundle_config(cfg, data, bundle), show_progress=show_progress)
        log.info("bundle ready in %.0fs (proxy/FM params %.2f)", res.seconds, res.proxy_params / res.fm_params)
    else:
        warn_if_bundle_differs(bundle, bundle_config(cfg, data, bundle))
    run_id = f"sim-{cfg.method}-{cfg.seed}-{int(t0) % 100000}"
    serve_cfg = ServeConfig(
        bundle=bundle, out=run / "federation", broker=cfg.broker, run_id=run_id, rounds=cfg.rounds,
        min_clients=cfg.clients, clients_per_round=cfg.clients, round_timeout=cfg.round_timeout,
        local_epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, max_steps=cfg.max_steps,
        align_every=cfg.resolved_align_every(), align_steps=cfg.align_steps, align_fraction=cfg.align_fraction,
        align_objective=cfg.align_objective, public_data=public if public.is_file() else None, eval_data=eval_path, seed=cfg.seed, device=cfg.device,
        norm_bound_factor=cfg.norm_bound_factor, weight_cap_factor=cfg.weight_cap_factor,
        **cfg.privacy_fields(),
    )
    if cfg.engine == "virtual":
        if cfg.edge_python is not None:
            log.info("--edge-python %s unused: virtual clients run in this process", cfg.edge_python)
        installed_engine("virtual")(serve_cfg, shards, run, show_progress, parallel=cfg.virtual_parallel,
                                    trainer=cfg.virtual_trainer, precision=cfg.virtual_precision)
    else:
        run_processes(cfg, serve_cfg, shards, run, show_progress)
    fed = run / "federation"
    for name in ("metrics.jsonl", "accuracy.png"):
        if (fed / name).is_file():
            (run / name).write_bytes((fed / name).read_bytes())
    header = (f"`fedpft-cloud simulate` — method **{cfg.method}**, model {cfg.model}, {cfg.clients} clients on the {cfg.engine} engine "
              f"({cfg.partition}), {cfg.rounds} rounds, {cfg.max_samples or 'all'} training samples, "
              f"{cfg.eval_samples or 'all'} test samples, total wall time {time.time() - t0:.0f}s.")
    write_report(fed, header)
    (run / "report.md").write_text((fed / "report.md").read_text())
    return run
