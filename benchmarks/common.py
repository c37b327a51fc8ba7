"""Shared bits of the benchmark scripts: BENCHMARKS.md sections and model folders."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def command_line() -> str:
    """The exact command that produced a table, as typed from the repository root."""
    return " ".join(["python", shlex.quote(str(Path(sys.argv[0]).resolve().relative_to(ROOT)))] + [shlex.quote(a) for a in sys.argv[1:]])


def git_commit() -> str | None:
    """The commit the benchmark ran on (`+dirty` when tracked files other than the benchmarks' own
    output differ from it), for a result's provenance; None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        # what the benchmarks write themselves (their section, their results) does not make the code dirty
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!BENCHMARKS.md", ":!benchmarks/results"],
                               cwd=ROOT, capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def write_section(name: str, text: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between <!-- name --> and <!-- /name --> markers."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    body = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text() if path.is_file() else "# Benchmarks\n\nEvery table below was written by the script and command named above it.\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + body + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(new)


def vit_base_folder(folder: Path, num_labels: int = 10) -> str:
    """ViTConfig() defaults (ViT-base/16 at 224) with random weights, saved as an HF folder:
    the hub is unreachable here, so google/vit-base-patch16-224-in21k cannot be downloaded."""
    from transformers import ViTConfig

    from fedpft.modeling.families import model_from_config

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        model_from_config(ViTConfig(num_labels=num_labels), seed=0).save_pretrained(str(folder))
    return str(folder)


def machine() -> str:
    import os
    import platform

    load = os.getloadavg()[0]
    busy = " (the machine was shared: times are inflated)" if load > (os.cpu_count() or 1) else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, 1-min load average {load:.1f} when the table was written{busy}"
