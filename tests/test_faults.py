"""Fault tolerance with real processes (pytest -m faults): devices, the cloud and the broker die
mid-run; late devices are refused. Tiny BERT bundle so each run takes seconds, not minutes."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_text_data

pytestmark = [pytest.mark.slow, pytest.mark.faults]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_mosquitto(port: int, folder: Path) -> subprocess.Popen:
    conf = folder / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    p = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


@pytest.fixture
def broker(tmp_path):
    if not Path(MOSQUITTO).exists():
        pytest.skip("needs the mosquitto binary")
    port = free_port()
    proc = start_mosquitto(port, tmp_path)
    info = {"port": port, "url": f"mqtt://127.0.0.1:{port}", "proc": proc}
    yield info
    info["proc"].terminate()
    info["proc"].wait(5)


class Fleet:
    def __init__(self, bundle: Path, root: Path, url: str, run_id: str):
        self.bundle, self.root, self.url, self.run_id = bundle, root, url, run_id
        self.agents: dict[str, subprocess.Popen] = {}
        self.eval = write_text_data(root / "eval.jsonl", n=30, seed=99)

    def start_agent(self, name: str, n: int = 40) -> subprocess.Popen:
        data = self.root / f"{name}.jsonl"
        if not data.is_file():
            write_text_data(data, n=n, seed=hash(name) % 1000)
        log = open(self.root / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "fedpft.edge.cli", "train", "--broker", self.url, "--device-id", name,
                              "--data", str(data), "--cache", str(self.root / f"cache-{name}"), "--run-id", self.run_id],
                             stdout=log, stderr=subprocess.STDOUT)
        self.agents[name] = p
        return p

    def serve_cmd(self, out: Path, *extra: str, rounds: int = 3, min_clients: int = 2, timeout: float = 60) -> list[str]:
        return [sys.executable, "-m", "fedpft.cloud.cli", "serve", "--bundle", str(self.bundle), "--out", str(out),
                "--broker", self.url, "--run-id", self.run_id, "--rounds", str(rounds), "--min-clients", str(min_clients),
                "--lr", "1e-2", "--batch-size", "8", "--eval-data", str(self.eval), "--round-timeout", str(timeout),
                "--wait-for-clients", "60", "--seed", "3", "-q", *extra]

    def stop(self) -> None:
        for p in self.agents.values():
            if p.poll() is None:
                p.terminate()
        for p in self.agents.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def fleet(tiny_bert_bundle, tmp_path, broker):
    f = Fleet(tiny_bert_bundle, tmp_path, broker["url"], "faults")
    yield f
    f.stop()


def metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.is_file() else []


def wait_for(cond, timeout: float, what: str, poll: float = 0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_edge_killed_mid_round_round_completes_on_quorum_and_device_rejoins(fleet, tmp_path):
    for name in ("d0", "d1", "d2"):
        fleet.start_agent(name, n=160)  # enough local work that a restarted device catches a later round
    out = tmp_path / "run"
    cloud = subprocess.Popen(fleet.serve_cmd(out, rounds=6, min_clients=2, timeout=20), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # kill d2 as soon as it has the round-0 task (it acks the task before fetching and training)
    wait_for(lambda: (tmp_path / "cache-d2").is_dir() and any((tmp_path / "cache-d2").rglob("*")), 60, "d2 to start round 0")
    fleet.agents["d2"].send_signal(signal.SIGKILL)
    wait_for(lambda: len(metrics(out)) >= 1, 120, "round 0")
    fleet.start_agent("d2")  # same cache: it rejoins
    log, _ = cloud.communicate(timeout=240)
    assert cloud.returncode == 0, log[-3000:]
    rows = metrics(out)
    assert len(rows) == 6
    assert rows[0]["clients"] == 2 and "d2" not in rows[0]["devices"]
    assert any("d2" in r["devices"] for r in rows[1:]), [r["devices"] for r in rows]


def test_cloud_killed_mid_round_resumes_without_losing_or_double_counting(fleet, tmp_path):
    fleet.start_agent("d0", n=20)
    fleet.start_agent("d1", n=1500)  # d1 answers seconds after d0: the cloud dies between the two
    out = tmp_path / "run"
    first = subprocess.Popen(fleet.serve_cmd(out, rounds=3, min_clients=2, timeout=60), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # kill it right after it accepted the first update of round 1, before the round closes
    updates = out / "updates" / "round_0001"
    wait_for(lambda: updates.is_dir() and any(updates.glob("*.safetensors")), 180, "a round-1 update", poll=0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert len(metrics(out)) == 1
    resumed = subprocess.run(fleet.serve_cmd(out, "--resume", rounds=3, min_clients=2, timeout=60), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and len(set(r["devices"])) == 2 for r in rows)
    assert "restored from disk" in resumed.stderr


def test_broker_restart_mid_run_completes(fleet, broker, tmp_path):
    for name in ("d0", "d1"):
        fleet.start_agent(name)
    out = tmp_path / "run"
    cloud = subprocess.Popen(fleet.serve_cmd(out, rounds=3, min_clients=2, timeout=60), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(metrics(out)) >= 1, 120, "round 0")
    broker["proc"].terminate()
    broker["proc"].wait(5)
    time.sleep(1.0)
    broker["proc"] = start_mosquitto(broker["port"], tmp_path)
    log, _ = cloud.communicate(timeout=300)
    assert cloud.returncode == 0, log[-3000:]
    assert [r["round"] for r in metrics(out)] == [0, 1, 2]
    assert sum(r["clients"] for r in metrics(out)[1:]) >= 2  # later rounds still got updates


def test_late_update_is_rejected_as_stale_and_never_mixed(tiny_bert_bundle, tmp_path, broker, caplog):
    """A device slower than the deadline answers round 0 while the cloud is in round 1."""
    import logging
    import threading

    import numpy as np

    from fedpft.cloud.server import Federation
    from fedpft.shared import topics
    from fedpft.shared.chunks import BlobSource
    from fedpft.shared.codec import decode_tensors, encode_tensors
    from fedpft.cloud.config import ServeConfig
    from fedpft.shared.messages import Hello, Task, Update, decode, encode, make_update_id
    from fedpft.shared.mqtt import MqttTransport
    from fedpft.shared.update import binding

    init = decode_tensors((tiny_bert_bundle / "adapters_init.safetensors").read_bytes())[0]
    run = "late"
    fast, slow = MqttTransport(broker["url"], "dev-fast"), MqttTransport(broker["url"], "dev-slow")
    fast.connect()
    slow.connect()
    tasks: dict[str, list[Task]] = {"fast": [], "slow": []}

    def device(t, name, delay):
        def on_task(topic, payload):
            task = decode(payload)
            if name not in task.devices:
                return
            tasks[name].append(task)

            def answer():
                time.sleep(delay)
                if not t.connected:
                    return  # the test is over
                upd = {k: v + np.float32(0.01) for k, v in init.items()}
                bound = binding(run, task.round_id, name, task.task_id)  # the task it answers, as a real device stamps it
                src = BlobSource(f"u-{name}-{task.round_id}", encode_tensors(upd, {"num_samples": "10", **bound}))
                t.publish(topics.upload_topic(run, name, src.blob_id), next(src.payloads()))
                t.publish(topics.device_topic(run, name, topics.UPDATE), encode(Update(
                    run_id=run, round_id=task.round_id, sender=name, device_id=name, num_samples=10, steps=1, mean_loss=1.0, blob=src.ref,
                    task_id=task.task_id, update_id=make_update_id(run, task.round_id, name, task.task_id, src.ref.sha256))))

            threading.Thread(target=answer, daemon=True).start()

        t.subscribe(topics.round_topic(run), on_task)
        t.publish(topics.device_topic(run, name, topics.HELLO), encode(Hello(run_id=run, sender=name, device_id=name, num_samples=10)))

    cfg = ServeConfig(bundle=tiny_bert_bundle, out=tmp_path / "run", broker=broker["url"], run_id=run, rounds=2,
                      min_clients=1, round_timeout=3, wait_for_clients=20)
    cloud = MqttTransport(broker["url"], "cloud-late")
    with cloud, caplog.at_level(logging.WARNING, logger="fedpft.serve"):
        fed = Federation(cfg, cloud, show_progress=False)
        fed.subscribe()
        device(fast, "fast", 0.0)
        device(slow, "slow", 4.5)
        wait_for(lambda: fed.events.qsize() >= 2, 10, "both hellos")
        state = fed.run()
    fast.close()
    slow.close()
    rows = state.history
    assert [r["devices"] for r in rows] == [["fast"], ["fast"]]
    assert any("rejected update from slow for round 0" in m and "stale" in m for m in caplog.messages), caplog.messages
    assert not any((tmp_path / "run" / "updates" / "round_0001").glob("slow*.safetensors"))
    assert any((tmp_path / "run" / "updates" / "round_0001").glob("fast.*.safetensors"))  # the glob does find updates
