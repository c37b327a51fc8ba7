"""Typed configs of the cloud commands (prepare, serve, rollout, simulate, export), and the
--device grammar they share. Pure pydantic (no torch); saved beside what they made (a bundle's
prepare_config.json, a run's serve_config.json) and read back as these models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from fedpft.shared.config import BrokerConfig, safe_id
from fedpft.shared.manifest import ROLE_PREPARE_CONFIG, BundleError, BundleManifest
from fedpft.shared.methods import METHODS, proxies
from fedpft.shared.precision import FrozenDtype

from .checks import CHECK_WORKERS

# names from the one method table (shared/methods.py)
ProxyMethod = Literal[proxies()]  # type: ignore[valid-type]


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_device(text: str) -> str:
    """The canonical --device name (lower case, no blanks), or ValueError naming the choices.

    Only the grammar: whether this machine has the device is fedpft.cloud.device's question."""
    name = str(text).strip().lower()
    if not _DEVICE_NAME.match(name):
        raise ValueError(f"'{text}' is not a device: give {DEVICE_CHOICES}")
    return name


# The torch device of the cloud's model work: auto | cpu | cuda | cuda:N | mps (fedpft.cloud.device).
TorchDevice = Annotated[str, AfterValidator(parse_device)]
DEVICE_DESCRIPTION = "torch device of the FM and proxy work: auto (first CUDA GPU, else MPS, else CPU), cpu, cuda, cuda:N, mps"


FROZEN_DTYPE_DESCRIPTION = ("storage of the proxy's frozen weight matrices in the device bundle: float16 halves the "
                            "download (devices upcast on load and compute in float32; the cloud's proxy is rounded to the same values)")


class PrepareConfig(BaseModel):
    """Everything `fedpft-cloud prepare` needs; saved as prepare_config.json in each bundle."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local Hugging Face folder, hub id, or alias (vit-base, bert-base, roberta-base, minilm)")
    out: Path
    labels: list[str] | None = None
    num_labels: int | None = Field(default=None, ge=1)
    public_data: Path | None = None
    proxy: ProxyMethod = "fedpft"
    distill_steps: int = Field(default=200, ge=0)
    distill_lr: float = Field(default=5e-4, gt=0)
    distill_alpha: float = Field(default=0.0, ge=0, description="weight of the W_out·W_in product loss")
    keep_layers: list[int] | None = Field(default=None, description="layers left uncompressed; default first and last")
    ffn_keep: float = Field(default=0.25, description="fraction of FFN neurons kept in compressed layers, (0, 1]")
    fedot_layers: int | None = Field(default=None, ge=2, description="layers kept by the fedot layer-drop proxy")
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    max_length: int = Field(default=128, ge=8)
    batch_size: int = Field(default=16, ge=1)
    dropout: float | None = Field(default=None, ge=0, lt=1, description="override the FM's dropout in the training graph")
    frozen_dtype: FrozenDtype = Field(default="float32", description=FROZEN_DTYPE_DESCRIPTION)
    seed: int = 0
    bundle_version: int = Field(default=1, ge=1, description="version number in the manifest (fleet rollouts install by it)")
    # Ed25519 private key (fedpft-cloud keygen) that signs the manifest; a local path, so it is
    # left out of the prepare_config the bundle records.
    signing_key: Path | None = None
    # where the FM and the proxy are distilled; not part of the bundle (left out of prepare_config.json)
    device: TorchDevice = Field(default="auto", description=DEVICE_DESCRIPTION)

    @model_validator(mode="after")
    def _check(self) -> "PrepareConfig":
        if not (0.0 < self.ffn_keep <= 1.0):
            raise ValueError(f"--ffn-keep must be in (0, 1], got {self.ffn_keep}")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be unique")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ValueError(f"--num-labels {self.num_labels} does not match the {len(self.labels)} labels given")
        if self.keep_layers is not None and len(set(self.keep_layers)) != len(self.keep_layers):
            raise ValueError(f"--keep-layers has duplicates: {self.keep_layers}")
        return self

    def resolved_labels(self) -> list[str]:
        if self.labels is not None:
            return list(self.labels)
        return [f"LABEL_{i}" for i in range(self.num_labels or 2)]


def load_prepare_config(bundle: Path, manifest: BundleManifest | None = None) -> PrepareConfig:
    """The PrepareConfig a bundle was made with, found through its manifest role; BundleError
    (one line) if it is missing, unreadable or invalid. Keys this version does not know (a newer
    fedpft's) are left out rather than refused; `signing_key` and `device` were never recorded."""
    manifest = manifest or BundleManifest.load(bundle)
    path = manifest.file_path(bundle, ROLE_PREPARE_CONFIG)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON object is expected, not {type(raw).__name__}")
        return PrepareConfig.model_validate({k: v for k, v in raw.items() if k in PrepareConfig.model_fields})
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        why = str(exc).strip().splitlines()
        raise BundleError(f"{path}: cannot read the bundle's prepare config ({' '.join(why[:2]) or type(exc).__name__})") from None


class PrivacyOptions(BaseModel):
    """Secure aggregation and client-level DP (issue 14; docs/protocol.md). All off by default, and
    then nothing of a run changes: wire, run folder and results are exactly those of a plain run."""

    secure_agg: bool = Field(default=False, description="the cloud learns only the round's sum (SecAgg over MQTT)")
    secagg_threshold: int | None = Field(default=None, ge=2, description="Shamir threshold T; None = 2n/3 + 1 of the round's n devices")
    secagg_degree: int | None = Field(default=None, ge=2, description="SecAgg+: each device masks with d neighbours (even); None = all")
    secagg_stage_timeout: float = Field(default=60.0, gt=0, description="seconds each short secagg stage (keys, shares, unmask) waits")
    dp_clip: float | None = Field(default=None, gt=0, description="DP: devices clip their change to this L2 norm and weigh 1")
    dp_noise: float | None = Field(default=None, gt=0, description="DP: Gaussian noise multiplier Z (std Z * clip on the sum)")
    dp_mode: Literal["central", "distributed"] = "central"
    dp_delta: float = Field(default=1e-5, gt=0, lt=1, description="the delta epsilon is reported at")
    dp_max_epsilon: float | None = Field(default=None, gt=0, description="end the run before a round would spend more")

    @model_validator(mode="after")
    def _privacy(self):
        if self.dp_noise is not None and self.dp_clip is None:
            raise ValueError("--dp-noise needs --dp-clip (the noise is calibrated to the clip)")
        if self.dp_max_epsilon is not None and self.dp_noise is None:
            raise ValueError("--dp-max-epsilon needs --dp-noise (without noise nothing is accounted)")
        if self.dp_mode == "distributed" and not (self.secure_agg and self.dp_noise is not None):
            raise ValueError("--dp-mode distributed needs --secure-agg and --dp-noise (devices add the noise under the masks)")
        if (self.secagg_threshold is not None or self.secagg_degree is not None) and not self.secure_agg:
            raise ValueError("--secagg-threshold and --secagg-degree need --secure-agg")
        if self.secagg_degree is not None and self.secagg_degree % 2:
            raise ValueError(f"--secagg-degree must be even (a circulant graph), got {self.secagg_degree}")
        return self

    def privacy_fields(self) -> dict:
        """The privacy options as given (for passing from simulate to serve)."""
        return {k: getattr(self, k) for k in PrivacyOptions.model_fields}

    def default_privacy(self) -> set[str]:
        """Privacy options left at their defaults: kept out of serve_config.json, so a plain run's
        folder is what it was before these options existed."""
        return {k for k, f in PrivacyOptions.model_fields.items() if getattr(self, k) == f.default}


# What neuron-level alignment trains the proxy's unfrozen FFN neurons to minimise (cloud/alignment.py).
# hidden-mse: relative MSE of the compressed layers' outputs, proxy vs FM (the paper's; the default).
# logit-kl: KL(FM || proxy) of the classifier outputs, both with the round's adapters.
# lora-grad: relative gap between proxy and FM gradients w.r.t. the adapters, on FM-labelled public batches.
ALIGN_OBJECTIVES = ("hidden-mse", "logit-kl", "lora-grad", "hidden-mse+lora-grad")
AlignObjective = Literal[ALIGN_OBJECTIVES]  # type: ignore[valid-type]


class ServeConfig(BrokerConfig, PrivacyOptions):
    """`fedpft-cloud serve`: one federated run over MQTT; saved as RUN/serve_config.json."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path
    out: Path
    broker: str | None = Field(default=None, description="mqtt://host:port; None starts the embedded broker")  # type: ignore[assignment]
    run_id: str = "default"
    rounds: int = Field(default=3, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0, le=1)
    min_clients: int = Field(default=1, ge=1)
    round_timeout: float = Field(default=600.0, gt=0)
    wait_for_clients: float = Field(default=120.0, ge=0, description="seconds to wait for min_clients to come online")
    max_round_retries: int = Field(default=1, ge=0)
    local_epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=16, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    align_every: int = Field(default=0, ge=0, description="neuron-level alignment every T rounds; 0 = never")
    align_fraction: float = Field(default=0.5, ge=0, le=1)
    align_steps: int = Field(default=100, ge=0)
    align_lr: float = Field(default=5e-4, gt=0)
    public_data: Path | None = None
    eval_data: Path | None = None
    eval_max_samples: int | None = Field(default=None, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    chunk_size: int = Field(default=1 << 20, ge=1024)
    max_update_bytes: int = Field(default=256 << 20, ge=1024)
    # Bounds on one device's influence (docs/protocol.md, "Bounded updates"): a device's change is
    # clipped to norm_bound_factor x the round's typical change (0 = off), never above max_update_norm;
    # its FedAvg weight is at most its Hello's num_samples, max_client_samples and
    # weight_cap_factor x the round's typical weight (0 = off).
    max_update_norm: float | None = Field(default=None, gt=0, description="absolute ceiling on the L2 norm of a device's change")
    norm_bound_factor: float = Field(default=3.0, ge=0, description="clip changes above this multiple of the round's typical norm; 0 = off")
    weight_cap_factor: float = Field(default=3.0, ge=0, description="cap FedAvg weights at this multiple of the round's typical weight; 0 = off")
    max_client_samples: int | None = Field(default=None, ge=1, description="per-run maximum FedAvg weight (samples) of one device")
    aggregator: Literal["fedavg", "median", "trimmed-mean"] = "fedavg"
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5, description="share trimmed from each end by --aggregator trimmed-mean")
    # Uploads and acks: what a device that stops half-way (or never starts) may cost the cloud.
    upload_timeout: float = Field(default=120.0, gt=0, description="drop an unfinished upload after this many seconds without a chunk")
    max_upload_buffer: int = Field(default=1 << 30, ge=1024, description="bytes all uploads not yet checked and folded (arriving, or in their checks) may hold")
    check_workers: int = Field(default=CHECK_WORKERS, ge=1, le=64, description="threads that check and durably write uploads (with check_processes 0)")
    check_processes: int = Field(default=0, ge=0, le=64, description="processes that check, durably write and fold uploads "
                                 "(0: the check_workers threads in the cloud's process; `serve` defaults to 2 on 2+ cores)")
    task_ack_timeout: float = Field(default=30.0, gt=0, description="a selected device that has not acked the task by then is not waited for")
    max_devices: int = Field(default=100_000, ge=1, description="devices the cloud keeps track of; offline ones make room")
    seed: int = 0
    resume: bool = False
    # broker TLS and credentials come from BrokerConfig (fedpft-cloud provision writes the cloud's password file)
    signing_key: Path | None = Field(default=None, description="Ed25519 private key that signs every Task")
    device: TorchDevice = Field(default="auto", description=DEVICE_DESCRIPTION)
    align_objective: AlignObjective = Field(default="hidden-mse", description="what alignment minimises: " + ", ".join(ALIGN_OBJECTIVES))

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give --clients-per-round or --fraction, not both")
        if self.clients_per_round is not None and self.min_clients > self.clients_per_round:
            raise ValueError(f"--min-clients {self.min_clients} exceeds --clients-per-round {self.clients_per_round}")
        if self.dp_noise is not None and self.align_every and not self.secure_agg:
            raise ValueError("DP with --align-every needs --secure-agg: only then are the neuron counts sent as rates and noised")
        if self.dp_clip is not None and self.aggregator != "fedavg":
            raise ValueError("DP (--dp-clip) calibrates its noise to a sum: use --aggregator fedavg")
        return self


class RolloutConfig(BrokerConfig):
    """`fedpft-cloud rollout`: a bundle version (or a rollback) to a cohort or a fraction of the fleet."""

    bundle: Path | None = None
    cohort: str | None = None
    fraction: float | None = Field(default=None, gt=0, le=1)
    rollback: bool = False
    fleet: str = "default"
    timeout: float = Field(default=120.0, gt=0, description="seconds to wait for the devices' acks")
    state: Path = Path("fleet-state")
    seed: int = Field(default=0, ge=0, description="seed of the --fraction selection")
    chunk_size: int = Field(default=1 << 20, ge=1024)
    settle: float = Field(default=0.5, ge=0, description="seconds to collect the retained device statuses")
    signing_key: Path | None = Field(default=None, description="Ed25519 private key that signs the Rollout message")

    @model_validator(mode="after")
    def _check(self) -> "RolloutConfig":
        if (self.cohort is None) == (self.fraction is None):
            raise ValueError("give exactly one of --cohort or --fraction")
        if self.rollback == (self.bundle is not None):
            raise ValueError("a rollback takes no --bundle" if self.rollback else "give --bundle (or --rollback)")
        safe_id(self.cohort, "--cohort"), safe_id(self.fleet, "--fleet")
        return self


SimMethod = Literal[tuple(METHODS)]  # type: ignore[valid-type]
SimEngine = Literal["processes", "virtual"]
VirtualTrainer = Literal["auto", "ort", "torch"]
VirtualPrecision = Literal["fp32", "bf16"]


class SimulateConfig(PrivacyOptions):
    """`fedpft-cloud simulate`: prepare, partition, start real devices, run rounds, report."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    model: str = "minilm"
    data: Path | None = Field(default=None, description="folder with train.jsonl, test.jsonl, labels.json, public.txt; None = shipped debian-sections")
    clients: int = Field(default=3, ge=1)
    rounds: int = Field(default=3, ge=1)
    partition: str = "iid"
    method: SimMethod = "fedpft"
    max_samples: int | None = Field(default=900, ge=1, description="training samples used across all clients")
    eval_samples: int | None = Field(default=300, ge=1)
    distill_steps: int = Field(default=60, ge=0)
    ffn_keep: float = Field(default=0.25, gt=0, le=1, description="share of FFN neurons the proxy keeps in compressed layers")
    align_every: int | None = Field(default=None, ge=0, description="None = halfway through the run for fedpft")
    align_steps: int = Field(default=30, ge=0)
    align_fraction: float = Field(default=0.5, ge=0, le=1)
    local_epochs: int = Field(default=2, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    batch_size: int = Field(default=16, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=64, ge=8)
    round_timeout: float = Field(default=1800.0, gt=0)
    seed: int = 0
    broker: str | None = None
    edge_python: Path | None = Field(default=None, description="Python of the device processes (a venv with fedpft[edge]); None = this one")
    device: TorchDevice = Field(default="auto", description=DEVICE_DESCRIPTION)
    engine: SimEngine = Field(default="processes", description="processes: real edge processes over MQTT; virtual: the same edge agents on threads of the cloud process, over an in-memory hub")
    virtual_parallel: int | None = Field(default=None, ge=1, description="virtual engine: clients training at once, the cores split among them (None = one per core)")
    norm_bound_factor: float = Field(default=3.0, ge=0, description="serve's --norm-bound-factor: clip changes above this multiple of the round's typical norm; 0 = off")
    weight_cap_factor: float = Field(default=3.0, ge=0, description="serve's --weight-cap-factor: cap FedAvg weights at this multiple of the round's typical weight; 0 = off")
    virtual_trainer: VirtualTrainer = Field(default="auto", description="virtual engine: ort (the edge's own trainer), torch (the bundle's proxy in torch, same loss and optimizer), auto (ort on CPU, torch on a GPU)")
    virtual_precision: VirtualPrecision = Field(default="fp32", description="virtual engine, torch trainer: fp32, or bf16 autocast of the forward and backward (adapters, optimizer and loss stay fp32)")
    align_objective: AlignObjective = Field(default="hidden-mse", description="what alignment minimises: " + ", ".join(ALIGN_OBJECTIVES))
    frozen_dtype: FrozenDtype = Field(default="float32", description=FROZEN_DTYPE_DESCRIPTION)

    @model_validator(mode="after")
    def _engine_options(self) -> "SimulateConfig":
        # silently ignoring it would let a user believe a broker was exercised (--edge-python is
        # not refused: it also comes from the environment, FEDPFT_EDGE_PYTHON)
        if self.engine == "virtual" and self.broker is not None:
            raise ValueError("--broker only applies to --engine processes (virtual clients talk to the cloud in memory)")
        if self.engine != "virtual" and self.virtual_parallel is not None:
            raise ValueError("--virtual-parallel only applies to --engine virtual")
        if self.engine != "virtual" and (self.virtual_trainer != "auto" or self.virtual_precision != "fp32"):
            raise ValueError("--virtual-trainer and --virtual-precision only apply to --engine virtual")
        if self.virtual_precision != "fp32" and self.virtual_trainer == "ort":
            raise ValueError(f"--virtual-precision {self.virtual_precision} needs --virtual-trainer torch (the ORT trainer is fp32, as on devices)")
        # refused here, before a bundle is prepared, rather than by serve's config minutes later
        if self.secure_agg and self.clients < 2:
            raise ValueError("--secure-agg needs at least 2 --clients (a sum of one is that device's update)")
        if self.dp_noise is not None and self.resolved_align_every() and not self.secure_agg:
            raise ValueError("DP with alignment (fedpft aligns by default) needs --secure-agg, or --align-every 0")
        return self

    def resolved_align_every(self) -> int:
        if not METHODS[self.method].align:
            return 0
        return max(1, (self.rounds + 1) // 2) if self.align_every is None else self.align_every


class ExportConfig(BaseModel):
    """`fedpft-cloud export`: a run's adapters -> PEFT adapter, merged HF model, ONNX."""

    model_config = ConfigDict(extra="forbid")

    run: Path
    out: Path
    round: int | None = Field(default=None, ge=0, description="None = the run's latest adapters")
    onnx: bool = True
    device: TorchDevice = Field(default="auto", description=DEVICE_DESCRIPTION)
