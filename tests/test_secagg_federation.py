"""Secure aggregation and DP in a real federation (issue 14): the real `fedpft-cloud serve`, real
edge processes, a private Mosquitto, the tiny BERT bundle. Kept to 2-3 devices and 1-2 rounds.

- `--secure-agg` gives the global adapters of the plain run within the fixed-point tolerance,
  although a third device drops after its shares were routed (k = 1 <= n - T = 3 - 2: its masks
  are recovered), and the run folder holds no device's update;
- central DP records epsilon per round and ends the run at `--dp-max-epsilon`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_text_data
from test_faults import broker, metrics  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.security]

EDGE_PYTHON = os.environ.get("FEDPFT_EDGE_PYTHON") or sys.executable


class Devices:
    def __init__(self, root: Path, url: str):
        self.root, self.url, self.procs = root, url, []
        for name in ("d0", "d1"):
            write_text_data(root / f"{name}.jsonl", n=24, seed=int(name[1]) + 7)
        self.eval = write_text_data(root / "eval.jsonl", n=12, seed=99)

    def start(self, run_id: str) -> None:
        for name in ("d0", "d1"):
            log = open(self.root / f"{run_id}-{name}.log", "wb")
            self.procs.append(subprocess.Popen(
                [EDGE_PYTHON, "-m", "fedpft.edge.cli", "train", "--broker", self.url, "--device-id", name, "--threads", "1",
                 "--data", str(self.root / f"{name}.jsonl"), "--cache", str(self.root / f"cache-{run_id}-{name}"), "--run-id", run_id],
                stdout=log, stderr=subprocess.STDOUT))

    def serve(self, bundle: Path, run_id: str, out: Path, *extra: str, rounds: int = 2) -> subprocess.CompletedProcess:
        return subprocess.run(self.serve_cmd(bundle, run_id, out, *extra, rounds=rounds), capture_output=True, text=True, timeout=400)

    def serve_cmd(self, bundle: Path, run_id: str, out: Path, *extra: str, rounds: int = 2) -> list[str]:
        return [sys.executable, "-m", "fedpft.cloud.cli", "serve", "--bundle", str(bundle), "--out", str(out), "--broker", self.url,
               "--run-id", run_id, "--rounds", str(rounds), "--min-clients", "2", "--lr", "1e-2", "--batch-size", "8",
               "--max-steps", "2", "--eval-data", str(self.eval), "--round-timeout", "90", "--wait-for-clients", "60",
               "--norm-bound-factor", "0", "--weight-cap-factor", "0", "--seed", "3", "-q", *extra]

    def finish(self) -> None:
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


def dropping_device(url: str, run_id: str, stop: threading.Event, leave: bool = True) -> None:
    """A third device that hellos, sends its keys and shares, then drops (its last will says so),
    or with leave=False stalls silently until `stop`."""
    from fedpft.edge.secagg import SecAggParticipant
    from fedpft.shared import topics
    from fedpft.shared.messages import Hello, Presence, SecAggRoster, Task, decode, encode
    from fedpft.shared.mqtt import MqttTransport

    me, inbox = "fake", []
    part = SecAggParticipant(run_id, me)
    t = MqttTransport(url, client_id=f"{run_id}-{me}")
    t.connect()
    for topic in (topics.round_topic(run_id), topics.secagg_topic(run_id)):
        t.subscribe(topic, lambda topic, payload: inbox.append(decode(payload)) if payload else None)
    pub = lambda kind, msg: t.publish(topics.device_topic(run_id, me, kind), encode(msg))  # noqa: E731
    while not stop.is_set():
        pub(topics.HELLO, Hello(run_id=run_id, sender=me, device_id=me, num_samples=24))
        for msg in list(inbox):
            inbox.remove(msg)
            if isinstance(msg, Task) and me in msg.devices:
                pub(topics.SECAGG, part.keys(msg.round_id, msg.task_id))
            elif isinstance(msg, SecAggRoster):
                pub(topics.SECAGG, part.on_roster(msg))
                if not leave:
                    stop.wait()
                    break
                time.sleep(0.5)
                pub(topics.PRESENCE, Presence(run_id=run_id, sender=me, device_id=me, status="offline", reason="connection lost"))
                t.close()
                return
        stop.wait(0.3)
    t.close()


def final_adapters(run: Path) -> dict[str, np.ndarray]:
    from fedpft.shared.codec import decode_tensors

    state = json.loads((run / "state.json").read_text())
    return decode_tensors((run / state["adapters"]).read_bytes())[0]


def test_secure_run_matches_plain_recovers_a_dropped_device_and_stores_no_update(tiny_bert_bundle, tmp_path, broker):  # noqa: F811
    devs = Devices(tmp_path, broker["url"])
    devs.start("plain")
    plain = devs.serve(tiny_bert_bundle, "plain", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    devs.finish()

    stop = threading.Event()
    fake = threading.Thread(target=dropping_device, args=(broker["url"], "sec", stop), daemon=True)
    fake.start()
    time.sleep(1.0)  # registered before the real devices (which take seconds to start)
    devs.start("sec")
    secure = devs.serve(tiny_bert_bundle, "sec", tmp_path / "sec", "--secure-agg", "--secagg-threshold", "2",
                        "--clients-per-round", "3", "--secagg-stage-timeout", "30")
    stop.set()
    assert secure.returncode == 0, secure.stderr[-3000:]
    devs.finish()

    rows = metrics(tmp_path / "sec")
    assert [r["clients"] for r in rows] == [2, 2], rows
    assert rows[0]["secagg_dropped"] == ["fake"] and rows[0]["secagg_survivors"] == 2, rows[0]
    assert rows[0]["secagg_bytes"] > 0 and rows[0]["devices"] == ["d0", "d1"]
    a, b = final_adapters(tmp_path / "plain"), final_adapters(tmp_path / "sec")
    assert set(a) == set(b)
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst < 1e-5, worst
    assert max(float(np.max(np.abs(a[k]))) for k in a) > 1e-3  # the runs did move the adapters
    # no individual update, plain or masked, and no coordinator state is left in the run folder
    run = tmp_path / "sec"
    assert not (run / "updates").exists() or not any((run / "updates").rglob("*.safetensors"))
    leftovers = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()
                 and not p.relative_to(run).as_posix().startswith("checkpoints/")]
    assert sorted(leftovers) == ["accuracy.png", "metrics.jsonl", "report.md", "serve_config.json", "state.json"], leftovers
    assert json.loads((run / "serve_config.json").read_text())["secure_agg"] is True
    assert "secure_agg" not in json.loads((tmp_path / "plain" / "serve_config.json").read_text())


def test_central_dp_records_epsilon_and_stops_at_the_budget(tiny_bert_bundle, tmp_path, broker):  # noqa: F811
    from fedpft.cloud.dp import epsilon

    one, two = epsilon([(1.0, 2.0)], 1e-5), epsilon([(1.0, 2.0)] * 2, 1e-5)
    budget = (one + two) / 2  # round 0 fits, round 1 would not
    devs = Devices(tmp_path, broker["url"])
    devs.start("dp")
    run = devs.serve(tiny_bert_bundle, "dp", tmp_path / "dp", "--dp-clip", "0.5", "--dp-noise", "2",
                     "--dp-max-epsilon", f"{budget:.4f}", rounds=3)
    assert run.returncode == 0, run.stderr[-3000:]
    devs.finish()
    rows = metrics(tmp_path / "dp")
    assert len(rows) == 1, rows
    r = rows[0]
    assert r["clients"] == 2 and r["dp_clip"] == 0.5 and r["dp_noise"] == 2 and r["dp_q"] == 1.0 and r["dp_delta"] == 1e-5
    assert abs(r["dp_epsilon"] - one) < 1e-9
    assert "privacy budget reached: round 1 would bring epsilon to" in run.stderr, run.stderr[-2000:]
    assert "epsilon" in (tmp_path / "dp" / "report.md").read_text()
    state = json.loads((tmp_path / "dp" / "state.json").read_text())
    assert state["next_round"] == 1


def test_cloud_killed_mid_secure_round_restarts_it_cleanly(tiny_bert_bundle, tmp_path, broker):  # noqa: F811
    """A stalling third device keeps round 0 in its masked stage; the cloud is killed there (the
    masked-only state is on disk) and resumed: the round restarts under a new task with the two
    devices left, and the state file is gone."""
    from fedpft.cloud import secagg_store

    stop = threading.Event()
    fake = threading.Thread(target=dropping_device, args=(broker["url"], "cut", stop, False), daemon=True)
    fake.start()
    time.sleep(1.0)
    devs = Devices(tmp_path, broker["url"])
    devs.start("cut")
    out = tmp_path / "cut"
    cmd = devs.serve_cmd(tiny_bert_bundle, "cut", out, "--secure-agg", "--secagg-threshold", "2", "--clients-per-round", "3",
                         rounds=1)
    cloud = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "secagg-state.safetensors"

    def stage() -> str | None:
        try:
            return secagg_store.read(state).stage
        except (OSError, ValueError):  # not there yet, or being replaced
            return None

    end = time.time() + 120
    while time.time() < end and stage() != "masked":
        time.sleep(0.2)
    assert stage() == "masked", "the secure round never reached its masked stage"
    cloud.kill()
    cloud.wait(10)
    stop.set()
    fake.join(10)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    devs.finish()
    assert "was cut by a restart; the round restarts under a new task" in resumed.stderr
    rows = metrics(out)
    assert [r["clients"] for r in rows] == [2] and rows[0]["secagg_survivors"] == 2, rows
    assert not state.exists() and not (out / "updates").exists()
