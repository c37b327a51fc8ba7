"""Fleet rollouts: selection, version pointers and rollback targets (pure), then real
`fedpft-edge fleet` processes over the machine's Mosquitto: a canary rollout, status, rollback,
and bundles refused for a bad sha256 or a foreign signature while the previous version stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_bundle, mosquitto_up
from fedpft.cloud.rollout import (
    DeviceView, FleetState, GroupRecord, group_key, outcome, prevailing, read_fleet, rollout, select_fraction,
)
from fedpft.cloud.config import RolloutConfig
from fedpft.edge.blobs import AgentError
from fedpft.edge.fleet import POINTERS_NAME, Pointers, load_pointers, save_pointers
from fedpft.shared.config import BrokerConfig
from fedpft.shared.messages import BundleVersion, DeviceStatus, Presence

V1, V2, V3 = (BundleVersion(bundle_id=f"b{i}", bundle_version=i) for i in (1, 2, 3))
MOSQUITTO = "mqtt://127.0.0.1:1883"


# ---- pure logic -------------------------------------------------------------------------------


def test_fraction_selection_is_deterministic_sized_and_stable():
    devices = [f"d{i}" for i in range(20)]
    pick = select_fraction(devices, 0.25, seed=3)
    assert len(pick) == 5 and pick == select_fraction(list(reversed(devices)), 0.25, seed=3) == sorted(pick)
    assert select_fraction(devices, 0.25, seed=4) != pick
    assert select_fraction(devices, 1.0, 0) == sorted(devices)
    assert len(select_fraction(devices, 0.01, 0)) == 1 and select_fraction([], 0.5, 0) == []
    # a device's rank does not depend on the others: growing the fleet never drops an earlier pick of the same rank
    assert set(select_fraction(devices[:10], 0.2, 3)) <= set(select_fraction(devices, 0.5, 3))


def test_pointers_install_keep_previous_and_roll_back():
    p = Pointers().installed(V1)
    assert p == Pointers(V1, None) and p.installed(V1) is p
    p = p.installed(V2)
    assert p == Pointers(V2, V1) and p.kept() == {"b1", "b2"}
    back = p.rolled_back(V1)
    assert back == Pointers(V1, V2) and back.rolled_back(V1) is back
    with pytest.raises(AgentError, match="keeps v2"):
        back.rolled_back(V3)
    with pytest.raises(AgentError, match="no previous version"):
        Pointers(V1, None).rolled_back(V2)


def test_pointer_file_is_written_atomically_and_read_back(tmp_path):
    path = tmp_path / POINTERS_NAME
    assert load_pointers(path) == Pointers()
    save_pointers(path, Pointers(V2, V1))
    assert load_pointers(path) == Pointers(V2, V1)
    assert [p.name for p in tmp_path.iterdir()] == [POINTERS_NAME]  # no temp file left
    path.write_text("{not json")
    with pytest.raises(AgentError, match="unreadable"):
        load_pointers(path)


def test_rollback_target_comes_from_the_group_state(tmp_path):
    assert group_key("canary", None, 0) == "cohort:canary" and group_key(None, 0.5, 7) == "fraction:0.5:seed7"
    assert prevailing([V1, V1, V2, None], exclude=V2) == V1 and prevailing([V2, None], exclude=V2) is None
    state = FleetState(tmp_path / "state")
    assert state.groups() == {} and state.history() == []
    state.save_group("cohort:canary", GroupRecord(V2, V1, ["a", "b"]))
    state.save_group("cohort:stable", GroupRecord(V1, None, ["c"]))
    state.append({"rollout_id": "ro-1"})
    assert state.groups()["cohort:canary"] == GroupRecord(V2, V1, ["a", "b"]) and state.groups()["cohort:stable"].previous is None
    assert state.history() == [{"rollout_id": "ro-1"}]
    with pytest.raises(Exception, match="no previous version"):
        rollout(RolloutConfig(cohort="stable", rollback=True, state=tmp_path / "state"), transport=object())  # type: ignore[arg-type]


def test_outcome_lines():
    ok = DeviceStatus(run_id="f", sender="a", device_id="a", cohort="c", installed=V2, state="installed", rollout_id="ro-1")
    bad = ok.model_copy(update={"state": "failed", "installed": V1, "reason": "sha256 does not match"})
    off = Presence(run_id="f", sender="a", device_id="a", status="offline")
    assert outcome(DeviceView("a", ok), "ro-1") == "installed v2 (b2)"
    assert outcome(DeviceView("a", bad), "ro-1") == "failed: sha256 does not match"
    assert outcome(DeviceView("a", ok), "ro-2") == "no answer"
    assert outcome(DeviceView("a", ok, off), "ro-2") == "no answer (offline)" and outcome(None, "ro-1") == "no answer"


def test_cli_help_and_one_line_errors():
    from fedpft.cloud.cli import app as cloud
    from fedpft.edge.cli import app as edge

    r = CliRunner()
    for app, cmd in ((cloud, "rollout"), (cloud, "status"), (edge, "fleet")):
        assert r.invoke(app, [cmd, "--help"]).exit_code == 0
    for args, msg in ((["rollout", "--bundle", "x"], "exactly one of --cohort or --fraction"),
                      (["rollout", "--cohort", "c"], "give --bundle"),
                      (["rollout", "--cohort", "c", "--rollback", "--bundle", "x"], "takes no --bundle"),
                      (["rollout", "--cohort", "c/d", "--rollback"], "invalid --cohort"),
                      (["status", "--fleet", "a/b"], "invalid fleet name")):
        res = r.invoke(cloud, args)
        assert res.exit_code == 2 and res.output.startswith("error: ") and msg in res.output and res.output.count("\n") == 1, res.output
    res = r.invoke(edge, ["fleet", "--broker", MOSQUITTO, "--device-id", "a b", "--cohort", "c", "--cache", "x"])
    assert res.exit_code == 2 and "invalid --device-id" in res.output


# ---- integration over Mosquitto -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bert_dir):
    """v1, v2 signed by the cloud's key; v3 signed by an impostor's."""
    from fedpft.shared.signing import generate_keypair

    root = tmp_path_factory.mktemp("rollout")
    key, pub = generate_keypair(root / "keys")
    other, _ = generate_keypair(root / "impostor")
    made = {v: make_bundle(str(tiny_bert_dir), root / f"v{v}", bundle_version=v, signing_key=k) for v, k in ((1, key), (2, key), (3, other))}
    return {"root": root, "key": key, "pub": pub, **made}


def start_device(root: Path, fleet: str, device: str, cohort: str, *extra: str) -> subprocess.Popen:
    log = open(root / f"{fleet}-{device}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "fedpft.edge.cli", "fleet", "--broker", MOSQUITTO, "--device-id", device,
                             "--cohort", cohort, "--cache", str(root / f"cache-{fleet}-{device}"), "--fleet", fleet, "--heartbeat", "2",
                             *extra], stdout=log, stderr=subprocess.STDOUT)


def views(fleet: str) -> dict[str, DeviceView]:
    return {v.device_id: v for v in read_fleet(BrokerConfig(broker=MOSQUITTO), fleet, settle=0.3)}


def wait_for(fleet: str, pred, timeout: float = 20.0) -> dict[str, DeviceView]:
    end = time.time() + timeout
    while True:
        seen = views(fleet)
        if pred(seen) or time.time() > end:
            return seen
        time.sleep(0.2)


def cli_rollout(fleet: str, state: Path, key: Path, *args: str) -> str:
    from fedpft.cloud.cli import app

    res = CliRunner().invoke(app, ["rollout", "--broker", MOSQUITTO, "--fleet", fleet, "--state", str(state), "--timeout", "30",
                                   "--signing-key", str(key), *args])
    assert res.exit_code == 0, res.output
    return res.output


def installed(v: DeviceView) -> int | None:
    return v.status.installed.bundle_version if v.status and v.status.installed else None


@pytest.mark.slow
@pytest.mark.skipif(not mosquitto_up(), reason="needs Mosquitto on 127.0.0.1:1883")
def test_canary_rollout_status_rollback_and_refusals(bundles, tmp_path):
    fleet = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    root, state, key = bundles["root"], tmp_path / "state", bundles["key"]
    procs = {
        "c1": start_device(root, fleet, "c1", "canary", "--trust-key", str(bundles["pub"])),
        "c2": start_device(root, fleet, "c2", "canary"),
        "s1": start_device(root, fleet, "s1", "stable"),
    }
    try:
        seen = wait_for(fleet, lambda s: len(s) == 3 and all(v.status and v.online for v in s.values()))
        assert {d: (v.status.state, v.status.cohort) for d, v in seen.items()} == {
            "c1": ("idle", "canary"), "c2": ("idle", "canary"), "s1": ("idle", "stable")}

        # v1 everywhere, then v2 only to the canaries
        out = cli_rollout(fleet, state, key, "--bundle", str(bundles[1]), "--fraction", "1")
        assert out.count("installed v1") == 3 and "3/3 installed" in out, out
        out = cli_rollout(fleet, state, key, "--bundle", str(bundles[2]), "--cohort", "canary")
        assert "c1: installed v2" in out and "c2: installed v2" in out and "s1" not in out, out
        seen = views(fleet)
        assert {d: installed(v) for d, v in seen.items()} == {"c1": 2, "c2": 2, "s1": 1}
        assert seen["c1"].status.previous.bundle_version == 1 and seen["s1"].status.previous is None

        from fedpft.cloud.cli import app

        res = CliRunner().invoke(app, ["status", "--broker", MOSQUITTO, "--fleet", fleet])
        assert res.exit_code == 0 and all(d in res.output for d in ("c1", "c2", "s1")), res.output
        assert res.output.count("online") == 3 and "canary" in res.output and "stable" in res.output

        # rollback: the canaries return to the version they kept
        out = cli_rollout(fleet, state, key, "--rollback", "--cohort", "canary")
        assert "rollback to v1" in out and "c1: installed v1" in out and "c2: installed v1" in out, out
        seen = views(fleet)
        assert {d: installed(v) for d, v in seen.items()} == {"c1": 1, "c2": 1, "s1": 1}
        assert seen["c2"].status.previous.bundle_version == 2
        v2_dir = root / f"cache-{fleet}-c2" / "versions"
        assert sorted(p.name for p in v2_dir.iterdir()) == sorted([seen["c2"].status.installed.bundle_id, seen["c2"].status.previous.bundle_id])

        # one byte changed after packing (and an unsigned rollout message): refused, v1 stays current
        from fedpft.shared.archive import pack_bundle
        from fedpft.shared.manifest import BundleManifest

        import io
        import tarfile

        data = bytearray(pack_bundle(bundles[3]))
        last = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()[-1]  # a device file, after manifest.json
        data[last.offset_data + last.size // 2] ^= 0xFF
        report = rollout(RolloutConfig(broker=MOSQUITTO, fleet=fleet, bundle=bundles[3], cohort="canary", state=state, timeout=30),
                         bundle=(BundleManifest.load(bundles[3]), bytes(data)))
        assert report.results["c1"].startswith("failed: rollout") and "not signed" in report.results["c1"], report.results
        assert report.results["c2"].startswith("failed:") and "sha256" in report.results["c2"], report.results
        # signed rollout of the impostor-signed v3: the trusting device refuses, the dev-mode one installs
        out = cli_rollout(fleet, state, key, "--bundle", str(bundles[3]), "--cohort", "canary")
        assert "c2: installed v3" in out and "c1: failed: bundle" in out and "not by the trusted key" in out, out
        seen = views(fleet)
        assert {d: installed(v) for d, v in seen.items()} == {"c1": 1, "c2": 3, "s1": 1}
        assert seen["c1"].status.state == "failed" and "trusted key" in seen["c1"].status.reason
        assert len(FleetState(state).history()) == 5

        # SIGTERM: clean exit, retained offline presence; SIGKILL: the broker's last will
        procs["c1"].send_signal(signal.SIGTERM)
        assert procs["c1"].wait(15) == 0
        procs["s1"].kill()
        procs["s1"].wait(5)
        seen = wait_for(fleet, lambda s: not s["c1"].online and not s["s1"].online)
        assert (seen["c1"].presence.reason, seen["s1"].presence.reason) == ("stopped", "connection lost")
        assert installed(seen["c1"]) == 1 and seen["c2"].online
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
