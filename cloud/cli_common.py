"""What the `fedpft-cloud` command modules share: the one-line error exit, config validation, the
--device option, and the privacy options that serve and simulate both take."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit: how every known error ends."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _validated(model_cls, **kwargs):
    from pydantic import ValidationError

    try:
        return model_cls(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        # name the option as the user typed it; model-level checks already name theirs
        fail(f"--{str(err['loc'][0]).replace('_', '-')}: {msg}" if err["loc"] else msg)


def from_options(model_cls, options: dict):
    """The config of a command whose options carry its fields' names (`options`: the command's locals)."""
    named = {**options, **options.get("privacy", {})}  # what `with_options(PRIVACY_OPTIONS)` added
    return _validated(model_cls, **{k: v for k, v in named.items() if k in model_cls.model_fields})


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


# Bounds on one device's influence, shared by serve and simulate (ServeConfig validates them).
NORM_BOUND_OPT = typer.Option(3.0, "--norm-bound-factor", help="Clip a device's adapter change to this multiple of the round's typical change (lower median of the round's norms and the previous round's); 0 = off. Bounded updates are logged and recorded in metrics.jsonl.")
WEIGHT_CAP_OPT = typer.Option(3.0, "--weight-cap-factor", help="Cap a device's FedAvg weight (its sample count) at this multiple of the round's typical weight; 0 = off (plain sample-weighted FedAvg: on skewed partitions the cap also holds back honest large devices).")


# --frozen-dtype of prepare and simulate (PrepareConfig validates the name).
FROZEN_DTYPE_OPT = typer.Option(
    "float32", "--frozen-dtype",
    help="Storage of the proxy's frozen weight matrices in the device bundle: float32, or float16, which halves what "
         "devices download and store (devices upcast on load and train in float32 as before; the cloud rounds its own "
         "proxy to the same values, so cloud and devices compute with identical weights). Adapters, biases and "
         "LayerNorm stay float32. Devices need a fedpft with float16 bundle support (this one); older ones refuse the bundle as an invalid manifest.",
)


# --align-objective of serve and simulate (one Option serves both; ServeConfig validates the name).
ALIGN_OBJECTIVE_OPT = typer.Option(
    "hidden-mse", "--align-objective",
    help="What neuron-level alignment trains the proxy's unfrozen FFN neurons to minimise, with the FM + the round's "
         "adapters as teacher, on public data: hidden-mse (relative MSE of the compressed layers' outputs, the paper's; "
         "the default), logit-kl (KL(FM || proxy) of the classifier outputs) or lora-grad (the gap between the proxy's and "
         "the FM's gradients w.r.t. the adapters on FM-labelled public batches, the quantity FedPFT's convergence bound is "
         "about; each step a double backward, 2.7x a hidden-mse step's CPU), or hidden-mse+lora-grad (their sum: lora-grad alone "
         "let the layer gap double over a run; in the isolated test, 4 orders, 1.2 points worse than layer-only distillation, 95% interval [-3.3, +0.9]). The last three aim at adapter transfer and are "
         "not the default, not having beaten layer-only distillation beyond the noise: in the isolated test (4 training orders "
         "from a round-3 state) logit-kl's adapters served the FM 0.2 points worse than layer-only distillation's, 95% interval "
         "[-1.6, +1.3] (BENCHMARKS.md, alignment_objective_r3), lora-grad's 1.7 points better in all 4 orders, interval "
         "[-1.8, +5.1] (alignment_grad); in the federation over 3 seeds (Dirichlet 0.5, 20 rounds; BENCHMARKS.md, seeds) logit-kl "
         "ended 0.1 points below layer-only distillation, 95% interval [-2.1, +1.9].",
)


def check_device(name: str) -> None:
    """Refuse a --device this machine lacks before any work starts (one line, non-zero exit)."""
    from .device import DeviceError, resolve_device

    try:
        resolve_device(name)
    except DeviceError as exc:
        fail(str(exc))


# Secure aggregation and DP options of serve and simulate, for `with_options`.
PRIVACY_OPTIONS = {
    "secure_agg": (bool, typer.Option(False, "--secure-agg", help="Secure aggregation (SecAgg over MQTT): the cloud learns only the sum of the round's adapter changes and neuron counts, never one device's update; devices that drop after masking are recovered while at most n - T drop. The run folder then holds no individual update.")),
    "secagg_threshold": (Optional[int], typer.Option(None, "--secagg-threshold", help="Shamir threshold T of --secure-agg: the round survives n - T devices dropping after their shares, and no T - 1 colluders learn a device's masks. Default 2n/3 + 1 of the round's n devices; must be a strict majority.")),
    "secagg_degree": (Optional[int], typer.Option(None, "--secagg-degree", help="SecAgg+ (Bell et al. 2020): each device masks with and shares among d neighbours (even) instead of every device: O(d) work per device for large rounds; T then counts among d + 1 holders. Default: all (SecAgg).")),
    "secagg_stage_timeout": (float, typer.Option(60.0, "--secagg-stage-timeout", help="Seconds each short --secure-agg stage (keys, shares, unmask) waits for the devices; the masked-input stage waits until the round's deadline.")),
    "dp_clip": (Optional[float], typer.Option(None, "--dp-clip", help="Client-level DP: each device clips its adapter change to this L2 norm C and weighs 1 (uniform average over the devices whose update arrived).")),
    "dp_noise": (Optional[float], typer.Option(None, "--dp-noise", help="DP noise multiplier Z: Gaussian noise of std Z*C on the round's sum (needs --dp-clip). Epsilon at --dp-delta is written to metrics.jsonl and report.md each round.")),
    "dp_mode": (str, typer.Option("central", "--dp-mode", help="central: the cloud adds the noise to the sum; distributed (needs --secure-agg): each device adds its share of it under the masks, so nobody sees an un-noised sum.")),
    "dp_delta": (float, typer.Option(1e-5, "--dp-delta", help="The delta at which the accountant (dp-accounting, RDP) reports epsilon.")),
    "dp_max_epsilon": (Optional[float], typer.Option(None, "--dp-max-epsilon", help="End the run cleanly (one line, state committed) before a round whose privacy cost would take epsilon past this.")),
}


def with_options(table: dict, before: str | None = None):
    """Give a command that takes `**options` the options of `table` (name -> (type, Option)), listed in
    --help ahead of its option `before` (last without it); they then arrive in `options` by name.

    typer builds a command from its function's signature and type hints, so both are extended.
    """
    def add(command):
        params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in params].index(before) if before else len(params)
        extra = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=opt, annotation=kind)
                 for name, (kind, opt) in table.items()]
        command.__signature__ = inspect.Signature(params[:at] + extra + params[at:], return_annotation=None)
        command.__annotations__.update({name: kind for name, (kind, _) in table.items()})
        return command
    return add


# Broker connection options shared by the fleet commands (typer reads an Option's metadata, so one serves many).
BROKER_OPT = typer.Option("mqtt://127.0.0.1:1883", "--broker", help="mqtt://host:port (or mqtts://) of the fleet's broker.")
FLEET_OPT = typer.Option("default", "--fleet", help="Fleet name: scopes the topics (fedpft/fleet/<fleet>/...).")
CA_OPT = typer.Option(None, "--ca", help="CA certificate for TLS to the broker.")
CERT_OPT = typer.Option(None, "--cert", help="Client certificate for TLS.")
KEY_OPT = typer.Option(None, "--key", help="Client key for TLS.")
USER_OPT = typer.Option(None, "--username", help="Broker user name.")
PASSWORD_OPT = typer.Option(None, "--password", envvar="FEDPFT_MQTT_PASSWORD", help="Broker password (or env FEDPFT_MQTT_PASSWORD).")
# TLS and credentials of the fleet commands, for `with_options`.
TLS_OPTIONS = {
    "ca": (Optional[Path], CA_OPT), "cert": (Optional[Path], CERT_OPT), "key": (Optional[Path], KEY_OPT),
    "username": (Optional[str], USER_OPT), "password": (Optional[str], PASSWORD_OPT),
}
