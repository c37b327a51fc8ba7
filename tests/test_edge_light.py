"""The device install is light: in a venv with only `fedpft[edge]` (CI sets FEDPFT_EDGE_PYTHON),
torch & co are absent, yet the edge CLI, the online agent and a whole training round work."""

import os
import subprocess
import sys

import pytest

from conftest import write_text_data

EDGE_PYTHON = os.environ.get("FEDPFT_EDGE_PYTHON")
HEAVY = ("torch", "transformers", "peft", "optimum")


@pytest.mark.parametrize("python", [sys.executable, EDGE_PYTHON], ids=["dev-venv", "edge-only-venv"])
def test_edge_runs_without_heavy_packages(python, tmp_path, tiny_bert_bundle):
    if python is None:
        pytest.skip("FEDPFT_EDGE_PYTHON not set (CI builds a venv with only the edge extra)")
    data = write_text_data(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "u.safetensors"
    script = f"""
import importlib.util, sys
import fedpft.edge.cli, fedpft.edge.agent, fedpft.edge.fleet, fedpft.edge.connection, fedpft.edge.task_training, fedpft.shared.mqtt
from typer.testing import CliRunner
res = CliRunner().invoke(fedpft.edge.cli.app, ["train", "--bundle", {str(tiny_bert_bundle)!r}, "--data", {str(data)!r},
                                                "--out", {str(out)!r}, "-q"])
assert res.exit_code == 0, res.output
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
installed = sorted(m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None)
print("LOADED", loaded, "INSTALLED", installed)
"""
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout
    if python == EDGE_PYTHON:
        assert "INSTALLED []" in proc.stdout, proc.stdout  # the edge extra must not pull them in
    assert out.is_file()


@pytest.mark.parametrize("python", [sys.executable, EDGE_PYTHON], ids=["dev-venv", "edge-only-venv"])
def test_every_shared_and_edge_module_imports_without_heavy_packages(python):
    """Each module of fedpft.shared and fedpft.edge imports on a device; shared even without
    tokenizers and Pillow (preprocessing imports them only when it runs)."""
    if python is None:
        pytest.skip("FEDPFT_EDGE_PYTHON not set (CI builds a venv with only the edge extra)")
    script = f"""
import importlib, pkgutil, sys
for blocked in ("tokenizers", "PIL"):
    sys.modules[blocked] = None  # an import of them now fails
import fedpft.shared
shared = [m.name for m in pkgutil.walk_packages(fedpft.shared.__path__, "fedpft.shared.")]
for name in shared:
    importlib.import_module(name)
for blocked in ("tokenizers", "PIL"):
    del sys.modules[blocked]
import fedpft.edge
edge = [m.name for m in pkgutil.walk_packages(fedpft.edge.__path__, "fedpft.edge.")]
for name in edge:
    importlib.import_module(name)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print("MODULES", len(shared), len(edge), "LOADED", loaded)
"""
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout
    counts = proc.stdout.split("MODULES ")[1].split()[:2]
    assert all(int(c) > 5 for c in counts), proc.stdout


def test_one_onnxruntime_distribution_per_venv():
    """onnxruntime and onnxruntime-training both write the `onnxruntime` module: a venv holding both
    runs whichever was unpacked last. `[all]` must bring only the training build, `[edge]` only the plain one."""
    from importlib.metadata import PackageNotFoundError, version

    def have(dist: str) -> bool:
        try:
            version(dist)
            return True
        except PackageNotFoundError:
            return False

    ort_dists = [d for d in ("onnxruntime", "onnxruntime-training", "onnxruntime-gpu") if have(d)]
    assert len(ort_dists) <= 1, ort_dists
    if EDGE_PYTHON:
        probe = "from importlib.metadata import version as v; import onnxruntime; print(onnxruntime.__version__, v('onnxruntime'))"
        proc = subprocess.run([EDGE_PYTHON, "-c", probe], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]  # the edge venv has plain onnxruntime, not the training build
