"""`fedpft-edge`: the device agent. Imports no torch and no transformers."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from fedpft import __version__

app = typer.Typer(name="fedpft-edge", help="FedPFT device agent: train LoRA adapters of the proxy with plain onnxruntime (any platform, no torch).", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedpft-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit.")) -> None:
    """FedPFT device agent."""


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit: how every known error ends."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def train(
    data: Path = typer.Option(..., "--data", "-d", help="Local labelled data: text as .jsonl/.csv (text,label); images as a folder of class subfolders or a .csv (path,label)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Offline: bundle folder from `fedpft-cloud prepare` (every file is checked against the manifest's sha256)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Offline: update file to write (safetensors: adapters under PEFT keys, activation statistics, metrics as metadata)."),
    broker: Optional[str] = typer.Option(None, "--broker", help="Online: mqtt://host:port (mqtts:// for TLS) of the federation; the device then serves the run's tasks until the cloud ends it."),
    device_id: Optional[str] = typer.Option(None, "--device-id", help="Online: this device's id (topic level; [A-Za-z0-9_.-], up to 64 chars)."),
    run_id: str = typer.Option("default", "--run-id", help="Online: the run to join (must match the cloud's --run-id)."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="Online: CA certificate for TLS."),
    cert: Optional[Path] = typer.Option(None, "--cert", help="Online: client certificate for TLS."),
    key: Optional[Path] = typer.Option(None, "--key", help="Online: client key for TLS."),
    username: Optional[str] = typer.Option(None, "--username", help="Online: broker user name."),
    password: Optional[str] = typer.Option(None, "--password", envvar="FEDPFT_MQTT_PASSWORD", help="Online: broker password (or env FEDPFT_MQTT_PASSWORD)."),
    trust_key: Optional[Path] = typer.Option(None, "--trust-key", help="Online: the cloud's public signing key (signing.pub); unsigned or tampered tasks and bundles are refused. Without it everything is accepted (development mode)."),
    adapters: Optional[Path] = typer.Option(None, "--adapters", "-a", help="Global adapters to start from (safetensors, PEFT keys); default: the bundle's."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the local training split."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per training step."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (default: run all epochs)."),
    seed: int = typer.Option(0, "--seed", help="Offline: seed of the held-out split, the shuffling and the dropout masks (the same seed, data and adapters train the same update)."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share of the local data held out for accuracy before/after, in [0, 1)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Offline: folder to start from and save the updated checkpoint. Online: the device's cache (bundle, downloads, updates; default .fedpft-cache)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads, offline and online (default: ORT decides; give 1 when several devices share a CPU)."),
    max_record_bytes: int = typer.Option(256 * 1024, "--max-record-bytes", help="Offline: skip (and count) a data record — a .jsonl line or .csv record — larger than this many bytes, unparsed."),
    max_record_tokens: int = typer.Option(8192, "--max-record-tokens", help="Offline: skip (and count) a text with more tokens than this before truncation to the bundle's max length."),
    providers: str = typer.Option("cpu", "--providers", help="onnxruntime execution providers, comma-separated, in order of preference: cpu, cuda (onnxruntime-gpu, Jetson builds), tensorrt, coreml, openvino, dml, rocm, or a full provider name. CPU is always the fallback. An unknown or uninstalled provider is an error."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train LoRA adapters of the proxy on local data: one offline round (--bundle/--out), or online (--broker/--device-id)."""
    eps = _providers(providers)
    if broker is not None:
        return _online(broker, device_id, run_id, data, cache, holdout, threads, eps, ca, cert, key, username, password, trust_key)
    if bundle is None or out is None:
        fail("offline training needs --bundle and --out (or give --broker and --device-id to join a federation)")

    from fedpft.shared.manifest import BundleError

    cfg = _train_config(epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, seed=seed, holdout_seed=seed, dropout_seed=seed, holdout=holdout,
                        threads=threads, providers=eps, max_record_bytes=max_record_bytes, max_record_tokens=max_record_tokens)
    from fedpft.shared.records import DataError
    from .trainer import AdapterError, TrainError, load_adapters, summarize, train_round
    from .update import write_update

    with _progress(not quiet) as (on_start, on_step):
        try:
            start = load_adapters(adapters) if adapters is not None else None
            result = train_round(bundle, data, cfg, adapters=start, cache_dir=cache, on_start=on_start, on_step=on_step)
        except (BundleError, DataError, AdapterError, TrainError) as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if result.skipped_summary:
        typer.echo(result.skipped_summary, err=True)
    try:
        write_update(out, result)
    except OSError as exc:
        fail(f"--out {out}: cannot write ({exc.strerror or exc})")
    typer.echo(f"{summarize(result)} -> {out}")


def _train_config(**fields):
    """The offline round's config; an invalid flag is one line that names it."""
    from pydantic import ValidationError

    from fedpft.shared.edge_config import EdgeTrainConfig

    try:
        return EdgeTrainConfig(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-') or 'options'}: {err['msg'].removeprefix('Value error, ')}")


def _providers(text: str) -> tuple[str, ...]:
    """--providers, checked against the installed onnxruntime before anything is read or written."""
    from .runtime import ProviderError, resolve_providers

    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        fail("--providers: give at least one execution provider, e.g. cpu")
    try:
        resolve_providers(names)
    except ProviderError as exc:
        fail(f"--providers: {exc}")
    return names


@contextmanager
def _progress(enabled: bool):
    """(on_start(total), on_step(step, loss)) callbacks driving a rich progress bar over steps."""
    if not enabled:
        yield None, None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"), transient=False,
    ) as progress:
        task = progress.add_task("train", total=None, loss="-")
        yield (lambda total: progress.update(task, total=total),
               lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.4f}"))


def _log_agent() -> None:
    """A device agent's log: its own lines from INFO up, other libraries' warnings only."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedpft").setLevel(logging.INFO)


def _online(broker, device_id, run_id, data, cache, holdout, threads, providers, ca, cert, key, username, password, trust_key) -> None:
    from pydantic import ValidationError

    from fedpft.shared.config import AgentConfig
    from fedpft.shared.messages import ProtocolError, check_id
    from fedpft.shared.transport import TransportError

    from .agent import run_online

    if device_id is None:
        fail("online mode needs --device-id")
    try:
        check_id(device_id, "--device-id")
        check_id(run_id, "--run-id")
        cfg = AgentConfig(broker=broker, device_id=device_id, run_id=run_id, data=data, cache=cache or Path(".fedpft-cache"),
                          holdout=holdout, threads=threads, providers=providers, ca=ca, cert=cert, key=key, username=username, password=password,
                          trust_key=trust_key)
    except ProtocolError as exc:
        fail(exc.reason)
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}")
    if not Path(data).exists():
        fail(f"data '{data}' does not exist")
    if trust_key is not None:
        from fedpft.shared.signing import SignatureError, load_public_key

        try:
            load_public_key(trust_key)  # a bad key file fails here, before connecting
        except SignatureError as exc:
            fail(str(exc))
    _log_agent()
    try:
        rounds = run_online(cfg)
    except TransportError as exc:
        fail(str(exc))
    typer.echo(f"run {run_id} ended: trained {rounds} rounds as {device_id}")


@app.command()
def fleet(
    broker: str = typer.Option(..., "--broker", help="mqtt://host:port (mqtts:// for TLS) of the fleet's broker."),
    device_id: str = typer.Option(..., "--device-id", help="This device's id (topic level; [A-Za-z0-9_.-], up to 64 chars)."),
    cohort: str = typer.Option(..., "--cohort", help="Cohort this device declares (e.g. canary, stable); rollouts name a cohort or devices."),
    cache: Path = typer.Option(..., "--cache", help="Folder of the installed versions (versions/<bundle_id>/), the current/previous pointers and downloads."),
    fleet_name: str = typer.Option("default", "--fleet", help="Fleet name (topics fedpft/fleet/<fleet>/...); must match the cloud's --fleet."),
    trust_key: Optional[Path] = typer.Option(None, "--trust-key", help="The cloud's public signing key (signing.pub); unsigned or tampered rollouts and bundles are refused. Without it everything is accepted (development mode)."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate for TLS."),
    cert: Optional[Path] = typer.Option(None, "--cert", help="Client certificate for TLS."),
    key: Optional[Path] = typer.Option(None, "--key", help="Client key for TLS."),
    username: Optional[str] = typer.Option(None, "--username", help="Broker user name."),
    password: Optional[str] = typer.Option(None, "--password", envvar="FEDPFT_MQTT_PASSWORD", help="Broker password (or env FEDPFT_MQTT_PASSWORD)."),
    heartbeat: float = typer.Option(30.0, "--heartbeat", help="Seconds between re-published statuses (the cloud's 'last seen')."),
) -> None:
    """Serve fleet rollouts: install the bundle versions sent to this device's cohort, keep the previous one, roll back; until SIGTERM."""
    import signal
    import threading

    from pydantic import ValidationError

    from fedpft.shared.config import FleetConfig
    from fedpft.shared.signing import SignatureError, load_public_key
    from fedpft.shared.transport import TransportError

    from .blobs import AgentError
    from .fleet import run_fleet

    try:
        cfg = FleetConfig(broker=broker, device_id=device_id, cohort=cohort, cache=cache, fleet=fleet_name, trust_key=trust_key,
                          ca=ca, cert=cert, key=key, username=username, password=password, heartbeat=heartbeat)
        if trust_key is not None:
            load_public_key(trust_key)  # a bad key file fails here, before connecting
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"{'.'.join(str(x) for x in err['loc']) or 'options'}: {err['msg'].removeprefix('Value error, ')}")
    except SignatureError as exc:
        fail(str(exc))
    _log_agent()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        pointers = run_fleet(cfg, stop)
    except (TransportError, AgentError) as exc:
        fail(str(exc))
    typer.echo(f"{device_id} stopped; current {pointers.current or 'none'}, previous {pointers.previous or 'none'}")


if __name__ == "__main__":  # pragma: no cover
    app()
