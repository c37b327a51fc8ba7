"""`fedpft-cloud prepare`: FM -> proxy -> layer-level distillation -> device bundle."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpft.cloud.config import PrepareConfig
from fedpft.export.bundle import write_bundle
from fedpft.modeling.families import encoder_layers, family_of, load_config, load_fm, resolve_model_id
from fedpft.modeling.proxy import ProxySpec, build_fedot, build_fedpft, build_full, check_layers, matching_layer_budget
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.methods import method

from .device import resolve_device
from .distill import DistillResult, distill
from .progress import progress_bar
from .public_data import batch_stream, list_public_samples, make_encoder

log = logging.getLogger("fedpft.prepare")


class PrepareError(Exception):
    """A prepare request that cannot be carried out; the message is one line for the user."""


@dataclass
class PrepareResult:
    manifest: BundleManifest
    spec: ProxySpec
    distill: DistillResult
    fm_params: int
    proxy_params: int
    seconds: float


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_proxy(fm: torch.nn.Module, cfg: PrepareConfig) -> tuple[torch.nn.Module, ProxySpec]:
    n = len(encoder_layers(fm))
    if cfg.proxy == "fedpft":
        return build_fedpft(fm, cfg.keep_layers, cfg.ffn_keep)
    if cfg.proxy == "fedot":
        c = fm.config
        keep = cfg.keep_layers if cfg.keep_layers is not None else sorted({0, n - 1})
        n_keep = cfg.fedot_layers or matching_layer_budget(n, c.hidden_size, c.intermediate_size, keep, cfg.ffn_keep)
        return build_fedot(fm, n_keep)
    return build_full(fm)


def make_public_stream(cfg: PrepareConfig, kind: str, config, scratch: Path):
    """Batches of the public data, preprocessed exactly as the devices will (same tokenizer.json)."""
    from fedpft.export.bundle import input_spec_for

    samples = list_public_samples(cfg.public_data, kind)
    spec = input_spec_for(resolve_model_id(cfg.model), config, cfg.max_length, scratch)
    return batch_stream(samples, make_encoder(kind, spec, scratch), cfg.batch_size, cfg.seed)


def validate(cfg: PrepareConfig):
    """Cheap checks before any weights load; returns the model config."""
    model_id = resolve_model_id(cfg.model)
    config = load_config(model_id, cfg.resolved_labels(), cfg.dropout)
    n = config.num_hidden_layers
    if cfg.keep_layers is not None:
        check_layers(cfg.keep_layers, n)
    if cfg.distill_steps > 0 and method(cfg.proxy).distill:
        if cfg.public_data is None:
            raise PrepareError("distillation needs --public-data (or pass --distill-steps 0 to skip it)")
        list_public_samples(cfg.public_data, family_of(config).kind)
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"--out {out} already exists and is not an empty folder")
    if cfg.signing_key is not None:
        signing_key(cfg)
    return config


def signing_key(cfg: PrepareConfig):
    from fedpft.shared.signing import SignatureError, load_private_key

    try:
        return load_private_key(cfg.signing_key)
    except SignatureError as exc:
        raise PrepareError(f"--signing-key: {exc}") from None


def prepare(cfg: PrepareConfig, show_progress: bool = True) -> PrepareResult:
    import time

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)  # an absent GPU is refused before any weights load
    config = validate(cfg)
    kind = family_of(config).kind
    labels = cfg.resolved_labels()
    model_id = resolve_model_id(cfg.model)
    fm = load_fm(model_id, labels, cfg.dropout, cfg.seed)
    proxy, spec = build_proxy(fm, cfg)
    result = DistillResult()
    if cfg.distill_steps == 0 or not method(cfg.proxy).distill:
        if method(cfg.proxy).distill:
            log.warning("distillation skipped (--distill-steps 0): the proxy is the raw compressed FM")
    else:
        log.info("distilling on %s", device)
        fm.to(device)
        proxy.to(device)
        with tempfile.TemporaryDirectory() as scratch:
            stream = make_public_stream(cfg, kind, config, Path(scratch))
            with progress_bar("distilling proxy", cfg.distill_steps, show_progress) as bar:
                result = distill(fm, proxy, spec, stream, cfg.distill_steps, cfg.distill_lr, cfg.distill_alpha,
                                 on_step=lambda i, loss: bar.advance(loss=loss))
        # the bundle (ORT artifacts, safetensors) is always built from a CPU fp32 proxy
        fm.to("cpu")
        proxy.to("cpu")
        log.info("layer distillation: loss %.4f -> %.4f over %d steps", result.first, result.last, len(result.losses))
    proxy_params = count_params(proxy)
    sign = None
    if cfg.signing_key is not None:
        from fedpft.shared.signing import sign as sign_record

        key = signing_key(cfg)
        sign = lambda m: sign_record(m, key)  # noqa: E731
    manifest = write_bundle(
        Path(cfg.out), proxy, spec, labels, fm_id=cfg.model, fm_source=model_id,
        prepare_config=cfg.model_dump(mode="json", exclude={"signing_key", "device"}), max_length=cfg.max_length,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, seed=cfg.seed, bundle_version=cfg.bundle_version, sign=sign,
        frozen_dtype=cfg.frozen_dtype,
    )
    return PrepareResult(manifest, spec, result, count_params(fm), proxy_params, time.perf_counter() - t0)
