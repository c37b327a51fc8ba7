"""The bundle manifest: the only way a device finds, checks and understands its files.

Written by `fedpft.export`, read by `fedpft.edge` and by the cloud when it runs rounds.
Pure pydantic + hashlib so that both sides can import it without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

MANIFEST_NAME = "manifest.json"
# 2: the device graph is lowered to standard ops (plain onnxruntime), parameters in safetensors
MANIFEST_SCHEMA = 2

# What a bundle's device files need to train. Bundles made before schema 2 carry no `runtime`
# field and needed onnxruntime-training's on-device API; devices now run plain onnxruntime.
RUNTIME_PLAIN = "onnxruntime"
RUNTIME_TRAINING = "onnxruntime-training"

# Roles of the files every bundle holds; `files` maps role -> FileEntry.
ROLE_TRAINING = "training_model"  # forward + backward, gradients as outputs (lowered to standard ops)
ROLE_EVAL = "eval_model"
ROLE_PARAMETERS = "parameters"  # every graph parameter (trainable and frozen), safetensors
ROLE_TOKENIZER = "tokenizer"
REQUIRED_ROLES = (ROLE_TRAINING, ROLE_EVAL, ROLE_PARAMETERS)
# Files only the cloud reads back (alignment, evaluation, export), each resolved through its role.
ROLE_PROXY_WEIGHTS = "proxy_weights"
ROLE_PROXY_SPEC = "proxy_spec"
ROLE_FM_CONFIG = "fm_config"
ROLE_ADAPTERS_INIT = "adapters_init"
ROLE_PREPARE_CONFIG = "prepare_config"
# What a device receives; every other file (proxy weights, FM config, the onnxruntime-training
# artifacts kept as the lowering's reference, ...) stays in the cloud.
DEVICE_ROLES = (*REQUIRED_ROLES, ROLE_TOKENIZER)
# Gradient outputs of the training graph are named `<parameter name><GRAD_SUFFIX>`.
GRAD_SUFFIX = "_grad"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Frozen):
    """One tensor held in the ORT checkpoint, and the key it has outside ORT."""

    name: str  # parameter name inside the ORT checkpoint / ONNX graph
    key: str  # PEFT state-dict key (adapters) or proxy state-dict key (FFN weights)
    shape: tuple[int, ...]
    dtype: str = "float32"


class InputSpec(_Frozen):
    kind: Literal["text", "image"]
    # graph input names in order; text: input_ids, attention_mask; image: pixel_values
    names: tuple[str, ...]
    max_length: int | None = None
    tokenizer_file: str | None = None
    image_size: int | None = None
    num_channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resample: str = "bilinear"
    rescale_factor: float = 1.0 / 255.0


class StatOutput(_Frozen):
    """Extra training-graph outputs of one compressed layer, for neuron-level alignment.

    `off_counts` is a float32 vector (neurons,) counting token positions whose FFN
    pre-activation is <= 0 (GELU output <= 0); `positions` is a float32 scalar counting the
    (unpadded) positions seen. APoZ of neuron j = off_counts[j] / positions.
    """

    layer: int
    neurons: int
    off_counts: str
    positions: str


class OptimizerSpec(_Frozen):
    """The device's optimizer: ORT's AdamWOptimizer attributes, read from the artifact it replaces.

    adam_mode 1 is Hugging Face's AdamW: bias correction folded into the step size,
    denom = sqrt(v) + eps, decoupled weight decay applied after the update with the plain lr."""

    name: Literal["adamw"] = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    bias_correction: bool = True
    adam_mode: Literal[1] = 1


class FileEntry(_Frozen):
    path: str
    sha256: str
    size: int


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA
    bundle_id: str
    bundle_version: int = 1
    created: str
    fm_id: str
    family: str
    method: str = "fedpft"
    labels: list[str]
    input: InputSpec
    logits_output: str = "logits"
    loss: str = "cross_entropy"
    runtime: str = RUNTIME_TRAINING  # what the device files need; absent in pre-schema-2 bundles
    loss_output: str | None = None  # the training graph's loss output (schema 2)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    trainable: list[TensorSpec]
    # frozen FFN weights of compressed layers: what neuron-level alignment rewrites on devices
    ffn: list[TensorSpec] = Field(default_factory=list)
    stat_outputs: list[StatOutput] = Field(default_factory=list)
    files: dict[str, FileEntry]
    versions: dict[str, str] = Field(default_factory=dict)
    config: dict = Field(default_factory=dict)
    # Set only when frozen weight matrices are stored as float16 (fedpft.shared.precision), and
    # left out of the JSON otherwise: a device older than float16 bundles knows no such field
    # (extra="forbid") and refuses the bundle in one line instead of failing inside onnxruntime,
    # while float32 manifests (and their signatures) stay exactly as they were.
    frozen_dtype: Literal["float16"] | None = None
    signer: str | None = None  # key id of the Ed25519 key that signed (fedpft.shared.signing)
    signature: str | None = None  # over the canonical manifest JSON without this field

    @model_serializer(mode="wrap")
    def _absent_when_float32(self, handler):
        data = handler(self)
        if data.get("frozen_dtype") is None:
            data.pop("frozen_dtype", None)
        return data

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def file_path(self, folder: Path, role: str) -> Path:
        """Where the bundle in `folder` keeps the file of `role`; BundleError (one line) if the
        manifest names none or names one outside the folder."""
        entry = self.files.get(role)
        if entry is None:
            raise BundleError(f"{folder}: the bundle's manifest names no '{role}' file")
        rel = Path(entry.path)
        if rel.is_absolute() or ".." in rel.parts:
            raise BundleError(f"{folder}: the manifest's '{role}' file {entry.path!r} lies outside the bundle")
        return Path(folder) / rel

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, folder: Path) -> "BundleManifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{path}: no bundle manifest here")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "manifest"
            newer = " (a bundle from a newer fedpft? upgrade this device)" if err["type"] == "extra_forbidden" else ""
            raise BundleError(f"{path}: invalid manifest: {where}: {err['msg']}{newer}") from None
        except ValueError as exc:
            raise BundleError(f"{path}: invalid manifest: {str(exc).splitlines()[0]}") from None


class BundleError(Exception):
    """A bundle that is missing, incomplete, or does not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(folder: Path, relpath: str) -> FileEntry:
    p = Path(folder) / relpath
    return FileEntry(path=relpath, sha256=sha256_file(p), size=p.stat().st_size)


def verify_bundle(folder: Path, device_only: bool = False) -> BundleManifest:
    """Load the manifest and check files' sizes and sha256; raise BundleError on any mismatch.

    device_only: check just the files a device receives (DEVICE_ROLES), as a device must.
    """
    folder = Path(folder)
    manifest = BundleManifest.load(folder)
    if manifest.runtime != RUNTIME_PLAIN:
        raise BundleError(
            f"{folder}: bundle {manifest.bundle_id} (v{manifest.bundle_version}) was built for {manifest.runtime} by an older "
            f"fedpft; devices now train on plain onnxruntime: run `fedpft-cloud prepare` again and roll the new bundle out"
        )
    missing = [r for r in REQUIRED_ROLES if r not in manifest.files]
    if missing:
        raise BundleError(f"{folder}: manifest lacks required files {missing}")
    for role, entry in manifest.files.items():
        if device_only and role not in DEVICE_ROLES:
            continue
        p = folder / entry.path
        if not p.is_file():
            raise BundleError(f"{p}: bundle file '{role}' is missing")
        if p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
            raise BundleError(f"{p}: sha256 does not match the manifest (file '{role}' changed or is corrupt)")
    return manifest


def dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
