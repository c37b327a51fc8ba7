"""`fedpft-edge`: the device agent. Imports no torch and no transformers."""

from __future__ import annotations

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
