"""`fedpft-cloud`: thin typer commands; each builds one validated config and calls one function.

The commands live by group in `cli_model`, `cli_rounds` and `cli_fleet`; this module is the entry
point and registers them, in the order `--help` lists them."""

from __future__ import annotations

import logging
import sys

import typer

from fedpft import __version__

from .cli_fleet import keygen, provision, rollout, status
from .cli_model import export_cmd, prepare
from .cli_rounds import serve, simulate

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


for command in (prepare, serve, keygen, rollout, status, provision, simulate):
    app.command()(command)
app.command("export")(export_cmd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
