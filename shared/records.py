"""Labelled data as records, streamed as preprocessed batches: a device's training data, and the
cloud's evaluation set read by the very same reader (same tokenizer, same labels, same skips).

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

Every record is capped before it costs anything: a line or CSV record over `max_record_bytes` is
skipped while it is read (in bounded chunks, never held whole), and a text whose tokens before
truncation exceed `max_record_tokens` is skipped when its batch is made.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .edge_config import EdgeTrainConfig
from .manifest import BundleManifest

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

MAX_RECORD_BYTES: int = EdgeTrainConfig.model_fields["max_record_bytes"].default
MAX_RECORD_TOKENS: int = EdgeTrainConfig.model_fields["max_record_tokens"].default
_DRAIN = 1 << 20  # how much of an oversized record is read at a time while it is skipped


def too_large(max_bytes: int) -> str:
    return f"record over {max_bytes} bytes"


def too_many_tokens(max_tokens: int) -> str:
    return f"text over {max_tokens} tokens"


class SkipSample(ValueError):
    """A sample that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_OVERSIZED = object()  # a row too large to parse, stands in for its fields


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


def read_local_data(path: Path, manifest: BundleManifest, max_record_bytes: int = MAX_RECORD_BYTES) -> LocalData:
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
        rows = _csv_rows(path, kind, max_record_bytes) if path.suffix.lower() == ".csv" else _jsonl_rows(path, max_record_bytes)
        records = _records_from_rows(rows, kind, index, skips, path.parent, too_large(max_record_bytes))
    if not records:
        detail = f" ({skips.summary()})" if skips.total else ""
        raise DataError(f"data '{path}' holds no usable {kind} sample{detail}")
    return LocalData(kind, path, records, skips)


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"data '{path}' is unreadable: {exc.strerror or exc}") from exc


def _bounded_lines(f, max_bytes: int) -> Iterator[bytes | None]:
    """Each line of binary file `f`, or None for one over `max_bytes`; such a line is read through
    in fixed chunks and dropped, so memory stays bounded however long it is."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if line.endswith(b"\n") or len(line) <= max_bytes:  # whole: at most max_bytes before its line break
            yield line
            continue
        while not line.endswith(b"\n"):
            line = f.readline(_DRAIN)
            if not line:
                break
        yield None


def _jsonl_rows(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[str, object]]:
    with _open_binary(path) as f:
        for n, raw in enumerate(_bounded_lines(f, max_bytes), start=1):
            if raw is None:
                yield f"{path}:{n}", _OVERSIZED
                continue
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                row = None
            yield f"{path}:{n}", row if isinstance(row, dict) else None


def _csv_records(f, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(first line number, bytes) of each CSV record of binary file `f`, or None for one over
    `max_bytes`. A record ends at a line break outside quotes: with quotes escaped by doubling, that
    is where the count of '"' so far is even. Oversized records are read through and dropped."""
    line_no = 0
    while True:
        start, parts, size, quotes, oversized = line_no + 1, [], 0, 0, False
        while True:
            chunk = f.readline(max_bytes + 1 if not oversized else _DRAIN)
            if not chunk:
                break
            quotes += chunk.count(b'"')
            size += len(chunk)
            if size > max_bytes:
                oversized, parts = True, []
            else:
                parts.append(chunk)
            if chunk.endswith(b"\n"):
                line_no += 1
                if quotes % 2 == 0:
                    break
        if size == 0:
            return
        yield start, None if oversized else b"".join(parts)


def _csv_rows(path: Path, kind: str, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[str, object]]:
    need = ("text" if kind == "text" else "path", "label")
    # a field may be as long as the record cap (the csv module's own default is 128 KiB)
    csv.field_size_limit(max(csv.field_size_limit(), max_bytes))
    with _open_binary(path) as f:
        records = _csv_records(f, max_bytes)
        header = None
        for start, raw in records:
            header = None if raw is None else _csv_fields(raw)
            if header != []:  # blank lines before the header are skipped, as csv.DictReader does
                break
        if not header or not set(need) <= set(header):
            raise DataError(f"data '{path}': a CSV needs a header row with columns {', '.join(need)}")
        for start, raw in records:
            if raw is None:
                yield f"{path}:{start}", _OVERSIZED
                continue
            fields = _csv_fields(raw)
            if fields == []:
                continue
            # a short or long row, or one that is not UTF-8 CSV, is malformed
            yield f"{path}:{start}", dict(zip(header, fields)) if fields is not None and len(fields) == len(header) else None


def _csv_fields(raw: bytes) -> list[str] | None:
    """The fields of one CSV record ([] for a blank line), None if it is not UTF-8 CSV."""
    try:
        return next(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")), [])
    except (UnicodeDecodeError, csv.Error):
        return None


def _records_from_rows(rows, kind: str, index: dict[str, int], skips: Skips, base: Path, oversized: str) -> list[Record]:
    field_name = "text" if kind == "text" else "path"
    records = []
    for where, row in rows:
        skips.seen += 1
        if row is _OVERSIZED:
            skips.add(oversized, where)
            continue
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

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, max_record_tokens: int = MAX_RECORD_TOKENS):
        spec = manifest.input
        self.kind = spec.kind
        if spec.kind == "text":
            if not spec.tokenizer_file or spec.max_length is None:
                raise DataError("the bundle's text input spec lacks a tokenizer file or max_length")
            self.text = TextEncoder(Path(bundle_dir) / spec.tokenizer_file, spec.max_length)
            from tokenizers import Tokenizer

            # the encoder truncates; the cap is on what the text holds before that
            self._counter = Tokenizer.from_file(str(Path(bundle_dir) / spec.tokenizer_file))
            self._counter.no_truncation()
            self._counter.no_padding()
            self.max_record_tokens = max_record_tokens
            self._fits: set[Record] = set()  # texts already counted and found within the cap
        else:
            self.image = ImagePreprocessor(spec)

    def load(self, record: Record):
        """One sample's preprocessed form; SkipSample (a ValueError) for a text over the token cap
        or an image that cannot be decoded."""
        if self.kind == "text":
            if record not in self._fits:  # counted once per record, not once per epoch
                if len(self._counter.encode(record.x).ids) > self.max_record_tokens:
                    raise SkipSample(too_many_tokens(self.max_record_tokens))
                self._fits.add(record)
            return record.x
        try:
            return self.image(Path(record.x))
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise SkipSample(CORRUPT_IMAGE) from exc

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
        except ValueError as exc:
            skips.mark_bad(r, getattr(exc, "reason", CORRUPT_IMAGE))
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
