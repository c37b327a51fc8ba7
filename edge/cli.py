"""`fedpft-edge`: the device agent. Imports no torch and no transformers."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from fedpft import __version__

app = typer.Typer(name="fedpft-edge", help="FedPFT device agent: train LoRA adapters of the proxy with onnxruntime-training.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


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
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Bundle folder from `fedpft-cloud prepare` (every file is checked against the manifest's sha256)."),
    data: Path = typer.Option(..., "--data", "-d", help="Local labelled data: text as .jsonl/.csv (text,label); images as a folder of class subfolders or a .csv (path,label)."),
    out: Path = typer.Option(..., "--out", "-o", help="Update file to write (safetensors: adapters under PEFT keys, activation statistics, metrics as metadata)."),
    adapters: Optional[Path] = typer.Option(None, "--adapters", "-a", help="Global adapters to start from (safetensors, PEFT keys); default: the bundle's."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the local training split."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per training step."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (default: run all epochs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and the shuffling."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share of the local data held out for accuracy before/after, in [0, 1)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Folder to start from and save the updated checkpoint (keeps re-aligned weights between rounds)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: ORT decides)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train the bundle's LoRA adapters on local data for one round, offline, and write the update file."""
    from pydantic import ValidationError

    from fedpft.shared.edge_config import EdgeTrainConfig
    from fedpft.shared.manifest import BundleError

    try:
        cfg = EdgeTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, seed=seed, holdout=holdout, threads=threads)
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-') or 'options'}: {err['msg'].removeprefix('Value error, ')}")
    from .data import DataError
    from .trainer import AdapterError, TrainError, load_tensor_file, summarize, train_round
    from .update import write_update

    with _progress(not quiet) as (on_start, on_step):
        try:
            start = load_tensor_file(adapters) if adapters is not None else None
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
