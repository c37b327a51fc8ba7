"""The transfer form of a bundle: an uncompressed tar of the device's files plus the manifest.

Uncompressed because ONNX weights barely compress and devices should not pay CPU for it.
Unpacking refuses links, absolute paths and anything not named in the manifest.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import uuid
from pathlib import Path

from .manifest import DEVICE_ROLES, MANIFEST_NAME, BundleError, BundleManifest, verify_bundle


def device_paths(manifest: BundleManifest) -> list[str]:
    return [e.path for role, e in manifest.files.items() if role in DEVICE_ROLES]


def pack_bundle(folder: Path) -> bytes:
    folder = Path(folder)
    manifest = BundleManifest.load(folder)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in [MANIFEST_NAME, *device_paths(manifest)]:
            info = tar.gettarinfo(str(folder / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0  # same bundle -> same bytes -> same sha256
            with open(folder / rel, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def unpack_bundle(data: bytes, dest: Path) -> BundleManifest:
    """Extract into `dest` atomically and verify every device file; BundleError if anything is off."""
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            names = {m.name for m in members}
            if MANIFEST_NAME not in names:
                raise BundleError("bundle archive has no manifest.json")
            for m in members:
                if not m.isfile() or os.path.isabs(m.name) or ".." in Path(m.name).parts or "/" in m.name:
                    raise BundleError(f"bundle archive member {m.name!r} is not a plain top-level file")
            tar.extractall(tmp, filter="data")
        manifest = verify_bundle(tmp, device_only=True)
        extra = {m for m in names if m != MANIFEST_NAME} - set(device_paths(manifest))
        if extra:
            raise BundleError(f"bundle archive holds files the manifest does not name: {sorted(extra)[:3]}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return manifest
    except tarfile.TarError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"bundle archive is corrupt: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
