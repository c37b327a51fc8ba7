"""The demo data set shipped with the package (debian-sections, gzipped), torch-free."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "fedpft" / "data" / "debian-sections"


def shipped_dir() -> Path:
    """Folder of the shipped copy, whether installed (package data) or run from a source tree."""
    import fedpft

    installed = Path(fedpft.__file__).resolve().parent / "data" / "debian-sections"
    return installed if installed.is_dir() else SHIPPED


def materialize(dest: Path) -> Path:
    """Unpack the shipped data into `dest` (train.jsonl, test.jsonl, public.txt, labels.json)."""
    src = shipped_dir()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for gz in sorted(src.glob("*.gz")):
        target = dest / gz.name[:-3]
        if not target.exists():
            with gzip.open(gz, "rb") as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    shutil.copy(src / "labels.json", dest / "labels.json")
    return dest


def read_labels(folder: Path) -> list[str]:
    return json.loads((Path(folder) / "labels.json").read_text())
