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
import fedpft.edge.cli, fedpft.edge.agent, fedpft.edge.online, fedpft.shared.mqtt
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
