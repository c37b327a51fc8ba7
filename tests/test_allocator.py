"""The cloud's buffer-reuse setting: applied once per process, and honest about where it cannot be."""

from __future__ import annotations

import sys

import pytest

from fedpft.shared import allocator


def test_reuse_large_buffers_takes_effect_on_glibc_once_per_process(monkeypatch):
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    monkeypatch.setattr(allocator, "_done", None)
    assert allocator.reuse_large_buffers() is True

    def no_libc(*a, **k):
        raise OSError("would load libc again")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert allocator.reuse_large_buffers() is True  # set once: later Federations do not call mallopt again


def test_reuse_large_buffers_claims_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.reuse_large_buffers() is False


BURSTS = """
import resource, sys, threading
if sys.argv[1] == "reuse":
    from fedpft.shared.allocator import reuse_large_buffers
    assert reuse_large_buffers()
SIZE = 1300 << 10  # about an update, as received and decoded

def burst():  # a backlog of 20 updates held at once, then released (what a round's checks do)
    bufs = [b"\\1" * SIZE for _ in range(20)]
    del bufs

def work():
    burst()
    t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        burst()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - t0)

t = threading.Thread(target=work)  # a check worker's thread: glibc gives it its own arena
t.start()
t.join()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_backlogs_of_large_buffers_reuse_memory_instead_of_faulting_it_in_again():
    """glibc's default gives a released backlog back to the kernel, so the next one faults (and the
    kernel zeroes) every page again; with the setting the heap keeps it."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    pages = 5 * 20 * ((1300 << 10) // 4096)

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", BURSTS, mode], capture_output=True, text=True, timeout=120, check=True)
        return int(out.stdout.strip())

    assert faults("default") > pages // 2
    assert faults("reuse") < pages // 20
