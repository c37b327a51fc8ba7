"""`fedpft-cloud serve` and `simulate`: federated rounds over a broker, or a whole federation on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .checks import CHECK_WORKERS, default_check_processes
from .cli_common import (ALIGN_OBJECTIVE_OPT, CA_OPT, FROZEN_DTYPE_OPT, CERT_OPT, DISTILL_PRECISION, KEY_OPT, NORM_BOUND_OPT, PASSWORD_OPT, PRIVACY_OPTIONS,
                         SERVE_PRECISION, WEIGHT_CAP_OPT, check_device, device_option, fail, from_options, with_options)


@with_options(PRIVACY_OPTIONS, before="device")
def serve(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Bundle folder written by `prepare`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: metrics.jsonl, checkpoints, accepted updates, report."),
    broker: Optional[str] = typer.Option(None, "--broker", help="mqtt://host:port (or mqtts://); omitted: start the embedded broker and print its URL."),
    run_id: str = typer.Option("default", "--run-id", help="Run id: scopes every topic (fedpft/<run>/...)."),
    rounds: int = typer.Option(3, "--rounds", "-r", help="Number of federated rounds."),
    clients_per_round: Optional[int] = typer.Option(None, "--clients-per-round", "-k", help="Devices sampled per round (default: all online)."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Share of online devices sampled per round (instead of -k)."),
    min_clients: int = typer.Option(1, "--min-clients", help="Quorum: fewer accepted updates and the round is retried or skipped."),
    round_timeout: float = typer.Option(600.0, "--round-timeout", help="Seconds to wait for updates before closing the round."),
    wait_for_clients: float = typer.Option(120.0, "--wait-for-clients", help="Seconds to wait for --min-clients devices to come online."),
    local_epochs: int = typer.Option(1, "--local-epochs", help="Epochs each device trains per round."),
    lr: float = typer.Option(1e-3, "--lr", help="Devices' AdamW learning rate."),
    batch_size: int = typer.Option(16, "--batch-size", help="Devices' batch size."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on each device's steps per round."),
    norm_bound_factor: float = NORM_BOUND_OPT,
    weight_cap_factor: float = WEIGHT_CAP_OPT,
    max_client_samples: Optional[int] = typer.Option(None, "--max-client-samples", help="Per-run maximum FedAvg weight of one device, in samples (a device is also capped by the count its Hello declared)."),
    aggregator: str = typer.Option("fedavg", "--aggregator", help="fedavg (weighted mean), median (coordinate-wise) or trimmed-mean (coordinate-wise, --trim-fraction from each end): the latter two for fleets that expect misbehaving devices."),
    trim_fraction: float = typer.Option(0.2, "--trim-fraction", help="Share of the values dropped from each end per coordinate by --aggregator trimmed-mean."),
    upload_timeout: float = typer.Option(120.0, "--upload-timeout", help="Drop a device's unfinished upload after this many seconds without a new chunk (uploads are also dropped when their round ends)."),
    max_upload_buffer: int = typer.Option(1 << 30, "--max-upload-buffer", help="Bytes that all uploads not yet checked may hold together: each reserves its size from its first chunk until its check has stored and folded it. An upload past it is dropped and its device told to upload again in a few seconds (an Ack 'busy'). The cloud's peak memory stays under about this plus 100-150 MB: with the default, 179-484 MB at 1,000 devices and 1,142-1,170 MB at 5,000; with 268435456, 401 MB at 5,000 (BENCHMARKS.md, scale). Lower it on a small machine: more devices are then told to come back."),
    check_workers: int = typer.Option(CHECK_WORKERS, "--check-workers", help="Threads that check uploads and write them durably before they count. More overlap more fsyncs (a network disk's latency), fewer hand the GIL around less: on a 2-core machine with a local disk 4 beat 2 and 8 (BENCHMARKS.md, scale)."),
    check_processes: Optional[int] = typer.Option(None, "--check-processes", min=0, max=64, help="Check uploads in this many processes of their own; 0 = in --check-workers threads of the cloud's process. Default: 2 where the cloud may run on 2 or more cores (its CPU affinity), else 0. Each process checks, durably writes (4 at once, so their fsyncs overlap) and folds its share into a partial sum that the cloud merges when it persists the running sum and at the round's end; acks still follow the durable write and --resume stays exact. Threads share the cloud's one GIL with its MQTT network thread: on 2 cores shared with a simulated 1,000-device fleet, 2 processes made the round's overhead 3.26 s at the median against 4.93 s with threads, in 243-263 MB of peak RSS against 354-399 MB (each process about 65 MB of it; BENCHMARKS.md, scale, session 14). A check process that dies stops the cloud with one line; what it accepted is on disk for --resume."),
    task_ack_timeout: float = typer.Option(30.0, "--task-ack-timeout", help="Seconds a selected device has to ack the round's task; the round does not wait for devices that did not."),
    align_every: int = typer.Option(0, "--align-every", help="Neuron-level alignment every T rounds (0 = never)."),
    align_fraction: float = typer.Option(0.5, "--align-fraction", help="Share of neurons frozen (the most used) during alignment."),
    align_steps: int = typer.Option(100, "--align-steps", help="Distillation steps per alignment."),
    align_objective: str = ALIGN_OBJECTIVE_OPT,
    public_data: Optional[Path] = typer.Option(None, "--public-data", help="Public data for alignment (default: the one given to prepare)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Labelled data (JSONL/CSV text or image folder) to evaluate the FM on each round."),
    eval_max_samples: Optional[int] = typer.Option(None, "--eval-max-samples", help="Evaluate on at most this many samples."),
    max_update_norm: Optional[float] = typer.Option(None, "--max-update-norm", help="Absolute ceiling on the L2 norm of a device's adapter change (on top of --norm-bound-factor)."),
    max_devices: int = typer.Option(100_000, "--max-devices", help="Devices the cloud keeps track of; when full, the offline device seen longest ago makes room and, with all online, new hellos are refused."),
    seed: int = typer.Option(0, "--seed", help="Seed for device sampling, local shuffles and the devices' dropout masks (each device mixes in its id); a seed other than the one the bundle was prepared with also draws fresh initial adapters (LoRA A, head)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out at its next round. Refused unless --out holds a committed state.json of this --run-id and --bundle whose checkpoints match their recorded sha256."),
    fresh: bool = typer.Option(False, "--fresh", help="Start a new run in --out although it holds an earlier run's files: they are moved into --out/replaced-<time>/ first, never overwritten. Without --resume or --fresh, a folder holding a run is refused."),
    ca: Optional[Path] = CA_OPT,
    cert: Optional[Path] = CERT_OPT,
    key: Optional[Path] = KEY_OPT,
    username: Optional[str] = typer.Option(None, "--username", help="Broker user name (`provision` creates fedpft-cloud)."),
    password: Optional[str] = PASSWORD_OPT,
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (from `keygen`) that signs every task."),
    device: str = device_option("the FM (evaluation) and the proxy (alignment)", SERVE_PRECISION),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    **privacy,
) -> None:
    """Run federated rounds over MQTT: sample devices, collect and aggregate adapters, align, evaluate the FM."""
    options = dict(locals())
    from fedpft.shared.manifest import BundleError
    from fedpft.shared.signing import SignatureError
    from fedpft.shared.transport import TransportError

    from .config import ServeConfig
    from .serve import serve as run_serve

    if check_processes is None:
        options["check_processes"] = default_check_processes()
    cfg = from_options(ServeConfig, options)
    check_device(cfg.device)
    _set_aside_for_fresh(out, resume, fresh)
    try:
        state = run_serve(cfg, show_progress=not quiet)
    except (BundleError, TransportError, RuntimeError, FileNotFoundError, SignatureError) as exc:
        fail(str(exc))
    typer.echo(f"run {cfg.run_id}: {state.next_round} rounds done -> {out}/report.md")


def _set_aside_for_fresh(out: Path, resume: bool, fresh: bool) -> None:
    from .state import RunStore

    if resume and fresh:
        fail("--resume and --fresh exclude each other: continue the run in --out, or start a new one there")
    try:
        moved = RunStore(out).set_aside() if fresh else None
    except OSError as exc:
        fail(f"--fresh: cannot move the earlier run's files in {out} aside: {exc}")
    if moved is not None:
        typer.echo(f"--fresh: the earlier run's files in {out} were moved to {moved}", err=True)


@with_options(PRIVACY_OPTIONS, before="engine")
def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (bundle, client shards, logs, metrics, report)."),
    model: str = typer.Option("minilm", "--model", "-m", help="FM (folder, hub id or alias); default the offline MiniLM."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with train.jsonl, test.jsonl, labels.json[, public.txt]; default: the shipped debian-sections."),
    clients: int = typer.Option(3, "--clients", "-n", help="Number of real edge agent processes."),
    rounds: int = typer.Option(3, "--rounds", "-r", help="Federated rounds."),
    partition: str = typer.Option("iid", "--partition", help="iid or dirichlet:<alpha> (non-IID label skew)."),
    method: str = typer.Option("fedpft", "--method", help="fedpft | full (devices tune the whole FM) | fedot (layer-drop proxy) | noalign (no distillation) | layeronly (no neuron alignment)."),
    max_samples: Optional[int] = typer.Option(900, "--max-samples", help="Training samples used across all clients."),
    eval_samples: Optional[int] = typer.Option(300, "--eval-samples", help="Test samples the FM is evaluated on each round."),
    distill_steps: int = typer.Option(60, "--distill-steps", help="Layer-level distillation steps when preparing the proxy."),
    ffn_keep: float = typer.Option(0.25, "--ffn-keep", help="Share of FFN neurons the proxy keeps in compressed layers (fedpft-family and fedot budgets follow it)."),
    align_every: Optional[int] = typer.Option(None, "--align-every", help="Alignment period for fedpft (default: halfway through the run)."),
    align_steps: int = typer.Option(30, "--align-steps", help="Distillation steps per alignment."),
    align_objective: str = ALIGN_OBJECTIVE_OPT,
    frozen_dtype: str = FROZEN_DTYPE_OPT,
    local_epochs: int = typer.Option(2, "--local-epochs", help="Local epochs per round."),
    lr: float = typer.Option(3e-3, "--lr", help="Devices' learning rate."),
    batch_size: int = typer.Option(16, "--batch-size", help="Devices' batch size."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on local steps per round."),
    max_length: int = typer.Option(64, "--max-length", help="Token limit."),
    seed: int = typer.Option(0, "--seed", help="Seed of the partition, the training and test subsamples, the initial adapters (also on a --out whose bundle was prepared with another seed), device sampling, local shuffles and the devices' dropout masks (each device seeds its round from the Task's seed and its id, so a seeded run repeats bit for bit; --engine virtual with the ORT trainer too, at any --virtual-parallel, its clients training in worker processes; with the torch trainer the clients training at once share torch's generator, so its masks repeat only with --virtual-parallel 1)."),
    broker: Optional[str] = typer.Option(None, "--broker", help="Use this MQTT broker instead of the embedded one."),
    edge_python: Optional[Path] = typer.Option(None, "--edge-python", envvar="FEDPFT_EDGE_PYTHON", help="Python interpreter of the device processes, e.g. a venv with only the edge extra (plain onnxruntime, as devices install it). Default: this Python (the cloud's onnxruntime-training build, whose inference core runs the same graphs)."),
    device: str = device_option("the cloud's FM and proxy (distillation, alignment, evaluation; the device processes run ONNX Runtime on CPU)",
                                f"{DISTILL_PRECISION} {SERVE_PRECISION}"),
    engine: str = typer.Option("processes", "--engine", help="processes: N real `fedpft-edge` processes over MQTT (the deployment path). virtual: the same edge agents and ORT trainer on threads of this process over an in-memory hub (same protocol, aggregation, alignment and metrics; no broker, no process start-up; for research sweeps)."),
    virtual_parallel: Optional[int] = typer.Option(None, "--virtual-parallel", min=1, help="--engine virtual: clients training at once, the cores split evenly among them (default: one per core, one thread each); the largest shards start first. With the ORT trainer and more than one, each trains in a worker process of its own (one client at a time per process, as on a device, so dropout masks do not depend on scheduling). On a machine other jobs share, more slots get more of its cores. Where they train: --virtual-trainer."),
    norm_bound_factor: float = NORM_BOUND_OPT,
    weight_cap_factor: float = WEIGHT_CAP_OPT,
    virtual_trainer: str = typer.Option("auto", "--virtual-trainer", help="--engine virtual: what trains the clients. ort: the edge's own ORT trainer on the lowered graph (what devices run; the parity path). torch: the bundle's proxy in torch with the same parameters, batches, loss, statistics and the devices' AdamW (on a GPU it needs nothing beyond torch, whose wheel brings its CUDA libraries; bf16 with --virtual-precision). auto: ort on CPU in fp32, torch on a GPU or for bf16."),
    virtual_precision: str = typer.Option("fp32", "--virtual-precision", help="--engine virtual with the torch trainer: fp32, or bf16 autocast of forward and backward (faster on CPUs with AMX/AVX512-BF16 and on GPUs; the adapters, optimizer and loss stay fp32; not what devices compute, so a research speed setting)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    **privacy,
) -> None:
    """Run a complete federation on this machine: prepare, partition, N edge agents (real processes, or virtual clients with --engine virtual), rounds, report."""
    options = dict(locals())
    from fedpft.cloud.config import SimulateConfig

    from .partition import parse_scheme
    from .simulate import simulate as run_simulate

    try:
        parse_scheme(partition)
    except ValueError as exc:
        fail(str(exc))
    cfg = from_options(SimulateConfig, options)
    check_device(cfg.device)
    try:
        run = run_simulate(cfg, show_progress=not quiet)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0])
    typer.echo(f"simulation done: {run}/report.md, {run}/accuracy.png, {run}/metrics.jsonl")

