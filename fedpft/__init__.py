"""FedPFT: federated proxy fine-tuning of foundation models on edge fleets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedpft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
