"""`fedpft-cloud prepare` and `export`: the commands that build a bundle from the FM and an FM from a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedpft.shared.manifest import DEVICE_ROLES

from .cli_common import DISTILL_PRECISION, FROZEN_DTYPE_OPT, _validated, check_device, device_option, fail, parse_layers, read_labels


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
    frozen_dtype: str = FROZEN_DTYPE_OPT,
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
        signing_key=signing_key, device=device, frozen_dtype=frozen_dtype,
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
    # what a device downloads and stores: the rest (the proxy in torch form, ORT's reference artifacts) stays in the cloud
    download = sum(e.size for role, e in m.files.items() if role in DEVICE_ROLES)
    typer.echo(
        f"bundle {m.bundle_id[:12]} v{m.bundle_version} -> {out}  ({download / 1e6:.1f} MB to each device, frozen weights "
        f"{cfg.frozen_dtype}; {size / 1e6:.1f} MB with the cloud's files; proxy/FM params "
        f"{res.proxy_params / 1e6:.1f}M/{res.fm_params / 1e6:.1f}M = {res.proxy_params / res.fm_params:.2f}, "
        f"{len(m.trainable)} trainable tensors, {res.seconds:.0f}s)"
    )



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

