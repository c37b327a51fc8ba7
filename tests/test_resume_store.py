"""RunStore's guarantees, in process (pytest -m faults): what a commit names is never written
again, stored updates are counted only when they match their sha256, and a state.json from disk is
checked before anything it names is trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpft.cloud.state import RunError, RunState, RunStore, parse_update_name, sha256, update_name
from fedpft.shared.codec import encode_tensors

pytestmark = pytest.mark.faults
ADAPTERS = {"a": np.ones((2, 3), np.float32)}


def committed(folder) -> tuple[RunStore, RunState]:
    store = RunStore(folder)
    rel = store.write_tensors("checkpoints/adapters_round_0000.safetensors", ADAPTERS)
    store.save_update(0, "dev1", encode_tensors(ADAPTERS))
    state = RunState(run_id="r", bundle_id="b", adapters=rel, next_round=1)
    store.commit(state)
    return store, state


def test_nothing_a_commit_names_is_written_again(tmp_path):
    store, state = committed(tmp_path)
    with pytest.raises(RunError, match="committed round"):
        store.write_tensors(state.adapters, ADAPTERS)
    with pytest.raises(RunError, match="committed round"):
        store.save_update(0, "dev2", encode_tensors(ADAPTERS))  # a late update for a finished round
    # a resumed store knows the same
    again = RunStore(tmp_path)
    assert again.begin("r", "b", resume=True).next_round == 1
    with pytest.raises(RunError, match="committed round"):
        again.save_update(0, "dev1", b"x")
    store.save_update(1, "dev1", encode_tensors(ADAPTERS))  # the next round is open


def test_a_stored_update_that_does_not_match_its_hash_is_asked_for_again(tmp_path):
    store = RunStore(tmp_path)
    good = store.save_update(3, "good", encode_tensors(ADAPTERS))
    bad = store.save_update(3, "bad", encode_tensors(ADAPTERS))
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1  # one flipped bit in a value: still a valid safetensors file
    bad.write_bytes(bytes(data))
    # the layout before names carried the hash: a side file, and without it the update is not counted
    folder = good.parent
    (folder / "nohash.safetensors").write_bytes(encode_tensors(ADAPTERS))
    old = encode_tensors(ADAPTERS)
    (folder / "old.safetensors").write_bytes(old)
    (folder / "old.safetensors.sha256").write_text(sha256(old) + "\n")
    assert RunStore(tmp_path).stored_updates(3) == {"good": good, "old": folder / "old.safetensors"}
    again = RunStore(tmp_path)
    again.stored_updates(3)
    assert again.read_update(3, "old") == old and again.read_update(3, "good") == good.read_bytes()


def test_an_update_is_one_file_named_by_its_sha256(tmp_path):
    store = RunStore(tmp_path)
    payload = encode_tensors(ADAPTERS)
    path = store.save_update(0, "dev.1", payload)
    assert path.name == update_name("dev.1", sha256(payload)) and parse_update_name(path.name) == ("dev.1", sha256(payload))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no side file, no temp file
    assert parse_update_name("dev.1.safetensors") == ("dev.1", None)
    assert parse_update_name(f"{'a' * 64}.safetensors") == ("a" * 64, None)  # a device id may look like a hash
    assert store.read_update(0, "dev.1") == payload
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(RunError, match="sha256 does not match"):
        store.read_update(0, "dev.1")


def test_a_state_from_before_hashes_still_refuses_nan_checkpoints(tmp_path):
    store = RunStore(tmp_path)
    rel = store.write_tensors("checkpoints/x.safetensors", {"a": np.array([1.0, np.nan], np.float32)})
    (tmp_path / "state.json").write_text(RunState(run_id="r", bundle_id="b", adapters=rel).model_dump_json())
    with pytest.raises(RunError, match="x.safetensors: tensor 'a' holds NaN or Inf"):
        RunStore(tmp_path).begin("r", "b", resume=True)


@pytest.mark.parametrize("edit, must_say", [
    (lambda s: s["files"].update({"../../etc/passwd": "0" * 64}), "not a path inside the run folder"),
    (lambda s: s["files"].pop(s["adapters"]), "without its sha256"),
    (lambda s: s["files"].update({"checkpoints/gone.safetensors": "0" * 64}), "gone.safetensors: missing"),
    (lambda s: s.update(bundle_id="other"), "belongs to bundle other"),
    (lambda s: s.update(next_round="x"), "not a valid run state"),
])
def test_an_edited_state_is_refused_with_one_line(tmp_path, edit, must_say):
    committed(tmp_path)
    path = tmp_path / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    with pytest.raises(RunError, match=must_say) as err:
        RunStore(tmp_path).begin("r", "b", resume=True)
    assert "\n" not in str(err.value)


def test_a_new_run_never_starts_over_an_earlier_one(tmp_path):
    committed(tmp_path)
    with pytest.raises(RunError, match="already holds a run"):
        RunStore(tmp_path).begin("r", "b", resume=False)
    store = RunStore(tmp_path)
    moved = store.set_aside()
    assert moved is not None and (moved / "state.json").is_file() and not store.run_files()
    assert store.begin("r", "b", resume=False) is None
    assert store.set_aside() is None  # nothing left to move


def test_a_newer_update_of_a_device_replaces_the_older_one_and_resume_counts_the_newer(tmp_path):
    """One accepted update per device and round: a second save (the first was found unusable and
    the device asked again) removes the first, so a restart cannot count the wrong one; were the
    removal lost in a crash, resume counts the newer of the two."""
    import os

    store = RunStore(tmp_path)
    a = store.save_update(2, "dev", encode_tensors(ADAPTERS))
    neighbour = store.save_update(2, "dev.1", encode_tensors(ADAPTERS))  # "dev.*" must not touch it
    b = store.save_update(2, "dev", encode_tensors({"a": np.full((2, 3), 2.0, np.float32)}))
    assert not a.exists() and b.exists() and neighbour.exists()
    assert store.read_update(2, "dev") == b.read_bytes()
    assert RunStore(tmp_path).stored_updates(2) == {"dev": b, "dev.1": neighbour}
    # the older file back, as if its removal had not reached the disk before a crash
    a.write_bytes(encode_tensors(ADAPTERS))
    os.utime(a, ns=(b.stat().st_mtime_ns - 10**9,) * 2)
    again = RunStore(tmp_path)
    assert again.stored_updates(2)["dev"] == b
    assert again.read_update(2, "dev") == b.read_bytes()
    state = RunState(run_id="r", bundle_id="b", adapters=again.write_tensors("checkpoints/x.safetensors", ADAPTERS), next_round=3)
    again.commit(state)
    index = json.loads((tmp_path / "updates" / "round_0002" / "index.json").read_text())
    assert sorted(index) == sorted([b.name, neighbour.name])  # the older file is not what the round counted
