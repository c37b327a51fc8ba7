"""One bad device must not take the fleet down, with real processes (pytest -m "faults or security"):
real Mosquitto, real edge processes, the real `fedpft-cloud serve`.

- a device with valid credentials (provisioned, ACL) sends a huge update and claims 10^12 samples:
  its update is bounded, its weight capped, the FM stays where the undisturbed run puts it and no
  honest device crashes;
- `serve --lr 1e6` makes every device diverge: each reports an error Update, the cloud counts it at
  once (not at the deadline), and the devices stay online for the next round.
"""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_text_data
from test_faults import broker, fleet, free_port, metrics, wait_port  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.security]

MOSQUITTO = shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
CLOUD = [sys.executable, "-m", "fedpft.cloud.cli", "serve"]


def test_diverging_devices_report_errors_at_once_and_stay_online(fleet, tmp_path):  # noqa: F811
    for name in ("d0", "d1"):
        fleet.start_agent(name)
    write_text_data(tmp_path / "nodata.jsonl", n=10, labels=["zebra"])  # no sample with a label of the bundle
    fleet.start_agent("nodata")
    out = tmp_path / "run"
    cmd = [*fleet.serve_cmd(out, rounds=2, min_clients=1, timeout=120)]
    cmd[cmd.index("--lr") + 1] = "1e6"
    t0 = time.time()
    cloud = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert cloud.returncode == 0, cloud.stderr[-3000:]
    rows = metrics(out)
    print(f"\nrounds with every device failing closed after {[r['seconds'] for r in rows]} s (deadline 120 s)")
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        # every attempt ended when the errors arrived, far before the 120 s deadline
        assert r["clients"] == 0 and "TrainError: training diverged" in r["skipped"], r
        assert r["seconds"] < 60, r
    assert time.time() - t0 < 240
    assert "device d0 failed round 1: TrainError" in cloud.stderr
    assert "device nodata failed round 0: DataError" in cloud.stderr, cloud.stderr[-3000:]
    for name, p in fleet.agents.items():
        assert p.wait(60) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]  # alive until the run ended
        log = (tmp_path / f"{name}.log").read_text()
        assert "round 1 failed:" in log and "Traceback" not in log, log[-2000:]


# ---- a poisoning device with valid credentials, on Mosquitto with the provisioned ACL ---------------


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory):
    from fedpft.cloud.provision import CLOUD_USER, broker_conf, provision

    if MOSQUITTO is None:
        pytest.skip("needs the mosquitto binary")
    root = tmp_path_factory.mktemp("acl-broker")
    creds = root / "creds"
    for run in ("base", "poison", "open"):
        for d in ("d0", "d1", "evil"):
            done = provision(creds, d, run)
    pw = {d: (creds / "devices" / f"{d}.password").read_text().strip() for d in ("d0", "d1", "evil")}
    pw[CLOUD_USER] = done.cloud_password_file.read_text().strip()
    port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\npersistence false\n" + broker_conf(creds, port, bind="127.0.0.1"))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    yield {"url": f"mqtt://127.0.0.1:{port}", "pw": pw, "cloud_user": CLOUD_USER}
    proc.terminate()
    proc.wait(10)


class Poisoner:
    """A provisioned device that answers every task with a huge (finite) update and claims 10^12
    samples, in its Hello and in its Update — everything the protocol lets it lie about."""

    def __init__(self, url: str, run: str, password: str, manifest) -> None:
        from fedpft.shared import topics
        from fedpft.shared.mqtt import MqttTransport

        self.run, self.manifest, self.topics = run, manifest, topics
        self.t = MqttTransport(url, client_id="evil", username="evil", password=password)
        self.t.connect()
        self.t.subscribe(topics.round_topic(run), self._task)
        self.stop = threading.Event()
        self.answered: list[int] = []
        threading.Thread(target=self._hello, daemon=True).start()

    def _pub(self, kind: str, payload: bytes) -> None:
        self.t.publish(self.topics.device_topic(self.run, "evil", kind), payload)

    def _hello(self) -> None:
        from fedpft.shared.messages import Hello, encode

        while not self.stop.wait(1.0):
            self._pub(self.topics.HELLO, encode(Hello(run_id=self.run, sender="evil", device_id="evil", num_samples=10**12)))

    def _task(self, topic: str, payload: bytes) -> None:
        from fedpft.shared.chunks import BlobSource
        from fedpft.shared.codec import encode_tensors
        from fedpft.shared.messages import Ack, Update, decode, encode, make_update_id
        from fedpft.shared.update import binding

        task = decode(payload)
        if "evil" not in task.devices:
            return
        self._pub(self.topics.ACK, encode(Ack(run_id=self.run, round_id=task.round_id, sender="evil", device_id="evil", acked="task",
                                                 task_id=task.task_id)))
        huge = {t.key: np.full(t.shape, 1e4, t.dtype) for t in self.manifest.trainable}
        src = BlobSource(f"upd-evil-{task.round_id}", encode_tensors(huge, binding(self.run, task.round_id, "evil", task.task_id)))
        uid = make_update_id(self.run, task.round_id, "evil", task.task_id, src.sha256)
        self._pub(self.topics.UPDATE, encode(Update(run_id=self.run, round_id=task.round_id, sender="evil", device_id="evil",
                                                    blob=src.ref, num_samples=10**12, steps=1, mean_loss=0.01, task_id=task.task_id,
                                                    update_id=uid)))
        for p in src.payloads():
            self.t.publish(self.topics.upload_topic(self.run, "evil", src.blob_id), p)
        self.answered.append(task.round_id)

    def close(self) -> None:
        self.stop.set()
        self.t.close()


def separable_data(path: Path, n: int, seed: int) -> Path:
    """Texts whose label is readable from their words (each label has its own words), so FM
    accuracy moves with training and a wrecked model shows."""
    from conftest import LABELS, WORDS

    rng = np.random.default_rng(seed)
    vocab = {label: WORDS[i * 15:(i + 1) * 15] for i, label in enumerate(LABELS)}
    lines = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        lines.append(json.dumps({"text": " ".join(rng.choice(vocab[label], size=rng.integers(4, 10))), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def federated_run(bundle: Path, root: Path, broker_info: dict, run: str, poison: bool, *extra: str) -> dict:
    """3 rounds with d0, d1 (real edge processes) and, with `poison`, the Poisoner; returns facts."""
    from fedpft.shared.codec import decode_tensors
    from fedpft.shared.manifest import BundleManifest

    url, pw = broker_info["url"], broker_info["pw"]
    folder = root / run
    folder.mkdir()
    evalset = separable_data(folder / "eval.jsonl", n=90, seed=99)
    agents = {}
    for i, d in enumerate(("d0", "d1")):
        data = separable_data(folder / f"{d}.jsonl", n=96, seed=i)
        agents[d] = subprocess.Popen([sys.executable, "-m", "fedpft.edge.cli", "train", "--broker", url, "--device-id", d, "--data", str(data),
                                      "--cache", str(folder / f"cache-{d}"), "--run-id", run, "--username", d, "--password", pw[d]],
                                     stdout=open(folder / f"{d}.log", "wb"), stderr=subprocess.STDOUT)
    evil = Poisoner(url, run, pw["evil"], BundleManifest.load(bundle)) if poison else None
    out = folder / "run"
    try:
        cloud = subprocess.run([*CLOUD, "--bundle", str(bundle), "--out", str(out), "--broker", url, "--run-id", run, "--rounds", "3",
                                "--min-clients", "3" if poison else "2",  # the poisoner takes part in every round
                                "--lr", "1e-2", "--batch-size", "8", "--eval-data", str(evalset), "--round-timeout", "90",
                                "--wait-for-clients", "60", "--seed", "3", "-q", "--username", broker_info["cloud_user"],
                                "--password", pw[broker_info["cloud_user"]], *extra], capture_output=True, text=True, timeout=500)
        codes = {d: p.wait(60) for d, p in agents.items()}
    finally:
        for p in agents.values():
            if p.poll() is None:
                p.kill()
        if evil is not None:
            evil.close()
    assert cloud.returncode == 0, cloud.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())
    adapters = decode_tensors((out / state["adapters"]).read_bytes())[0]
    return {"rows": metrics(out), "log": cloud.stderr, "codes": codes, "evil_answered": evil.answered if evil else [],
            "max_abs": max(float(np.abs(v).max()) for v in adapters.values()),
            "agent_logs": {d: (folder / f"{d}.log").read_text() for d in agents}}


def test_a_poisoning_device_with_valid_credentials_cannot_wreck_the_model(tiny_bert_bundle, tmp_path, acl_broker):
    base = federated_run(tiny_bert_bundle, tmp_path, acl_broker, "base", poison=False)
    hit = federated_run(tiny_bert_bundle, tmp_path, acl_broker, "poison", poison=True)  # default bounds, FedAvg
    robust = federated_run(tiny_bert_bundle, tmp_path, acl_broker, "open", True, "--aggregator", "median")
    for name, r in (("undisturbed", base), ("poisoned, fedavg", hit), ("poisoned, median", robust)):
        print(f"\n{name:18s} FM accuracy {[r2['fm_accuracy'] for r2 in r['rows']]}, max |adapter| {r['max_abs']:.4f}")
    for r in (hit, robust):
        assert r["evil_answered"] and all("evil" in row["devices"] for row in r["rows"]), [row["devices"] for row in r["rows"]]
        assert "bounded update from evil" in r["log"] and "capped the weight of evil: claims 1000000000000 samples" in r["log"]
        for row in r["rows"]:
            assert set(row["bounded"]) == {"evil"} and set(row["capped"]) == {"evil"}, row
        # no honest device crashed, nor diverged (the finding: both died with loss nan in the next round)
        assert r["codes"] == {"d0": 0, "d1": 0}, r["agent_logs"]
        assert not any("diverged" in log for log in r["agent_logs"].values())
        # the adapters stay at the scale of the undisturbed run (the finding: 1e4 instead of 0.09)
        assert r["max_abs"] < 2 * base["max_abs"], (r["max_abs"], base["max_abs"])
    # with the robust aggregator the FM ends within noise of the undisturbed run
    assert abs(robust["rows"][-1]["fm_accuracy"] - base["rows"][-1]["fm_accuracy"]) <= 0.1


def test_a_hello_flood_on_an_open_broker_does_not_hold_the_round(fleet, broker, tmp_path):  # noqa: F811
    """The finding: 5,000 hellos from random ids were all sent the task, and the round waited out its
    full timeout. Now they cost the ack deadline, and the real devices' updates count."""
    from fedpft.shared import topics
    from fedpft.shared.messages import Hello, encode
    from fedpft.shared.mqtt import MqttTransport

    for name in ("d0", "d1"):
        fleet.start_agent(name)
    flood = MqttTransport(broker["url"], client_id="flood")
    flood.connect()
    stop = threading.Event()

    def hellos() -> None:  # keeps the ghosts "online" through the run, as a live attacker would
        while not stop.is_set():
            for i in range(1500):
                d = f"ghost{i:05d}"
                flood.publish(topics.device_topic(fleet.run_id, d, topics.HELLO),
                              encode(Hello(run_id=fleet.run_id, sender=d, device_id=d, num_samples=10)))
            # no pause: hellos sent before the cloud subscribed are lost, and both rounds can be
            # over within seconds, so the ghosts must be announcing when each Task is drawn
            stop.wait(0.2)

    threading.Thread(target=hellos, daemon=True).start()
    out = tmp_path / "run"
    try:
        cloud = subprocess.run(fleet.serve_cmd(out, "--task-ack-timeout", "5", rounds=2, min_clients=2, timeout=120),
                               capture_output=True, text=True, timeout=400)
    finally:
        stop.set()
        time.sleep(0.2)
        flood.close()
    assert cloud.returncode == 0, cloud.stderr[-3000:]
    rows = metrics(out)
    print(f"\nrounds with 1500 silent hellos + 2 devices: {[r['seconds'] for r in rows]} s (ack deadline 5 s, round timeout 120 s)")
    assert [r["devices"] for r in rows] == [["d0", "d1"], ["d0", "d1"]]
    assert all(r["seconds"] < 60 for r in rows), [r["seconds"] for r in rows]
    assert sum(len(r.get("failed", {})) for r in rows) >= 100  # ghosts were sent the task (as many as had registered)
    assert "did not ack the task within 5s" in cloud.stderr


def test_a_relabelled_replay_on_an_open_broker_is_refused(fleet, broker, tmp_path):  # noqa: F811
    """The finding: d0's round-0 update, relabelled as round 1 by someone on an open broker, was
    counted and d0's real round-1 update dropped as a duplicate. Now the replay is refused (the
    blob is bound to round 0's task), the real one counts, and d0 acts only on its own receipt."""
    from fedpft.shared import topics
    from fedpft.shared.messages import Task, Update, decode, encode, make_update_id
    from fedpft.shared.mqtt import MqttTransport

    for name in ("d0", "d1"):
        fleet.start_agent(name)
    run = fleet.run_id
    seen: dict = {"chunks": []}
    spy = MqttTransport(broker["url"], client_id="spy")
    spy.connect()

    def on_device(topic: str, payload: bytes) -> None:  # d0's first update and its chunks (they follow it)
        if topic.endswith("/update") and "update" not in seen:
            seen["update"] = decode(payload)
        elif "/upload/" in topic and "update" in seen and topic.endswith("/" + seen["update"].blob.blob_id):
            seen["chunks"].append((topic, payload))

    def on_task(topic: str, payload: bytes) -> None:
        task = decode(payload)
        if not isinstance(task, Task) or task.round_id != 1 or not seen["chunks"]:
            return
        old: Update = seen["update"]
        uid = make_update_id(run, 1, "d0", task.task_id, old.blob.sha256)
        replay = Update(**{**old.model_dump(), "round_id": 1, "task_id": task.task_id, "update_id": uid})
        spy.publish(topics.device_topic(run, "d0", topics.UPDATE), encode(replay))
        for t, p in seen["chunks"]:
            spy.publish(t, p)
        seen["replayed"] = True

    spy.subscribe(f"fedpft/{run}/device/d0/update", on_device)
    spy.subscribe(f"fedpft/{run}/device/d0/upload/+", on_device)
    spy.subscribe(topics.round_topic(run), on_task)
    out = tmp_path / "run"
    try:
        cloud = subprocess.run(fleet.serve_cmd(out, rounds=2, min_clients=2, timeout=60), capture_output=True, text=True, timeout=300)
    finally:
        spy.close()
    assert cloud.returncode == 0, cloud.stderr[-3000:]
    assert seen.get("replayed")
    assert "rejected update from d0 for round 1" in cloud.stderr, cloud.stderr[-3000:]
    assert [r["devices"] for r in metrics(out)] == [["d0", "d1"], ["d0", "d1"]]
    fleet.agents["d0"].wait(60)
    log = (tmp_path / "d0.log").read_text()
    assert "round 1: update" in log and " accepted" in log.split("round 1: update", 1)[1], log[-2000:]
    assert "refused" not in log, log[-2000:]
