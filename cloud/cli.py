"""`fedpft-cloud`: thin typer commands; each builds one validated config and calls one function."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from fedpft import __version__

app = typer.Typer(
    name="fedpft-cloud",
    help="FedPFT cloud side: build the proxy bundle, run federated rounds, export the tuned FM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedpft-cloud {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail."),
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedpft").setLevel(logging.DEBUG if verbose else logging.INFO)


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit: how every known error ends."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    if text is None or text.strip() == "":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--keep-layers must be comma-separated integers, got '{text}'")


def read_labels(path: Optional[Path]) -> Optional[list[str]]:
    if path is None:
        return None
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        fail(f"--labels {path}: cannot read a JSON list of class names ({exc})")
    if not isinstance(labels, list) or not labels or not all(isinstance(l, str) and l for l in labels):
        fail(f"--labels {path}: expected a non-empty JSON list of class-name strings")
    return labels


def device_option(work: str, precision: str):
    """--device for a command whose model work is `work`; fedpft.cloud.device holds the precision policy."""
    return typer.Option(
        "auto", "--device",
        help=f"Torch device for {work}: auto (the first CUDA GPU, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps; "
             f"a device this machine lacks is refused in one line before any work. {precision}",
    )


DISTILL_PRECISION = ("Distillation runs under bf16 autocast on CUDA GPUs that have bf16 (fp32 on others, on MPS and on CPU), "
                     "with fp32 parameters; the bundle is always built from the CPU fp32 proxy.")
SERVE_PRECISION = ("Evaluation runs under bf16 autocast on CUDA (fp16 on GPUs without bf16), alignment under bf16 autocast "
                   "(fp32 on GPUs without bf16), with fp32 parameters; MPS and CPU run fp32; adapters and checkpoints are fp32.")


def check_device(name: str) -> None:
    """Refuse a --device this machine lacks before any work starts (one line, non-zero exit)."""
    from .device import DeviceError, resolve_device

    try:
        resolve_device(name)
    except DeviceError as exc:
        fail(str(exc))


@app.command()
def prepare(
    model: str = typer.Option(..., "--model", "-m", help="FM: local Hugging Face folder, hub id, or alias vit-base | bert-base | roberta-base | minilm."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to create (must not exist or be empty)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="JSON list of class names (sets the number of labels)."),
    num_labels: Optional[int] = typer.Option(None, "--num-labels", help="Number of classes when --labels is not given (default 2)."),
    public_data: Optional[Path] = typer.Option(None, "--public-data", help="Unlabelled public data for distillation: a text file (one sample a line) or an image folder."),
    proxy: str = typer.Option("fedpft", "--proxy", help="Proxy method: fedpft (neuron compression), fedot (layer drop), full (no compression)."),
    distill_steps: int = typer.Option(200, "--distill-steps", help="Layer-level distillation steps; 0 skips distillation."),
    distill_lr: float = typer.Option(5e-4, "--distill-lr", help="AdamW learning rate for distillation."),
    distill_alpha: float = typer.Option(0.0, "--distill-alpha", help="Weight of the W_out·W_in product term in the distillation loss."),
    keep_layers: Optional[str] = typer.Option(None, "--keep-layers", help="Comma-separated layers left uncompressed (default: first and last)."),
    ffn_keep: float = typer.Option(0.25, "--ffn-keep", help="Fraction of FFN neurons kept in compressed layers, in (0, 1]."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="LoRA rank on query, key, value and attention output."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA scaling alpha."),
    max_length: int = typer.Option(128, "--max-length", help="Token limit for text models."),
    batch_size: int = typer.Option(16, "--batch-size", help="Distillation batch size."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Override the FM's dropout in the training graph (0 gives deterministic steps)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the head, adapters and data order."),
    bundle_version: int = typer.Option(1, "--bundle-version", help="Version number written to the manifest (fleet rollouts install and roll back by it)."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (from `keygen`) that signs the manifest; devices check it with --trust-key."),
    device: str = device_option("the FM and the proxy during distillation", DISTILL_PRECISION),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Compress the FM into a proxy, distill it, and write the device bundle (ORT training artifacts + manifest)."""
    from fedpft.cloud.config import PrepareConfig

    cfg = _validated(
        PrepareConfig, model=model, out=out, labels=read_labels(labels), num_labels=num_labels, public_data=public_data,
        proxy=proxy, distill_steps=distill_steps, distill_lr=distill_lr, distill_alpha=distill_alpha,
        keep_layers=parse_layers(keep_layers), ffn_keep=ffn_keep, lora_rank=lora_rank, lora_alpha=lora_alpha,
        max_length=max_length, batch_size=batch_size, dropout=dropout, seed=seed, bundle_version=bundle_version,
        signing_key=signing_key, device=device,
    )
    check_device(cfg.device)
    from fedpft.modeling.families import ModelError
    from .prepare import PrepareError, prepare as run_prepare
    from fedpft.modeling.proxy import ProxyError
    from .public_data import PublicDataError
    from fedpft.export.lowering import LoweringError

    try:
        res = run_prepare(cfg, show_progress=not quiet)
    except (ModelError, PrepareError, ProxyError, PublicDataError, FileExistsError, LoweringError) as exc:
        fail(str(exc))
    m = res.manifest
    size = sum(e.size for e in m.files.values())
    typer.echo(
        f"bundle {m.bundle_id[:12]} v{m.bundle_version} -> {out}  ({size / 1e6:.1f} MB, proxy/FM params "
        f"{res.proxy_params / 1e6:.1f}M/{res.fm_params / 1e6:.1f}M = {res.proxy_params / res.fm_params:.2f}, "
        f"{len(m.trainable)} trainable tensors, {res.seconds:.0f}s)"
    )


def _validated(model_cls, **kwargs):
    from pydantic import ValidationError

    try:
        return model_cls(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        # name the option as the user typed it; model-level checks already name theirs
        fail(f"--{str(err['loc'][0]).replace('_', '-')}: {msg}" if err["loc"] else msg)


# Secure aggregation and DP options, shared by serve and simulate (typer reads an Option's metadata, so one serves both).
SECURE_AGG_OPT = typer.Option(False, "--secure-agg", help="Secure aggregation (SecAgg over MQTT): the cloud learns only the sum of the round's adapter changes and neuron counts, never one device's update; devices that drop after masking are recovered while at most n - T drop. The run folder then holds no individual update.")
SECAGG_T_OPT = typer.Option(None, "--secagg-threshold", help="Shamir threshold T of --secure-agg: the round survives n - T devices dropping after their shares, and no T - 1 colluders learn a device's masks. Default 2n/3 + 1 of the round's n devices; must be a strict majority.")
SECAGG_DEGREE_OPT = typer.Option(None, "--secagg-degree", help="SecAgg+ (Bell et al. 2020): each device masks with and shares among d neighbours (even) instead of every device: O(d) work per device for large rounds; T then counts among d + 1 holders. Default: all (SecAgg).")
SECAGG_STAGE_OPT = typer.Option(60.0, "--secagg-stage-timeout", help="Seconds each short --secure-agg stage (keys, shares, unmask) waits for the devices; the masked-input stage waits until the round's deadline.")
DP_CLIP_OPT = typer.Option(None, "--dp-clip", help="Client-level DP: each device clips its adapter change to this L2 norm C and weighs 1 (uniform average over the devices whose update arrived).")
DP_NOISE_OPT = typer.Option(None, "--dp-noise", help="DP noise multiplier Z: Gaussian noise of std Z*C on the round's sum (needs --dp-clip). Epsilon at --dp-delta is written to metrics.jsonl and report.md each round.")
DP_MODE_OPT = typer.Option("central", "--dp-mode", help="central: the cloud adds the noise to the sum; distributed (needs --secure-agg): each device adds its share of it under the masks, so nobody sees an un-noised sum.")
DP_DELTA_OPT = typer.Option(1e-5, "--dp-delta", help="The delta at which the accountant (dp-accounting, RDP) reports epsilon.")
DP_MAX_EPS_OPT = typer.Option(None, "--dp-max-epsilon", help="End the run cleanly (one line, state committed) before a round whose privacy cost would take epsilon past this.")


@app.command()
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
    norm_bound_factor: float = typer.Option(3.0, "--norm-bound-factor", help="Clip a device's adapter change to this multiple of the round's typical change (lower median of the round's norms and the previous round's); 0 = off. Bounded updates are logged and recorded in metrics.jsonl."),
    weight_cap_factor: float = typer.Option(3.0, "--weight-cap-factor", help="Cap a device's FedAvg weight (its sample count) at this multiple of the round's typical weight; 0 = off."),
    max_client_samples: Optional[int] = typer.Option(None, "--max-client-samples", help="Per-run maximum FedAvg weight of one device, in samples (a device is also capped by the count its Hello declared)."),
    aggregator: str = typer.Option("fedavg", "--aggregator", help="fedavg (weighted mean), median (coordinate-wise) or trimmed-mean (coordinate-wise, --trim-fraction from each end): the latter two for fleets that expect misbehaving devices."),
    trim_fraction: float = typer.Option(0.2, "--trim-fraction", help="Share of the values dropped from each end per coordinate by --aggregator trimmed-mean."),
    upload_timeout: float = typer.Option(120.0, "--upload-timeout", help="Drop a device's unfinished upload after this many seconds without a new chunk (uploads are also dropped when their round ends)."),
    max_upload_buffer: int = typer.Option(1 << 30, "--max-upload-buffer", help="Bytes that all unfinished uploads together may hold; further uploads are refused until room is made."),
    task_ack_timeout: float = typer.Option(30.0, "--task-ack-timeout", help="Seconds a selected device has to ack the round's task; the round does not wait for devices that did not."),
    align_every: int = typer.Option(0, "--align-every", help="Neuron-level alignment every T rounds (0 = never)."),
    align_fraction: float = typer.Option(0.5, "--align-fraction", help="Share of neurons frozen (the most used) during alignment."),
    align_steps: int = typer.Option(100, "--align-steps", help="Distillation steps per alignment."),
    public_data: Optional[Path] = typer.Option(None, "--public-data", help="Public data for alignment (default: the one given to prepare)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Labelled data (JSONL/CSV text or image folder) to evaluate the FM on each round."),
    eval_max_samples: Optional[int] = typer.Option(None, "--eval-max-samples", help="Evaluate on at most this many samples."),
    max_update_norm: Optional[float] = typer.Option(None, "--max-update-norm", help="Absolute ceiling on the L2 norm of a device's adapter change (on top of --norm-bound-factor)."),
    max_devices: int = typer.Option(100_000, "--max-devices", help="Devices the cloud keeps track of; when full, the offline device seen longest ago makes room and, with all online, new hellos are refused."),
    seed: int = typer.Option(0, "--seed", help="Seed for device sampling and local shuffles."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out at its next round. Refused unless --out holds a committed state.json of this --run-id and --bundle whose checkpoints match their recorded sha256."),
    fresh: bool = typer.Option(False, "--fresh", help="Start a new run in --out although it holds an earlier run's files: they are moved into --out/replaced-<time>/ first, never overwritten. Without --resume or --fresh, a folder holding a run is refused."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate for TLS to the broker."),
    cert: Optional[Path] = typer.Option(None, "--cert", help="Client certificate for TLS."),
    key: Optional[Path] = typer.Option(None, "--key", help="Client key for TLS."),
    username: Optional[str] = typer.Option(None, "--username", help="Broker user name (`provision` creates fedpft-cloud)."),
    password: Optional[str] = typer.Option(None, "--password", envvar="FEDPFT_MQTT_PASSWORD", help="Broker password (or env FEDPFT_MQTT_PASSWORD)."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (from `keygen`) that signs every task."),
    secure_agg: bool = SECURE_AGG_OPT,
    secagg_threshold: Optional[int] = SECAGG_T_OPT,
    secagg_degree: Optional[int] = SECAGG_DEGREE_OPT,
    secagg_stage_timeout: float = SECAGG_STAGE_OPT,
    dp_clip: Optional[float] = DP_CLIP_OPT,
    dp_noise: Optional[float] = DP_NOISE_OPT,
    dp_mode: str = DP_MODE_OPT,
    dp_delta: float = DP_DELTA_OPT,
    dp_max_epsilon: Optional[float] = DP_MAX_EPS_OPT,
    device: str = device_option("the FM (evaluation) and the proxy (alignment)", SERVE_PRECISION),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run federated rounds over MQTT: sample devices, collect and aggregate adapters, align, evaluate the FM."""
    from fedpft.cloud.config import ServeConfig
    from fedpft.shared.manifest import BundleError
    from fedpft.shared.transport import TransportError

    from .serve import serve as run_serve

    cfg = _validated(
        ServeConfig, bundle=bundle, out=out, broker=broker, run_id=run_id, rounds=rounds, clients_per_round=clients_per_round,
        fraction=fraction, min_clients=min_clients, round_timeout=round_timeout, wait_for_clients=wait_for_clients,
        local_epochs=local_epochs, lr=lr, batch_size=batch_size, max_steps=max_steps, align_every=align_every,
        align_fraction=align_fraction, align_steps=align_steps, public_data=public_data, eval_data=eval_data,
        eval_max_samples=eval_max_samples, norm_bound_factor=norm_bound_factor, weight_cap_factor=weight_cap_factor,
        max_client_samples=max_client_samples, aggregator=aggregator, trim_fraction=trim_fraction, upload_timeout=upload_timeout,
        max_upload_buffer=max_upload_buffer, task_ack_timeout=task_ack_timeout, max_update_norm=max_update_norm, max_devices=max_devices, seed=seed, resume=resume,
        ca=ca, cert=cert, key=key, username=username, password=password, signing_key=signing_key, device=device,
        secure_agg=secure_agg, secagg_threshold=secagg_threshold, secagg_degree=secagg_degree, secagg_stage_timeout=secagg_stage_timeout, dp_clip=dp_clip, dp_noise=dp_noise, dp_mode=dp_mode, dp_delta=dp_delta, dp_max_epsilon=dp_max_epsilon,
    )
    check_device(cfg.device)
    from fedpft.shared.signing import SignatureError

    from .state import RunStore

    if resume and fresh:
        fail("--resume and --fresh exclude each other: continue the run in --out, or start a new one there")
    try:
        moved = RunStore(out).set_aside() if fresh else None
    except OSError as exc:
        fail(f"--fresh: cannot move the earlier run's files in {out} aside: {exc}")
    if moved is not None:
        typer.echo(f"--fresh: the earlier run's files in {out} were moved to {moved}", err=True)
    try:
        state = run_serve(cfg, show_progress=not quiet)
    except (BundleError, TransportError, RuntimeError, FileNotFoundError, SignatureError) as exc:
        fail(str(exc))
    typer.echo(f"run {cfg.run_id}: {state.next_round} rounds done -> {out}/report.md")


@app.command()
def keygen(out: Path = typer.Option(..., "--out", "-o", help="Folder for signing.key (private, 0600) and signing.pub (give it to devices).")) -> None:
    """Make the cloud's Ed25519 signing key pair (for prepare/serve --signing-key and the devices' --trust-key)."""
    from fedpft.shared.signing import generate_keypair, key_id, load_public_key

    try:
        priv, pub = generate_keypair(out)
    except (FileExistsError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"key {key_id(load_public_key(pub))}: private {priv} (keep it in the cloud), public {pub} (devices: --trust-key)")


# Broker connection options shared by the fleet commands (typer reads an Option's metadata, so one serves many).
BROKER_OPT = typer.Option("mqtt://127.0.0.1:1883", "--broker", help="mqtt://host:port (or mqtts://) of the fleet's broker.")
FLEET_OPT = typer.Option("default", "--fleet", help="Fleet name: scopes the topics (fedpft/fleet/<fleet>/...).")
CA_OPT = typer.Option(None, "--ca", help="CA certificate for TLS to the broker.")
CERT_OPT = typer.Option(None, "--cert", help="Client certificate for TLS.")
KEY_OPT = typer.Option(None, "--key", help="Client key for TLS.")
USER_OPT = typer.Option(None, "--username", help="Broker user name.")
PASSWORD_OPT = typer.Option(None, "--password", envvar="FEDPFT_MQTT_PASSWORD", help="Broker password (or env FEDPFT_MQTT_PASSWORD).")


def _broker_options(broker, ca, cert, key, username, password) -> dict:
    return dict(broker=broker, ca=ca, cert=cert, key=key, username=username, password=password)


@app.command()
def rollout(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Bundle folder from `prepare` (its manifest's bundle_id and bundle_version name the version)."),
    cohort: Optional[str] = typer.Option(None, "--cohort", help="Roll out to the devices that declared this cohort."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Roll out to this share (0, 1] of the known devices, chosen deterministically by --seed."),
    rollback: bool = typer.Option(False, "--rollback", help="Return the cohort (or the devices of that --fraction) to the version they had before the last rollout."),
    broker: str = BROKER_OPT,
    fleet: str = FLEET_OPT,
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to serve the bundle and wait for the devices' acks."),
    state: Path = typer.Option(Path("fleet-state"), "--state", help="Folder of the rollout history and each group's previous version (what --rollback returns to)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --fraction selection."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key that signs the rollout message (devices with --trust-key require it)."),
    ca: Optional[Path] = CA_OPT,
    cert: Optional[Path] = CERT_OPT,
    key: Optional[Path] = KEY_OPT,
    username: Optional[str] = USER_OPT,
    password: Optional[str] = PASSWORD_OPT,
) -> None:
    """Publish a bundle version to a cohort or a fraction of the fleet (or roll it back) and print who installed it."""
    from fedpft.cloud.config import RolloutConfig
    from fedpft.shared.manifest import BundleError
    from fedpft.shared.messages import ProtocolError
    from fedpft.shared.signing import SignatureError
    from fedpft.shared.transport import TransportError

    from .rollout import RolloutError, rollout as run_rollout

    cfg = _validated(RolloutConfig, bundle=bundle, cohort=cohort, fraction=fraction, rollback=rollback, fleet=fleet, timeout=timeout,
                     state=state, seed=seed, signing_key=signing_key, **_broker_options(broker, ca, cert, key, username, password))
    try:
        report = run_rollout(cfg)
    except (RolloutError, BundleError, TransportError, SignatureError, ProtocolError, OSError, ValueError) as exc:
        fail(str(getattr(exc, "reason", exc)).splitlines()[0])
    what = "rollback to" if report.rollout.rollback else "rollout of"
    typer.echo(f"{report.rollout.rollout_id}: {what} {report.rollout.target} on {report.group}")
    for device, result in report.results.items():
        typer.echo(f"  {device}: {result}")
    typer.echo(f"{len(report.installed)}/{len(report.results)} installed")


@app.command()
def status(
    broker: str = BROKER_OPT,
    fleet: str = FLEET_OPT,
    ca: Optional[Path] = CA_OPT,
    cert: Optional[Path] = CERT_OPT,
    key: Optional[Path] = KEY_OPT,
    username: Optional[str] = USER_OPT,
    password: Optional[str] = PASSWORD_OPT,
) -> None:
    """Show each device's installed and previous version, cohort, presence, install state and last seen."""
    from rich.console import Console

    from fedpft.shared.config import BrokerConfig
    from fedpft.shared.messages import ProtocolError
    from fedpft.shared.transport import TransportError

    from .rollout import read_fleet, status_table

    cfg = _validated(BrokerConfig, **_broker_options(broker, ca, cert, key, username, password))
    try:
        views = read_fleet(cfg, fleet)
    except (TransportError, ProtocolError) as exc:
        fail(str(getattr(exc, "reason", exc)))
    Console(width=160).print(status_table(views, fleet))


@app.command()
def provision(
    device: str = typer.Option(..., "--device", help="Device id; it becomes the device's broker user name."),
    run: str = typer.Option("default", "--run", help="Run the device takes part in (its topics fedpft/<run>/device/<id>/...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Broker folder: mosquitto.passwd, mosquitto.acl, mosquitto.conf, passwords (0600)."),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="Also let the device follow this fleet's rollouts (`fedpft-edge fleet`; its topics fedpft/fleet/<fleet>/device/<id>/...)."),
    bind: Optional[str] = typer.Option(None, "--bind", help="Address of mosquitto.conf's plain (unencrypted) listener (default 127.0.0.1: this machine only); name a LAN address only on a network you trust."),
    port: Optional[int] = typer.Option(None, "--port", help="Port of the plain listener (default 1883)."),
    certfile: Optional[Path] = typer.Option(None, "--certfile", help="Broker's TLS certificate (PEM): adds a TLS listener (needs --keyfile)."),
    keyfile: Optional[Path] = typer.Option(None, "--keyfile", help="Private key of --certfile (PEM)."),
    cafile: Optional[Path] = typer.Option(None, "--cafile", help="CA certificate(s) for the TLS listener (PEM), as Mosquitto's `cafile`."),
    tls_bind: Optional[str] = typer.Option(None, "--tls-bind", help="Address of the TLS listener (default 0.0.0.0: every IPv4 interface)."),
    tls_port: Optional[int] = typer.Option(None, "--tls-port", help="Port of the TLS listener (default 8883)."),
) -> None:
    """Create or replace a device's broker credentials and ACL (own topics only), and the cloud's user.

    mosquitto.conf is (re)written when any listener option is given, or when it is missing or predates `use_username_as_clientid`; otherwise it is left as it is. It always has `allow_anonymous false`, `use_username_as_clientid true` (a device's credentials cannot take another device's client id) and a plain listener on --bind:--port; a TLS listener on --tls-bind:--tls-port only with --certfile and --keyfile.
    """
    from .provision import CLOUD_USER, ProvisionError, listeners, provision as run_provision

    opts = {"bind": bind, "port": port, "tls_bind": tls_bind, "tls_port": tls_port, "cafile": cafile, "certfile": certfile, "keyfile": keyfile}
    given = {k: v for k, v in opts.items() if v is not None}
    try:
        res = run_provision(out, device, run, fleet, listeners(**given) if given else None)
    except (ProvisionError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"device {device} (run {run}{f', fleet {fleet}' if fleet else ''}): password in {res.password_file}; cloud user {CLOUD_USER}: "
               f"{res.cloud_password_file}; broker files in {out} (reload Mosquitto to apply)")
    if res.conf is not None:
        tls = res.conf.tls
        typer.echo(f"mosquitto.conf: plain listener {res.conf.bind}:{res.conf.port}"
                   + (f", TLS listener {tls.bind}:{tls.port}" if tls else ", no TLS listener (give --certfile and --keyfile for one)"))


@app.command()
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
    local_epochs: int = typer.Option(2, "--local-epochs", help="Local epochs per round."),
    lr: float = typer.Option(3e-3, "--lr", help="Devices' learning rate."),
    batch_size: int = typer.Option(16, "--batch-size", help="Devices' batch size."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on local steps per round."),
    max_length: int = typer.Option(64, "--max-length", help="Token limit."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling, partition, initialisation."),
    broker: Optional[str] = typer.Option(None, "--broker", help="Use this MQTT broker instead of the embedded one."),
    edge_python: Optional[Path] = typer.Option(None, "--edge-python", envvar="FEDPFT_EDGE_PYTHON", help="Python interpreter of the device processes, e.g. a venv with only the edge extra (plain onnxruntime, as devices install it). Default: this Python (the cloud's onnxruntime-training build, whose inference core runs the same graphs)."),
    device: str = device_option("the cloud's FM and proxy (distillation, alignment, evaluation; the device processes run ONNX Runtime on CPU)",
                                f"{DISTILL_PRECISION} {SERVE_PRECISION}"),
    secure_agg: bool = SECURE_AGG_OPT,
    secagg_threshold: Optional[int] = SECAGG_T_OPT,
    secagg_degree: Optional[int] = SECAGG_DEGREE_OPT,
    secagg_stage_timeout: float = SECAGG_STAGE_OPT,
    dp_clip: Optional[float] = DP_CLIP_OPT,
    dp_noise: Optional[float] = DP_NOISE_OPT,
    dp_mode: str = DP_MODE_OPT,
    dp_delta: float = DP_DELTA_OPT,
    dp_max_epsilon: Optional[float] = DP_MAX_EPS_OPT,
    engine: str = typer.Option("processes", "--engine", help="processes: N real `fedpft-edge` processes over MQTT (the deployment path). virtual: the same edge agents and ORT trainer on threads of this process over an in-memory hub (same protocol, aggregation, alignment and metrics; no broker, no process start-up; for research sweeps)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a complete federation on this machine: prepare, partition, N edge agents (real processes, or virtual clients with --engine virtual), rounds, report."""
    from fedpft.cloud.config import SimulateConfig

    from .partition import parse_scheme
    from .simulate import simulate as run_simulate

    try:
        parse_scheme(partition)
    except ValueError as exc:
        fail(str(exc))
    cfg = _validated(
        SimulateConfig, out=out, model=model, data=data, clients=clients, rounds=rounds, partition=partition, method=method,
        max_samples=max_samples, eval_samples=eval_samples, distill_steps=distill_steps, align_every=align_every,
        align_steps=align_steps, local_epochs=local_epochs, lr=lr, batch_size=batch_size, max_steps=max_steps,
        max_length=max_length, seed=seed, broker=broker, ffn_keep=ffn_keep, edge_python=edge_python, device=device,
        engine=engine, secure_agg=secure_agg, secagg_threshold=secagg_threshold, secagg_degree=secagg_degree, secagg_stage_timeout=secagg_stage_timeout, dp_clip=dp_clip, dp_noise=dp_noise, dp_mode=dp_mode, dp_delta=dp_delta, dp_max_epsilon=dp_max_epsilon,
    )
    check_device(cfg.device)
    try:
        run = run_simulate(cfg, show_progress=not quiet)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0])
    typer.echo(f"simulation done: {run}/report.md, {run}/accuracy.png, {run}/metrics.jsonl")


@app.command("export")
def export_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run folder written by `fedpft-cloud serve` (holds state.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder to create (must not exist or be empty)."),
    round_id: Optional[int] = typer.Option(None, "--round", help="Export the adapters of this round (default: the run's latest)."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also export and check an ONNX inference model (optimum)."),
    device: str = device_option("loading, plugging and merging the FM",
                                "Always fp32 (no autocast, no TF32): the merge parity check needs it; the merged model is saved and exported to ONNX from CPU."),
) -> None:
    """Plug the run's global adapters into the FM: PEFT adapter folder, merged HF model, ONNX, export.json."""
    from .hf_export import ExportError, export_run
    from fedpft.cloud.config import ExportConfig

    cfg = _validated(ExportConfig, run=run, out=out, round=round_id, onnx=onnx, device=device)
    check_device(cfg.device)
    try:
        res = export_run(cfg.run, cfg.out, round_id=cfg.round, onnx=cfg.onnx, device=cfg.device)
    except ExportError as exc:
        fail(str(exc))
    onnx_note = f", ONNX max |diff| {res.onnx_max_diff:.1e}" if res.onnx_max_diff is not None else ""
    typer.echo(
        f"run {res.source.run_id} round {'init' if res.source.round is None else res.source.round} -> {out}  "
        f"(adapter/, merged/{', onnx/' if onnx else ''}; merged vs PEFT max |diff| {res.merge_max_diff:.1e}{onnx_note}, "
        f"{sum(res.seconds.values()):.0f}s)"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
