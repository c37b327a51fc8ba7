"""`fedpft-cloud keygen`, `rollout`, `status` and `provision`: signing keys, fleet versions and broker credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import BROKER_OPT, FLEET_OPT, TLS_OPTIONS, _validated, fail, with_options


def keygen(out: Path = typer.Option(..., "--out", "-o", help="Folder for signing.key (private, 0600) and signing.pub (give it to devices).")) -> None:
    """Make the cloud's Ed25519 signing key pair (for prepare/serve --signing-key and the devices' --trust-key)."""
    from fedpft.shared.signing import generate_keypair, key_id, load_public_key

    try:
        priv, pub = generate_keypair(out)
    except (FileExistsError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"key {key_id(load_public_key(pub))}: private {priv} (keep it in the cloud), public {pub} (devices: --trust-key)")


@with_options(TLS_OPTIONS)
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
    **tls,
) -> None:
    """Publish a bundle version to a cohort or a fraction of the fleet (or roll it back) and print who installed it."""
    from fedpft.cloud.config import RolloutConfig
    from fedpft.shared.manifest import BundleError
    from fedpft.shared.messages import ProtocolError
    from fedpft.shared.signing import SignatureError
    from fedpft.shared.transport import TransportError

    from .rollout import RolloutError, rollout as run_rollout

    cfg = _validated(RolloutConfig, bundle=bundle, cohort=cohort, fraction=fraction, rollback=rollback, fleet=fleet, timeout=timeout,
                     state=state, seed=seed, signing_key=signing_key, broker=broker, **tls)
    try:
        report = run_rollout(cfg)
    except (RolloutError, BundleError, TransportError, SignatureError, ProtocolError, OSError, ValueError) as exc:
        fail(str(getattr(exc, "reason", exc)).splitlines()[0])
    what = "rollback to" if report.rollout.rollback else "rollout of"
    typer.echo(f"{report.rollout.rollout_id}: {what} {report.rollout.target} on {report.group}")
    for device, result in report.results.items():
        typer.echo(f"  {device}: {result}")
    typer.echo(f"{len(report.installed)}/{len(report.results)} installed")


@with_options(TLS_OPTIONS)
def status(
    broker: str = BROKER_OPT,
    fleet: str = FLEET_OPT,
    **tls,
) -> None:
    """Show each device's installed and previous version, cohort, presence, install state and last seen."""
    from rich.console import Console

    from fedpft.shared.config import BrokerConfig
    from fedpft.shared.messages import ProtocolError
    from fedpft.shared.transport import TransportError

    from .rollout import read_fleet, status_table

    cfg = _validated(BrokerConfig, broker=broker, **tls)
    try:
        views = read_fleet(cfg, fleet)
    except (TransportError, ProtocolError) as exc:
        fail(str(getattr(exc, "reason", exc)))
    Console(width=160).print(status_table(views, fleet))


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

