"""Public, unlabelled data for distillation and alignment: a text file or an image folder."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fedpft.shared.records import IMAGE_SUFFIXES


class PublicDataError(Exception):
    """Public data that cannot be read or holds no usable sample."""


def list_public_samples(path: Path, kind: str) -> list:
    path = Path(path)
    if not path.exists():
        raise PublicDataError(f"public data '{path}' does not exist")
    if kind == "text":
        if not path.is_file():
            raise PublicDataError(f"public data '{path}': expected a text file with one sample a line")
        try:
            lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise PublicDataError(f"public data '{path}' is unreadable: {exc}") from exc
        samples = [l for l in lines if l]
    else:
        if not path.is_dir():
            raise PublicDataError(f"public data '{path}': expected a folder of images")
        samples = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not samples:
        raise PublicDataError(f"public data '{path}' holds no usable {kind} sample")
    return samples


HELD_OUT_BATCHES = 8  # public batches kept out of alignment to measure the proxy-vs-FM gap on


def hold_out(samples: list, batch_size: int, n_batches: int = HELD_OUT_BATCHES) -> tuple[list, list[list]]:
    """(samples to align on, fixed held-out chunks of batch_size): the last samples are held out,
    at most a quarter of them."""
    n = min(n_batches * batch_size, len(samples) // 4)
    cut = len(samples) - n
    return samples[:cut], [samples[i : i + batch_size] for i in range(cut, len(samples), batch_size)]


def batch_stream(samples: list, encode, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (reshuffled each pass); `encode(list) -> dict of numpy arrays`."""
    rng = random.Random(seed)
    order = list(samples)
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chunk = order[i : i + batch_size]
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encode(chunk).items()}


def make_encoder(kind: str, input_spec, bundle_dir: Path | None = None):
    """The same preprocessing the devices use (fedpft.shared.preprocess)."""
    from fedpft.shared.preprocess import ImagePreprocessor, TextEncoder

    if kind == "text":
        tok = Path(input_spec.tokenizer_file)
        if bundle_dir is not None and not tok.is_absolute():
            tok = Path(bundle_dir) / tok
        return TextEncoder(tok, input_spec.max_length)
    pre = ImagePreprocessor(input_spec)
    return pre.batch
