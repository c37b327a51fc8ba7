"""Cloud-side bundle files are found through the manifest's roles; the prepare config is read
back as its pydantic model, and a bad one is one line."""

import json

import pytest

from fedpft.cloud.config import PrepareConfig, load_prepare_config
from fedpft.shared.manifest import ROLE_PREPARE_CONFIG, BundleError, BundleManifest, FileEntry, InputSpec


def _manifest(tmp_path, rel="cfg/prepare.json") -> BundleManifest:
    m = BundleManifest(bundle_id="b" * 32, created="now", fm_id="fm", family="bert", labels=["a", "b"],
                       input=InputSpec(kind="text", names=("input_ids", "attention_mask")), trainable=[],
                       files={ROLE_PREPARE_CONFIG: FileEntry(path=rel, sha256="0" * 64, size=0)})
    m.save(tmp_path)
    return m


def test_prepare_config_is_found_through_its_role_and_read_as_the_model(tmp_path):
    _manifest(tmp_path)
    (tmp_path / "cfg").mkdir()
    written = PrepareConfig(model="minilm", out=tmp_path, lora_rank=4, seed=3).model_dump(mode="json", exclude={"signing_key", "device"})
    (tmp_path / "cfg" / "prepare.json").write_text(json.dumps({**written, "from_a_newer_fedpft": 1}))
    pc = load_prepare_config(tmp_path)
    assert isinstance(pc, PrepareConfig) and (pc.model, pc.lora_rank, pc.seed) == ("minilm", 4, 3)


@pytest.mark.parametrize("content,why", [
    (None, "cannot read the bundle's prepare config"),
    ("[1, 2]", "a JSON object is expected"),
    ('{"model": "m", "out": "o", "lora_rank": 0}', "lora_rank"),
    ("{not json", "cannot read the bundle's prepare config"),
])
def test_a_bad_prepare_config_is_one_bundle_error(tmp_path, content, why):
    _manifest(tmp_path, "prepare_config.json")
    if content is not None:
        (tmp_path / "prepare_config.json").write_text(content)
    with pytest.raises(BundleError, match=why) as info:
        load_prepare_config(tmp_path)
    assert "\n" not in str(info.value)


def test_a_role_outside_the_bundle_or_missing_is_refused(tmp_path):
    m = _manifest(tmp_path, "../elsewhere.json")
    with pytest.raises(BundleError, match="outside the bundle"):
        m.file_path(tmp_path, ROLE_PREPARE_CONFIG)
    with pytest.raises(BundleError, match="names no 'proxy_spec' file"):
        m.file_path(tmp_path, "proxy_spec")
