"""Pack a proxy (+ fresh LoRA) into a device bundle: ORT artifacts, preprocessing, manifest.

Everything is written into a temporary sibling folder and renamed into place at the end, so
a failed prepare never leaves a half-written bundle behind.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedpft.modeling.adapters import adapter_state, add_adapters, trainable_keys
from fedpft.modeling.families import encoder_layers, ffn_linears, family_of, unwrap
from fedpft.modeling.proxy import ProxySpec
from fedpft.shared.manifest import (
    ROLE_ADAPTERS_INIT,
    ROLE_EVAL,
    ROLE_FM_CONFIG,
    ROLE_PARAMETERS,
    ROLE_PREPARE_CONFIG,
    ROLE_PROXY_SPEC,
    ROLE_PROXY_WEIGHTS,
    ROLE_TOKENIZER,
    ROLE_TRAINING,
    RUNTIME_PLAIN,
    BundleManifest,
    InputSpec,
    OptimizerSpec,
    StatOutput,
    TensorSpec,
    file_entry,
)
from fedpft.shared.methods import method
from fedpft.shared.precision import FrozenDtype

from .training import (
    EVAL_MODEL,
    LOGITS,
    ORT_DIR,
    ORT_FILES,
    PARAMETERS,
    TRAINING_MODEL,
    TrainingGraph,
    example_inputs,
    generate_training_artifacts,
    stat_names,
)

log = logging.getLogger("fedpft.prepare")

PROXY_WEIGHTS = "proxy.safetensors"
PROXY_SPEC = "proxy.json"
FM_CONFIG = "fm_config.json"
ADAPTERS_INIT = "adapters_init.safetensors"
PREPARE_CONFIG = "prepare_config.json"
# Where this writer puts the files only the cloud reads back; readers go through the manifest's roles.
CLOUD_FILES = {
    ROLE_PROXY_WEIGHTS: PROXY_WEIGHTS,
    ROLE_PROXY_SPEC: PROXY_SPEC,
    ROLE_FM_CONFIG: FM_CONFIG,
    ROLE_ADAPTERS_INIT: ADAPTERS_INIT,
    ROLE_PREPARE_CONFIG: PREPARE_CONFIG,
}
TOKENIZER = "tokenizer.json"
GRAPH_PREFIX = "model."  # TrainingGraph holds the PEFT model as `.model`


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("fedpft", "torch", "transformers", "peft", "onnx", "onnxruntime-training"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            pass
    return out


def input_spec_for(fm_source: str, config, max_length: int, tmp: Path) -> InputSpec:
    """Write the preprocessing the devices need into tmp and describe it."""
    fam = family_of(config)
    if fam.kind == "text":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(fm_source, use_fast=True)
        tok.backend_tokenizer.save(str(tmp / TOKENIZER))
        return InputSpec(kind="text", names=("input_ids", "attention_mask"), max_length=max_length, tokenizer_file=TOKENIZER)
    mean, std, size, resample = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), config.image_size, "bilinear"
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(fm_source)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        size = int(proc.size.get("height", size)) if isinstance(proc.size, dict) else int(proc.size)
        resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(getattr(proc, "resample", 2)), "bilinear")
    except (OSError, ValueError):
        pass  # no processor config (random-weight or hand-built model): ViT's documented defaults
    return InputSpec(
        kind="image", names=("pixel_values",), image_size=size, num_channels=config.num_channels,
        mean=mean, std=std, resample=resample,
    )


def _tensor_spec(name: str, key: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, key=key, shape=tuple(t.shape), dtype=str(t.dtype).replace("torch.", ""))


def write_bundle(
    out: Path,
    proxy: torch.nn.Module,
    spec: ProxySpec,
    labels: list[str],
    fm_id: str,
    fm_source: str,
    prepare_config: dict,
    max_length: int,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    seed: int = 0,
    bundle_version: int = 1,
    sign: Callable[[BundleManifest], BundleManifest] | None = None,
    frozen_dtype: FrozenDtype = "float32",
) -> BundleManifest:
    """Add fresh adapters to `proxy` (in place), export it and write the bundle to `out` atomically.

    `sign` (e.g. `lambda m: signing.sign(m, key)`) signs the manifest before it is saved.
    `frozen_dtype` float16 rounds the proxy's frozen matrices (in place) and stores them so."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        if frozen_dtype == "float16":
            kept = round_frozen_(proxy)
            if kept:  # they stay float32 in the bundle: say why it is larger than half
                log.warning("%d weight matrices hold values beyond float16's range and stay float32: %s", len(kept), ", ".join(kept[:3]))
        proxy_state = {k: v.detach().clone().contiguous() for k, v in proxy.state_dict().items()}
        save_file(proxy_state, str(tmp / PROXY_WEIGHTS))
        peft_proxy = add_adapters(proxy, lora_rank, lora_alpha, seed)
        manifest = _write(tmp, peft_proxy, spec, labels, fm_id, fm_source, prepare_config, max_length, bundle_version, frozen_dtype)
        if sign is not None:
            manifest = sign(manifest)
            manifest.save(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def round_frozen_(model: torch.nn.Module) -> list[str]:
    """Round every weight matrix of `model` to the nearest float16 value, in place, keeping fp32
    storage: what a float16 bundle's devices will compute with, so the cloud's copy of the proxy
    (proxy.safetensors, alignment, evaluation) is the devices' exactly. A matrix with values
    float16 cannot hold (beyond +-65504) is left as it is, and stays float32 in the bundle. Vectors
    (biases, LayerNorm) are left too: tiny, and the most sensitive to rounding. Returns the names of
    the matrices left unrounded."""
    kept = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or p.dtype != torch.float32:
                continue
            half = p.to(torch.float16)
            if not bool(torch.isfinite(half).all()):
                kept.append(name)
                continue
            p.copy_(half.to(torch.float32))
    return kept


def _write(tmp, peft_proxy, spec, labels, fm_id, fm_source, prepare_config, max_length, bundle_version, frozen_dtype) -> BundleManifest:
    base = unwrap(peft_proxy)
    config = base.config
    fam = family_of(config)
    stat_layers = spec.compressed if method(spec.method).stats else []
    graph = TrainingGraph(peft_proxy, stat_layers)
    info = generate_training_artifacts(graph, example_inputs(fam.kind, config), tmp, frozen_dtype)

    keys = trainable_keys(peft_proxy, spec.layer_map)
    params = dict(peft_proxy.named_parameters())
    trainable = [_tensor_spec(GRAPH_PREFIX + n, keys[n], params[n]) for n in keys]
    missing = {t.name for t in trainable} - set(info.trainable)
    if missing:
        raise RuntimeError(f"trainable tensors missing from the ORT checkpoint: {sorted(missing)[:3]}")

    ffn = _ffn_specs(peft_proxy, base, stat_layers)
    spec_in = input_spec_for(fm_source, config, max_length, tmp)

    # What the cloud keeps beside the device files.
    spec.save(tmp / PROXY_SPEC)
    (tmp / FM_CONFIG).write_text(config.to_json_string())
    save_file(adapter_state(peft_proxy, spec.layer_map), str(tmp / ADAPTERS_INIT))
    (tmp / PREPARE_CONFIG).write_text(json.dumps(prepare_config, indent=2, default=str))

    files = _file_entries(tmp, spec_in.tokenizer_file)
    manifest = BundleManifest(
        bundle_id=uuid.uuid4().hex,
        bundle_version=bundle_version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fm_id=fm_id,
        family=fam.name,
        method=spec.method,
        labels=list(labels),
        input=spec_in,
        logits_output=LOGITS,
        runtime=RUNTIME_PLAIN,
        loss_output=info.loss_output,
        optimizer=OptimizerSpec(**info.optimizer),
        trainable=trainable,
        ffn=ffn,
        stat_outputs=[StatOutput(layer=spec.layer_map[p], neurons=spec.ffn_sizes[p], off_counts=stat_names(p)[0], positions=stat_names(p)[1]) for p in stat_layers],
        files=files,
        versions=versions(),
        config=prepare_config,
        frozen_dtype="float16" if info.halved else None,
    )
    manifest.save(tmp)
    return manifest


def _ffn_specs(peft_proxy, base, stat_layers: list[int]) -> list[TensorSpec]:
    """Frozen FFN weights of compressed layers: what neuron-level alignment rewrites on devices."""
    ffn = []
    layers = encoder_layers(peft_proxy)
    lin_names = {id(m): n for n, m in peft_proxy.named_modules()}
    base_prefix = {id(m): n for n, m in base.named_modules()}
    for p in stat_layers:
        for lin in ffn_linears(layers[p]):
            for pname, t in lin.named_parameters():
                ffn.append(_tensor_spec(f"{GRAPH_PREFIX}{lin_names[id(lin)]}.{pname}", f"{base_prefix[id(lin)]}.{pname}", t))
    return ffn


def _file_entries(tmp: Path, tokenizer_file: str | None) -> dict:
    """Every file of the bundle under its manifest role, with its size and sha256."""
    files = {
        ROLE_TRAINING: file_entry(tmp, TRAINING_MODEL),
        ROLE_EVAL: file_entry(tmp, EVAL_MODEL),
        ROLE_PARAMETERS: file_entry(tmp, PARAMETERS),
    }
    files.update({role: file_entry(tmp, f"{ORT_DIR}/{name}") for role, name in ORT_FILES.items()})
    if tokenizer_file:
        files[ROLE_TOKENIZER] = file_entry(tmp, tokenizer_file)
    for role, rel in CLOUD_FILES.items():
        files[role] = file_entry(tmp, rel)
    return files


