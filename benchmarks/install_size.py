"""Device install size: `pip install fedpft[edge]` now (plain onnxruntime) vs before (onnxruntime-training).

    python benchmarks/install_size.py --write BENCHMARKS.md

Each variant goes into a fresh venv of this Python; the size is the venv's site-packages minus pip
and setuptools (what a device stores for us), and the table lists the largest distributions. "before"
installs the checkout's base dependencies plus the extra as it was (onnxruntime-training==1.19.2,
tokenizers, pillow, cryptography); "after" installs the checkout's `.[edge]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, machine, write_section  # noqa: E402

SECTION = "install_size"
BEFORE_EDGE = ["onnxruntime-training==1.19.2", "tokenizers>=0.19", "pillow>=10", "cryptography>=42"]
TOOLING = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "__pycache__")


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def install(venv: Path, args: list[str]) -> dict:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + args, check=True, cwd=ROOT)
    sp = site_packages(venv)
    parts: dict[str, float] = {}
    for entry in sp.iterdir():
        name = entry.name.split("-")[0].split(".")[0]
        if name in TOOLING or entry.name.startswith(TOOLING):
            continue
        parts[name] = parts.get(name, 0.0) + (size_mb(entry) if entry.is_dir() else entry.stat().st_size / 1e6)
    heavy = [d for d in ("torch", "transformers") if (sp / d).exists()]
    return {"total_mb": sum(parts.values()), "parts": parts, "heavy": heavy}


def base_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, default=None, help="write/replace the install_size section of this markdown file")
    ap.add_argument("--top", type=int, default=4, help="how many of the largest distributions to name per variant")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="install-size-") as tmp:
        results = {
            "before: onnxruntime-training 1.19.2": install(Path(tmp) / "before", base_deps() + BEFORE_EDGE),
            "now: `.[edge]` (plain onnxruntime)": install(Path(tmp) / "after", ["-e", ".[edge]"]),
        }
    rows = ["| device install | site-packages | largest parts | torch / transformers installed |", "|---|---|---|---|"]
    for name, r in results.items():
        top = sorted(r["parts"].items(), key=lambda kv: -kv[1])[: args.top]
        rows.append(f"| {name} | {r['total_mb']:.0f} MB | {', '.join(f'{k} {v:.0f} MB' for k, v in top)} | {', '.join(r['heavy']) or 'no'} |")
    text = "\n".join([
        "## Device install size: `fedpft[edge]` before and after plain onnxruntime",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}. Fresh venvs of this Python; site-packages without pip/setuptools.",
        "",
        *rows,
    ])
    print(text)
    if args.write:
        write_section(SECTION, text, args.write)


if __name__ == "__main__":
    main()
