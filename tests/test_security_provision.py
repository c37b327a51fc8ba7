"""`fedpft-cloud provision` / `keygen`: Mosquitto-compatible password hashes, least-privilege ACL
text, idempotent re-provisioning, secrets readable by their owner only."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from fedpft.cloud.cli import app
from fedpft.cloud.provision import (
    ACL, CLOUD_USER, PASSWD, ProvisionError, acl_text, check_password, password_hash, provision, upsert_password,
)
from fedpft.shared import topics

pytestmark = pytest.mark.security
runner = CliRunner()


def test_password_hash_is_mosquittos_format_both_ways(tmp_path):
    h = password_hash("s3cret", salt=b"0123456789ab", iterations=101)
    assert h.startswith("$7$101$") and check_password("s3cret", h) and not check_password("s3creT", h)
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.skip("needs mosquitto_passwd to cross-check")
    f = tmp_path / "pw"
    f.write_text("")
    subprocess.run([exe, "-b", str(f), "alice", "s3cret"], check=True)
    assert check_password("s3cret", f.read_text().strip().split(":", 1)[1])


def test_acl_confines_each_device_to_its_own_topics():
    text = acl_text({"r1": ["dev1", "dev2"], "r2": ["dev1"]})
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n")[1:]}
    dev1 = blocks["user dev1"]
    assert f"topic write {topics.device_topic('r1', 'dev1', topics.UPDATE)}" in dev1
    assert f"topic read {topics.round_topic('r2')}" in dev1  # one block per user, lines for each of its runs
    assert not [l for l in dev1 if "dev2" in l or l.startswith("topic readwrite")]
    assert f"user {CLOUD_USER}\ntopic readwrite fedpft/r1/#\ntopic readwrite fedpft/r2/#\n" in text


def test_upsert_replaces_only_that_users_entry():
    text = upsert_password("a:$7$x\nb:$7$y\n", "a", "$7$z")
    assert text.splitlines() == ["b:$7$y", "a:$7$z"]


def test_reprovisioning_replaces_the_password_and_keeps_the_rest(tmp_path):
    first = provision(tmp_path, "dev1", "r1")
    pw1 = first.password_file.read_text().strip()
    cloud_pw = first.cloud_password_file.read_text().strip()
    provision(tmp_path, "dev2", "r1")
    again = provision(tmp_path, "dev1", "r1")
    pw2 = again.password_file.read_text().strip()
    entries = dict(l.split(":", 1) for l in (tmp_path / PASSWD).read_text().splitlines())
    assert sorted(entries) == sorted([CLOUD_USER, "dev1", "dev2"])  # one entry each
    assert pw1 != pw2 and check_password(pw2, entries["dev1"]) and not check_password(pw1, entries["dev1"])
    assert check_password(cloud_pw, entries[CLOUD_USER])  # the cloud's user is kept
    assert (tmp_path / ACL).read_text().count("user dev1\n") == 1
    for secret in (again.password_file, again.cloud_password_file, tmp_path / PASSWD):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    with pytest.raises(ProvisionError, match="reserved"):
        provision(tmp_path, CLOUD_USER, "r1")
    with pytest.raises(ProvisionError, match="invalid device id"):
        provision(tmp_path, "dev/1", "r1")


def test_cli_keygen_and_provision(tmp_path):
    res = runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys")])
    assert res.exit_code == 0 and "signing.pub" in res.output
    res = runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys")])
    assert res.exit_code == 2 and "already holds a signing key" in res.output
    res = runner.invoke(app, ["provision", "--device", "dev9", "--run", "r", "--out", str(tmp_path / "broker")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "broker" / "devices" / "dev9.password").is_file()
    res = runner.invoke(app, ["provision", "--device", "bad id", "--out", str(tmp_path / "broker")])
    assert res.exit_code == 2 and "invalid device id" in res.output


def test_fleet_grants_follow_the_registry_and_old_registries_still_load(tmp_path):
    text = acl_text({"r1": ["dev1", "dev2"]}, fleets={"lab": ["dev1"]})
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n")[1:]}
    assert f"topic read {topics.rollout_topic('lab')}" in blocks["user dev1"]
    assert f"topic write {topics.fleet_device_topic('lab', 'dev1', topics.STATUS)}" in blocks["user dev1"]
    assert not [l for l in blocks["user dev2"] if "/fleet/" in l]
    assert f"topic readwrite {topics.fleet_pattern('lab')}" in text.split("\n\n")[0]
    # a registry written before fleets existed (run -> devices only) is read as it was
    (tmp_path / "registry.json").write_text('{"r1": ["old"]}')
    provision(tmp_path, "dev9", "r1", fleet="lab")
    provision(tmp_path, "dev9", "r1", fleet="lab")  # idempotent
    acl = (tmp_path / ACL).read_text()
    assert "user old\n" in acl and acl.count(f"topic read {topics.rollout_topic('lab')}") == 1
    with pytest.raises(ProvisionError, match="reserved"):
        provision(tmp_path, "dev9", "fleet")  # the registry's fleet key can never be a run
    with pytest.raises(ProvisionError, match="invalid fleet name"):
        provision(tmp_path, "dev9", "r1", fleet="a/b")
