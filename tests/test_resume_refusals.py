"""`serve --resume` never lies (pytest -m faults): a real run on the machine's Mosquitto, then the
public CLI on copies of its folder with the state missing, foreign, truncated or damaged. Each is
refused with one line and a non-zero exit, and no file of the earlier run changes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import mosquitto_up, write_text_data

pytestmark = [pytest.mark.slow, pytest.mark.faults]
BROKER = "mqtt://127.0.0.1:1883"


def serve_cmd(bundle: Path, out: Path, run_id: str, *extra: str, rounds: int = 2) -> list[str]:
    return [sys.executable, "-m", "fedpft.cloud.cli", "serve", "--bundle", str(bundle), "--out", str(out), "--broker", BROKER,
            "--run-id", run_id, "--rounds", str(rounds), "--min-clients", "1", "--lr", "1e-2", "--batch-size", "8",
            "--round-timeout", "60", "--wait-for-clients", "60", "--seed", "3", "-q", *extra]


@pytest.fixture(scope="module")
def committed_run(tiny_bert_bundle, tmp_path_factory):
    """A finished two-round run by one real device: checkpoints, stored updates, state.json."""
    if not mosquitto_up():
        pytest.skip("needs Mosquitto on 127.0.0.1:1883")
    root = tmp_path_factory.mktemp("resume")
    run_id = f"resume-{uuid.uuid4().hex[:8]}"
    data = write_text_data(root / "d0.jsonl", n=20, seed=1)
    agent = subprocess.Popen([sys.executable, "-m", "fedpft.edge.cli", "train", "--broker", BROKER, "--device-id", "d0",
                              "--data", str(data), "--cache", str(root / "cache"), "--run-id", run_id],
                             stdout=open(root / "d0.log", "wb"), stderr=subprocess.STDOUT)
    try:
        res = subprocess.run(serve_cmd(tiny_bert_bundle, root / "run", run_id), capture_output=True, text=True, timeout=300)
    finally:
        agent.terminate()
        agent.wait(10)
    rows = [json.loads(l) for l in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res.returncode == 0 and all(r["clients"] == 1 for r in rows), res.stderr[-2000:] + (root / "d0.log").read_text()[-2000:]
    return {"bundle": tiny_bert_bundle, "run": root / "run", "run_id": run_id}


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(committed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(committed_run["run"], out)
    return out


def refused(cmd: list[str], folder: Path, must_say: str) -> str:
    """Run `cmd`; it must exit non-zero with one line naming `must_say`, and change nothing in `folder`."""
    before = snapshot(folder)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res.stderr[-2000:]
    assert len(lines) == 1 and must_say in lines[0] and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert snapshot(folder) == before
    return lines[0]


def test_committed_state_names_every_file_with_its_sha256(committed_run):
    run = committed_run["run"]
    state = json.loads((run / "state.json").read_text())
    assert state["adapters"] in state["files"] and "updates/round_0001/index.json" in state["files"]
    for rel, digest in state["files"].items():
        assert hashlib.sha256((run / rel).read_bytes()).hexdigest() == digest, rel
    index = json.loads((run / "updates/round_0000/index.json").read_text())
    assert [name.split(".")[0] for name in index] == ["d0"]
    for name, digest in index.items():  # each update's name carries the sha256 the index records
        assert name == f"d0.{digest}.safetensors"
        assert hashlib.sha256((run / "updates/round_0000" / name).read_bytes()).hexdigest() == digest


def test_intact_run_resumes(committed_run, run_copy):
    res = subprocess.run(serve_cmd(committed_run["bundle"], run_copy, committed_run["run_id"], "--resume"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "2 rounds done" in res.stdout, res.stderr[-2000:]


def test_resume_without_committed_state_refuses_and_keeps_every_file(committed_run, run_copy):
    (run_copy / "state.json").unlink()
    args = (committed_run["bundle"], run_copy, committed_run["run_id"])
    refused(serve_cmd(*args, "--resume"), run_copy, "no committed round to continue; pass --fresh")
    refused(serve_cmd(*args), run_copy, "holds files of an earlier run")  # nor quietly without a flag
    refused(serve_cmd(*args, "--resume", "--fresh"), run_copy, "exclude each other")


def test_fresh_moves_the_earlier_run_aside_untouched(committed_run, run_copy):
    before = snapshot(run_copy)
    # no device answers: the one round is skipped at once, which is enough to commit a new state
    cmd = serve_cmd(committed_run["bundle"], run_copy, "other", "--fresh", rounds=1)
    cmd[cmd.index("--wait-for-clients") + 1] = "0"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    aside = [p for p in run_copy.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in res.stderr
    assert snapshot(aside[0]) == before
    state = json.loads((run_copy / "state.json").read_text())
    assert state["run_id"] == "other" and state["history"][0]["skipped"]


def test_resume_refuses_another_run_id(committed_run, run_copy):
    refused(serve_cmd(committed_run["bundle"], run_copy, "not-this-run", "--resume"), run_copy,
            f"holds run {committed_run['run_id']!r}, not --run-id 'not-this-run'")


@pytest.mark.parametrize("damage, must_say", [
    (lambda b: b"", "state.json: empty"),
    (lambda b: b[: len(b) // 2], "state.json: not a valid run state"),
])
def test_resume_refuses_an_empty_or_truncated_state(committed_run, run_copy, damage, must_say):
    path = run_copy / "state.json"
    path.write_bytes(damage(path.read_bytes()))
    refused(serve_cmd(committed_run["bundle"], run_copy, committed_run["run_id"], "--resume"), run_copy, must_say)


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "empty"])
def test_resume_refuses_a_damaged_checkpoint(committed_run, run_copy, damage):
    state = json.loads((run_copy / "state.json").read_text())
    path = run_copy / state["adapters"]
    data = bytearray(path.read_bytes())
    if damage == "overwritten":  # what the issue did: 8 KB of garbage mid-file, the size unchanged
        n = min(8192, len(data) // 2)
        start = (len(data) - n) // 2
        data[start : start + n] = b"\xff" * n  # 0xffff... is NaN as float32
    path.write_bytes(bytes(data[: len(data) // 2]) if damage == "truncated" else b"" if damage == "empty" else bytes(data))
    line = refused(serve_cmd(committed_run["bundle"], run_copy, committed_run["run_id"], "--resume"), run_copy,
                   "sha256 does not match the one state.json recorded")
    assert state["adapters"] in line
