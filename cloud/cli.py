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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Compress the FM into a proxy, distill it, and write the device bundle (ORT training artifacts + manifest)."""
    from pydantic import ValidationError

    from fedpft.shared.config import PrepareConfig

    try:
        cfg = PrepareConfig(
            model=model, out=out, labels=read_labels(labels), num_labels=num_labels, public_data=public_data,
            proxy=proxy, distill_steps=distill_steps, distill_lr=distill_lr, distill_alpha=distill_alpha,
            keep_layers=parse_layers(keep_layers), ffn_keep=ffn_keep, lora_rank=lora_rank, lora_alpha=lora_alpha,
            max_length=max_length, batch_size=batch_size, dropout=dropout, seed=seed,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"{'.'.join(str(x) for x in err['loc']) or 'options'}: {err['msg'].removeprefix('Value error, ')}")
    from .models import ModelError
    from .prepare import PrepareError, prepare as run_prepare
    from .proxy import ProxyError
    from .public_data import PublicDataError

    try:
        res = run_prepare(cfg, show_progress=not quiet)
    except (ModelError, PrepareError, ProxyError, PublicDataError, FileExistsError) as exc:
        fail(str(exc))
    m = res.manifest
    size = sum(e.size for e in m.files.values())
    typer.echo(
        f"bundle {m.bundle_id[:12]} v{m.bundle_version} -> {out}  ({size / 1e6:.1f} MB, proxy/FM params "
        f"{res.proxy_params / 1e6:.1f}M/{res.fm_params / 1e6:.1f}M = {res.proxy_params / res.fm_params:.2f}, "
        f"{len(m.trainable)} trainable tensors, {res.seconds:.0f}s)"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
