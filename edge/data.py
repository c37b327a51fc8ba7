"""A device's labelled data: lightweight records, streamed as preprocessed batches.

Accepted layouts (labels are the bundle manifest's class names):
- text, JSONL: one `{"text": ..., "label": ...}` object a line (`.jsonl`, `.json`, `.ndjson`).
- text, CSV: a header row with `text` and `label` columns (other columns are ignored).
- image, folder: `<root>/<label>/<image file>`; files with other suffixes are ignored.
- image, CSV or JSONL: `path` and `label` columns/fields; relative paths resolve against the
  file's folder.

Only records (a text or an image path, and a label index) are held in memory; each step's
batch is tokenized or decoded when it is needed. Bad samples never stop a round: an unknown
label, empty text, malformed line or an image that does not decode is counted, skipped, and
reported in one line by `Skips.summary`. No usable sample at all raises DataError.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpft.shared.manifest import BundleManifest

from .preprocess import ImagePreprocessor, TextEncoder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}

# skip reasons, as they read in the summary line
UNKNOWN_LABEL = "unknown label"
EMPTY_TEXT = "empty text"
MALFORMED = "malformed line"
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
UNLABELLED = "file outside a class folder"


class DataError(Exception):
    """Local data that cannot be used at all; the message is one line for the user."""


@dataclass(frozen=True)
class Record:
    x: str  # the text, or the image path
    y: int  # label index into manifest.labels
    where: str  # "file:line" or the image path, for messages


@dataclass
class Skips:
    """Counts of skipped samples by reason, and where the first one was."""

    counts: Counter = field(default_factory=Counter)
    first: str | None = None
    seen: int = 0  # samples looked at (usable or not)
    _bad: set = field(default_factory=set)  # records found bad while streaming (counted once)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if self.first is None:
            self.first = where

    def mark_bad(self, record: Record, reason: str) -> None:
        if record not in self._bad:
            self._bad.add(record)
            self.add(reason, record.where)

    def is_bad(self, record: Record) -> bool:
        return record in self._bad

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str | None:
        """e.g. 'skipped 3 of 120 samples: 2 unknown label, 1 corrupt image (first: data/x.png)'."""
        if not self.total:
            return None
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} of {self.seen} samples: {parts} (first: {self.first})"


@dataclass
class LocalData:
    kind: str  # "text" | "image"
    source: Path
    records: list[Record]
    skips: Skips

    def split(self, holdout: float, seed: int) -> tuple[list[Record], list[Record]]:
        """(train, held_out): a seeded random `holdout` share, at least one sample each when holdout > 0."""
        n = len(self.records)
        k = int(round(n * holdout))
        k = min(max(k, 1), n - 1) if holdout > 0 and n >= 2 else 0
        order = np.random.default_rng(seed).permutation(n)
        held = sorted(order[:k].tolist())
        held_set = set(held)
        return [r for i, r in enumerate(self.records) if i not in held_set], [self.records[i] for i in held]


def read_local_data(path: Path, manifest: BundleManifest) -> LocalData:
    """List the usable records of `path` for this bundle's task; DataError if there are none."""
    path = Path(path)
    kind = manifest.input.kind
    index = {name: i for i, name in enumerate(manifest.labels)}
    skips = Skips()
    if not path.exists():
        raise DataError(f"data '{path}' does not exist")
    if kind == "image" and path.is_dir():
        records = _image_folder(path, index, skips)
    elif path.is_dir():
        raise DataError(f"data '{path}' is a folder; text data is a .jsonl or .csv file")
    else:
        rows = _csv_rows(path, kind) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
        records = _records_from_rows(rows, kind, index, skips, path.parent)
    if not records:
        detail = f" ({skips.summary()})" if skips.total else ""
        raise DataError(f"data '{path}' holds no usable {kind} sample{detail}")
    return LocalData(kind, path, records, skips)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | None]]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"data '{path}' is unreadable: {exc.strerror or exc}") from exc
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                row = None
            yield f"{path}:{n}", row if isinstance(row, dict) else None


def _csv_rows(path: Path, kind: str) -> Iterator[tuple[str, dict | None]]:
    need = ("text" if kind == "text" else "path", "label")
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"data '{path}' is unreadable: {exc.strerror or exc}") from exc
    with f:
        try:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not set(need) <= set(reader.fieldnames):
                raise DataError(f"data '{path}': a CSV needs a header row with columns {', '.join(need)}")
            for row in reader:
                # a short row leaves None values, a long one puts the extras under the key None
                ok = None not in row and all(v is not None for v in row.values())
                yield f"{path}:{reader.line_num}", row if ok else None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"data '{path}' is not a readable UTF-8 CSV file: {exc}") from exc


def _records_from_rows(rows, kind: str, index: dict[str, int], skips: Skips, base: Path) -> list[Record]:
    field_name = "text" if kind == "text" else "path"
    records = []
    for where, row in rows:
        skips.seen += 1
        if row is None or not isinstance(row.get(field_name), str) or not isinstance(row.get("label"), (str, int)) or isinstance(row.get("label"), bool):
            skips.add(MALFORMED, where)
            continue
        label = index.get(str(row["label"]))
        if label is None:
            skips.add(UNKNOWN_LABEL, where)
            continue
        x = row[field_name]
        if kind == "text":
            if not x.strip():
                skips.add(EMPTY_TEXT, where)
                continue
            records.append(Record(x, label, where))
        else:
            p = Path(x) if Path(x).is_absolute() else base / x
            if not p.is_file():
                skips.add(MISSING_IMAGE, str(p))
                continue
            records.append(Record(str(p), label, str(p)))
    return records


def _image_folder(root: Path, index: dict[str, int], skips: Skips) -> list[Record]:
    records = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        skips.seen += 1
        rel = p.relative_to(root)
        if len(rel.parts) < 2:
            skips.add(UNLABELLED, str(p))
            continue
        label = index.get(rel.parts[0])
        if label is None:
            skips.add(UNKNOWN_LABEL, str(p))
            continue
        records.append(Record(str(p), label, str(p)))
    return records


# ---------------------------------------------------------------- batches

@dataclass
class Batch:
    inputs: dict[str, np.ndarray]  # graph input name -> array, e.g. input_ids (batch, tokens)
    labels: np.ndarray  # (batch,) int64
    records: list[Record]


class BatchMaker:
    """Turns records into model inputs with the bundle's own preprocessing."""

    def __init__(self, bundle_dir: Path, manifest: BundleManifest):
        spec = manifest.input
        self.kind = spec.kind
        if spec.kind == "text":
            if not spec.tokenizer_file or spec.max_length is None:
                raise DataError("the bundle's text input spec lacks a tokenizer file or max_length")
            self.text = TextEncoder(Path(bundle_dir) / spec.tokenizer_file, spec.max_length)
        else:
            self.image = ImagePreprocessor(spec)

    def load(self, record: Record):
        """One sample's preprocessed form; raises ValueError for an image that cannot be decoded."""
        if self.kind == "text":
            return record.x
        try:
            return self.image(Path(record.x))
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise ValueError(str(exc)) from exc

    def collate(self, items: list, records: list[Record]) -> Batch:
        labels = np.asarray([r.y for r in records], dtype=np.int64)
        if self.kind == "text":
            return Batch(self.text(items), labels, records)
        return Batch({"pixel_values": np.stack(items).astype(np.float32, copy=False)}, labels, records)


def batches(records: list[Record], maker: BatchMaker, batch_size: int, skips: Skips, order: np.ndarray | None = None) -> Iterator[Batch]:
    """Batches of `batch_size` (the last may be smaller) over `records` in `order`; samples that
    fail to load are marked bad in `skips` and replaced by the next ones."""
    items, used = [], []
    for i in range(len(records)) if order is None else order:
        r = records[i]
        if skips.is_bad(r):
            continue
        try:
            items.append(maker.load(r))
        except ValueError:
            skips.mark_bad(r, CORRUPT_IMAGE)
            continue
        used.append(r)
        if len(items) == batch_size:
            yield maker.collate(items, used)
            items, used = [], []
    if items:
        yield maker.collate(items, used)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of one epoch: a pure function of (seed, epoch), so a rerun trains identically."""
    return np.random.default_rng([seed, epoch]).permutation(n)
