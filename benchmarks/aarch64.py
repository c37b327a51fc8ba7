"""Real aarch64: `fedpft[edge]` on a Debian arm64 root under qemu-user, checked against x86_64.

    python benchmarks/aarch64.py --write BENCHMARKS.md     (as root; slow: minutes under emulation)

What it does, in order:
1. installs `debootstrap` and `qemu-user-static` with apt if missing, mounts binfmt_misc if needed
   and registers qemu-aarch64 from /usr/lib/binfmt.d when it is not registered yet;
2. builds (or reuses from --cache) a Debian arm64 root with python3, python3-venv and python3-pip
   (trixie first, for Python 3.13; bookworm, Python 3.11, if trixie cannot be built — the table says so);
3. copies the checkout into the root, makes a venv there and `pip install`s `.[edge]` from it with
   aarch64 wheels from PyPI (a venv made before for the same pyproject.toml keeps its dependencies
   and gets only fedpft reinstalled; --reinstall starts from an empty one), refuses the result if
   torch, transformers, peft or onnxruntime-training got in, and measures the venv's site-packages;
4. on x86_64, with the cloud venv, makes a MiniLM bundle (`fedpft-cloud prepare --distill-steps 0
   --dropout 0`) and a small local data file from the shipped debian-sections train split, and runs
   `fedpft-edge train` offline with a fixed seed; then runs the same command inside the arm64 root;
5. compares the two updates tensor by tensor (adapters and activation statistics) and fails unless
   every one is within --atol; with --write, records the result as the `aarch64` section.

Everything inside the root runs with QEMU_CPU=neoverse-n1 and a synthetic ARM /proc/cpuinfo bound
over the host's: qemu-user 7.2 shows the x86 one, and onnxruntime's import segfaults on it.

Why the two updates are not bit-identical: x86_64 runs the cloud venv's onnxruntime-training build,
aarch64 the newest plain onnxruntime; their MLAS kernels (AVX2/AVX-512 vs NEON) block the GEMMs
differently, so float32 sums are taken in another order, and exp/tanh (softmax, GELU) are different
polynomial approximations. Each op then agrees to about 1e-6 relative; after a few AdamW steps of
size ~lr the adapters agree to a small fraction of lr. The default --atol 1e-5 is a tenth of the
default learning rate 1e-4: a real divergence (a wrong gradient, a different op, another data order)
moves an element by about lr per step and would fail it.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, write_section  # noqa: E402

SECTION = "aarch64"
SUITES = ("trixie", "bookworm")
ROOT_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
# paths as the arm64 root sees them
SRC_IN, VENV_IN, WORK_IN = "/opt/fedpft-src", "/opt/edge-venv", "/opt/fedpft-work"
HOST_CA_IN = "/etc/fedpft-host-ca.crt"
MUST_NOT_INSTALL = ("torch", "transformers", "peft", "optimum", "onnxruntime-training")
READY = ".fedpft-root-ready"
STATS_PREFIX = "__stats__."

COMPARE = r"""
import json, sys
import numpy as np
from safetensors import safe_open
def load(p):
    with safe_open(p, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
(a, ma), (b, mb) = load(sys.argv[1]), load(sys.argv[2])
rows = []
for k in sorted(set(a) | set(b)):
    if k not in a or k not in b or a[k].shape != b[k].shape:
        rows.append({"key": k, "missing": True}); continue
    x, y = a[k].astype(np.float64), b[k].astype(np.float64)
    d = float(np.abs(x - y).max()) if x.size else 0.0
    rows.append({"key": k, "shape": list(x.shape), "max_abs": d, "scale": float(np.abs(x).max()) if x.size else 0.0})
print(json.dumps({"rows": rows, "meta_a": ma, "meta_b": mb}))
"""


def log(msg: str) -> None:
    print(f"[aarch64 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, check: bool = True, capture: bool = False, env=None, timeout=None) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    out = subprocess.run([str(c) for c in cmd], check=False, text=True, env=env, timeout=timeout,
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if check and out.returncode != 0:
        tail = ("\n" + out.stdout[-3000:]) if capture and out.stdout else ""
        raise RuntimeError(f"exit {out.returncode}: {' '.join(str(c) for c in cmd)}{tail}")
    return out


# --- 1. host tools and binfmt ---------------------------------------------------------------

def ensure_host_tools() -> None:
    missing = [pkg for pkg, path in (("debootstrap", "/usr/sbin/debootstrap"), ("qemu-user-static", "/usr/bin/qemu-aarch64-static"))
               if not Path(path).exists()]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *missing], env=env)


def ensure_binfmt() -> str:
    """qemu-aarch64 registered with the kernel; returns its flags. Containers have no
    systemd-binfmt, so the entry is written to the register file by hand."""
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        line = next(s for s in QEMU_CONF.read_text().splitlines() if s.startswith(":qemu-aarch64:"))
        (BINFMT / "register").write_text(line)
    text = entry.read_text()
    if "enabled" not in text.splitlines()[0]:
        entry.write_text("1")
        text = entry.read_text()
    flags = next((s.split(":", 1)[1].strip() for s in text.splitlines() if s.startswith("flags:")), "")
    log(f"binfmt qemu-aarch64 enabled, flags {flags}")
    return flags


def host_mirror() -> str:
    """The Debian mirror apt uses here (the only Debian host this machine reaches)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            words = line.split()
            urls = words[1:] if words[:1] == ["URIs:"] else [w for w in words if w.startswith("http")] if words[:1] == ["deb"] else []
            for url in urls:
                if url.rstrip("/").endswith("/debian"):
                    return url
    return "http://deb.debian.org/debian"


# --- 2. the arm64 root ---------------------------------------------------------------------

def build_root(root: Path, suite: str, mirror: str, rebuild: bool, qemu_flags: str) -> None:
    if (root / READY).is_file() and not rebuild:
        log(f"reusing {root}")
        return
    if root.exists():
        umount_all(root)
        # deleting a root with /dev still bound into it would delete the host's /dev
        busy = [m.split()[1] for m in Path("/proc/mounts").read_text().splitlines() if m.split()[1].startswith(f"{root}/")]
        if busy:
            raise RuntimeError(f"still mounted under {root}: {', '.join(busy)}; unmount them first")
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # minbase: the root only has to run Python; arch-test lets debootstrap run the second stage
    # in the same call through binfmt
    run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={ROOT_PACKAGES}", suite, root, mirror])
    if "F" not in qemu_flags:
        # without the fix-binary flag the kernel looks the interpreter up inside the chroot
        shutil.copy2("/usr/bin/qemu-aarch64-static", root / "usr/bin/qemu-aarch64-static")
    (root / READY).write_text(f"{suite} {mirror}\n")


# qemu-user 7.2 (bookworm's) passes the host's x86 /proc/cpuinfo through; onnxruntime's cpuinfo
# library finds no ARM core in it and the import segfaults (exit -11, seen here with onnxruntime
# 1.32.0). A synthetic one describing the emulated CPU is bound over it inside the root only.
QEMU_CPU = "neoverse-n1"
CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
    "asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n"
    "CPU revision\t: 1\n\n" for i in range(os.cpu_count() or 1))
MOUNTS = (("/proc", "proc"), ("cpuinfo", "proc/cpuinfo"), ("/sys", "sys"), ("/dev", "dev"), ("/dev/pts", "dev/pts"), ("/dev/shm", "dev/shm"))


def umount_all(root: Path) -> None:
    for _, rel in reversed(MOUNTS):
        target = root / rel
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False)


@contextlib.contextmanager
def mounted(root: Path):
    try:
        fake = root.parent / f"{root.name}.cpuinfo"
        fake.write_text(CPUINFO)
        for src, rel in MOUNTS:
            src, target = (fake if src == "cpuinfo" else Path(src)), root / rel
            if src.exists() and not os.path.ismount(target):
                if src.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                run(["mount", "--bind", src, target])
        # pip resolves and verifies PyPI from inside: same DNS and CA bundle as the host (the
        # host's bundle may hold a proxy CA that Debian's ca-certificates lacks)
        shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
        shutil.copy2(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt", root / HOST_CA_IN.lstrip("/"))
        yield
    finally:
        umount_all(root)


def chroot_env() -> dict[str, str]:
    env = {"PATH": f"{VENV_IN}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_CERT": HOST_CA_IN, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180", "PYTHONDONTWRITEBYTECODE": "1",
           "QEMU_CPU": QEMU_CPU}
    return env


def in_root(root: Path, cmd: list, **kw) -> subprocess.CompletedProcess:
    return run(["chroot", root, *cmd], env=chroot_env(), **kw)


def copy_checkout(root: Path) -> str:
    """The working tree as git sees it (tracked and untracked, not ignored): the same code the
    x86_64 side runs from its editable install, without venvs or caches. Returns its digest."""
    dst = root / SRC_IN.lstrip("/")
    if dst.exists():
        shutil.rmtree(dst)
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           stdout=subprocess.PIPE).stdout.decode().split("\0")
    digest = hashlib.sha256()
    for rel in sorted(filter(None, files)):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
            digest.update(rel.encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()


def install_edge(root: Path, reinstall: bool) -> dict:
    src_sha = copy_checkout(root)
    deps_sha = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    venv = root / VENV_IN.lstrip("/")
    record = venv / "fedpft-install.json"
    pip = [f"{VENV_IN}/bin/pip", "install", "--index-url", "https://pypi.org/simple"]
    # pip under emulation took 19 minutes here on a cold cache and a busy machine (2.5 with the pip
    # cache warm), mostly byte-compiling the dependencies, so a venv made for the same
    # pyproject.toml keeps its dependencies and only fedpft itself is reinstalled from
    # this checkout; the full install time shown is the one measured when the venv was made
    old = json.loads(record.read_text()) if record.is_file() else {}
    if old.get("deps_sha") == deps_sha and not reinstall:
        log(f"reusing the dependencies in {venv}; reinstalling fedpft from this checkout")
        in_root(root, [*pip, "--no-deps", "--force-reinstall", SRC_IN])
    else:
        if venv.exists():
            shutil.rmtree(venv)
        in_root(root, ["python3", "-m", "venv", VENV_IN])
        # the index is PyPI only (no host find-links: those wheels are x86_64); the pip cache stays
        # inside the root so a rerun does not download again
        t0 = time.monotonic()
        in_root(root, [*pip, f"{SRC_IN}[edge]"])
        old = {"deps_sha": deps_sha, "install_s": time.monotonic() - t0, "installed": time.strftime("%Y-%m-%d %H:%M")}
    old["src_sha"] = src_sha
    record.write_text(json.dumps(old))
    install_s, installed = old["install_s"], old["installed"]
    listed = json.loads(in_root(root, [f"{VENV_IN}/bin/pip", "list", "--format=json"], capture=True).stdout)
    versions = {p["name"].lower(): p["version"] for p in listed}
    bad = [n for n in MUST_NOT_INSTALL if n in versions]
    if bad:
        raise RuntimeError(f"[edge] pulled {', '.join(bad)} on aarch64")
    probe = ("import importlib.util, json, platform, sys, onnxruntime as ort; "
             "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
             "'ort': ort.__version__, 'providers': ort.get_available_providers(), "
             "'absent': [m for m in ('torch', 'transformers', 'peft', 'onnxruntime.training') if importlib.util.find_spec(m) is None], "
             "'site': [p for p in sys.path if p.endswith('site-packages')][0]}))")
    info = json.loads(in_root(root, [f"{VENV_IN}/bin/python", "-c", probe], capture=True).stdout.strip().splitlines()[-1])
    missing = [m for m in ("torch", "transformers", "peft", "onnxruntime.training") if m not in info["absent"]]
    if missing:
        raise RuntimeError(f"importable in the edge venv: {', '.join(missing)}")
    site = root / info["site"].lstrip("/")
    sizes: dict[str, int] = {}
    for f in site.rglob("*"):
        if f.is_file() and not f.is_symlink():
            top = f.relative_to(site).parts[0]
            sizes[top] = sizes.get(top, 0) + f.lstat().st_size
    size = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
    info.update(versions=versions, site_mb=size / 1e6, largest=[(k, v / 1e6) for k, v in largest], install_s=install_s, installed=installed,
                uname=in_root(root, ["uname", "-m"], capture=True).stdout.strip(),
                debian=(root / "etc/debian_version").read_text().strip())
    return info


# --- 4. bundle, data, the two trainings -----------------------------------------------------

def make_inputs(work: Path, cloud: Path, max_length: int, lines: int) -> None:
    data_dir = ROOT / "fedpft/data/debian-sections"
    bundle = work / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    # dropout 0: the two ORT builds draw dropout masks from different generators
    run([cloud / "bin/fedpft-cloud", "prepare", "--model", "minilm", "--out", bundle, "--labels", data_dir / "labels.json",
         "--distill-steps", "0", "--dropout", "0", "--max-length", str(max_length), "--seed", "0", "-q"])
    with gzip.open(data_dir / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(next(f)) for _ in range(lines)]
    (work / "data.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))


def train_args(work: str, out: str, a: argparse.Namespace) -> list[str]:
    return ["train", "--bundle", f"{work}/bundle", "--data", f"{work}/data.jsonl", "--out", f"{work}/{out}",
            "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--seed", "0", "--threads", "1", "-q"]


def compare(cloud: Path, x86: Path, arm: Path) -> dict:
    out = run([cloud / "bin/python", "-c", COMPARE, x86, arm], capture=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- 5. the verdict and the table -------------------------------------------------------

def judge(cmp: dict, a: argparse.Namespace) -> dict:
    """Adapters and head within --atol; activation statistics (GELU-off counts per neuron, and the
    positions they were counted over) compared as APoZ fractions within --stats-atol: a count is an
    integer, and a GELU input within float noise of 0 may land on either side of it."""
    rows = cmp["rows"]
    missing = [r["key"] for r in rows if r.get("missing")]
    adapters = [r for r in rows if not r.get("missing") and not r["key"].startswith(STATS_PREFIX)]
    stats = [r for r in rows if not r.get("missing") and r["key"].startswith(STATS_PREFIX)]
    worst = max(adapters, key=lambda r: r["max_abs"]) if adapters else None
    # relative to the largest element of the same tensor: a per-element ratio would divide by
    # values that are ~0 (LoRA B starts at zero)
    worst_rel = max((r["max_abs"] / r["scale"] for r in adapters if r["scale"]), default=0.0)
    positions = {r["key"].rsplit(".", 1)[0]: r for r in stats if r["key"].endswith(".positions")}
    pos_diff = max((r["max_abs"] for r in positions.values()), default=0.0)
    count_diff, apoz_diff = 0.0, 0.0
    for r in stats:
        if r["key"].endswith(".off_counts"):
            n = positions.get(r["key"].rsplit(".", 1)[0], {}).get("scale") or 1.0
            count_diff, apoz_diff = max(count_diff, r["max_abs"]), max(apoz_diff, r["max_abs"] / n)
    for r in sorted(adapters, key=lambda r: -r["max_abs"])[:6]:
        log(f"  {r['key']}: max|diff| {r['max_abs']:.2e}, max|x86| {r['scale']:.2e}")
    faults = []
    if missing:
        faults.append(f"{len(missing)} tensors missing or of another shape on one side (first: {missing[0]})")
    if worst and worst["max_abs"] > a.atol:
        faults.append(f"adapter max |diff| {worst['max_abs']:.2e} > {a.atol:g} at {worst['key']}")
    if pos_diff:
        faults.append(f"statistics counted over different numbers of positions (diff {pos_diff:g})")
    if apoz_diff > a.stats_atol:
        faults.append(f"APoZ differs by {apoz_diff:.2e} > {a.stats_atol:g}")
    summary = "; ".join(faults) or (f"{len(adapters)} adapter/head tensors within {a.atol:g} (max |diff| {worst['max_abs']:.2e}), "
                                      f"{len(stats)} statistics tensors within APoZ {a.stats_atol:g}")
    return dict(ok=not faults, summary=summary, missing=missing, adapters=adapters, stats=stats, worst=worst, worst_rel=worst_rel,
                count_diff=count_diff, apoz_diff=apoz_diff)


def section(a, suite, note, info, arm_s, x86_s, x86_python, x86_ort, x86_versions, cmp, v) -> str:
    versions = info["versions"]
    worst = v["worst"] or {"key": "-", "max_abs": float("nan"), "scale": float("nan")}
    moved = max((r["scale"] for r in v["adapters"] if ".lora_B." in r["key"]), default=float("nan"))
    lines = [
        "## aarch64: `fedpft[edge]` on a Debian arm64 root (qemu-user), update checked against x86_64",
        "",
        f"Command: `{command_line()}`  ",
        f"Root: `debootstrap --arch=arm64 --variant=minbase --include={ROOT_PACKAGES} {suite}` from the host's Debian mirror, run "
        f"through binfmt_misc + qemu-user-static; `pip install \".[edge]\"` from this checkout into a venv there, wheels from PyPI."
        f"{(' ' + note) if note else ''}  ",
        f"Inputs: a MiniLM bundle made on x86_64 (`fedpft-cloud prepare --model minilm --labels fedpft/data/debian-sections/labels.json "
        f"--distill-steps 0 --dropout 0 --max-length {a.max_length} --seed 0`) and the first {a.lines} lines of "
        f"fedpft/data/debian-sections/train.jsonl.gz; both sides ran `fedpft-edge train --bundle B --data D --out U --max-steps {a.steps} "
        f"--batch-size {a.batch_size} --seed 0 --threads 1` offline.",
        "",
        "| | x86_64 (host, cloud venv) | aarch64 (Debian arm64 root) |",
        "|---|---|---|",
        f"| architecture (`uname -m`) | {platform.machine()} | {info['uname']} |",
        f"| Debian | - | {suite} ({info['debian']}) |",
        f"| Python | {x86_python} | {info['python']} |",
        f"| onnxruntime | onnxruntime-training {x86_ort} | onnxruntime {info['ort']} (plain inference build; providers {', '.join(info['providers'])}) |",
        f"| numpy / tokenizers | {x86_versions} | {versions.get('numpy', '?')} / {versions.get('tokenizers', '?')} |",
        f"| `[edge]` install size (venv site-packages) | - | {info['site_mb']:.1f} MB; torch, transformers, peft, onnxruntime-training not installed |",
        f"| `fedpft-edge train` wall time | {x86_s:.1f} s (native) | {arm_s:.1f} s (**emulated** by qemu-user on this x86_64 host: not an ARM CPU's speed) |",
        "| largest site-packages entries | - | " + ", ".join(f"{k} {mb:.0f}" for k, mb in info["largest"]) + " (MB) |",
        f"| update metadata mean_loss | {cmp['meta_a'].get('mean_loss')} | {cmp['meta_b'].get('mean_loss')} |",
        "",
        f"**{'PASS' if v['ok'] else 'FAIL'}**: {v['summary']}.  ",
        f"Adapters and head: **max |diff| = {worst['max_abs']:.2e}** at `{worst['key']}` (its max |value| {worst['scale']:.2e}; "
        f"LoRA B, zero in the bundle, reached max |value| {moved:.2e} after {a.steps} steps); relative to each tensor's max |value|, "
        f"at most {v['worst_rel']:.1e}. Tolerance {a.atol:g} absolute: the two "
        "ONNX Runtime builds sum float32 GEMMs in another order (AVX2/AVX-512 vs NEON MLAS kernels) and approximate exp/tanh "
        "differently, so they agree to ~1e-6 relative per op, while a real divergence (a wrong gradient, another op or data order) "
        "moves an element by about the learning rate (1e-4) per step.  ",
        f"Activation statistics: GELU-off counts differ by at most {v['count_diff']:g} (APoZ {v['apoz_diff']:.1e}; tolerance "
        f"{a.stats_atol:g}: a count flips when a GELU input lies within float noise of 0).  ",
        f"`pip install \".[edge]\"` into the empty venv took {info['install_s']:.0f} s under emulation (venv made {info['installed']}; "
        "a later run keeps its dependencies while pyproject.toml is unchanged and reinstalls only fedpft from the checkout).  ",
        f"Emulation: qemu-user-static {a.qemu_version}, `QEMU_CPU={QEMU_CPU}`; inside the root a synthetic ARM /proc/cpuinfo "
        "(Neoverse-N1) is bound over the host's x86 one, without which `import onnxruntime` segfaults under qemu-user 7.2.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Needs root (debootstrap, mount, chroot) and network access to a Debian mirror and PyPI.")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache/fedpft-aarch64",
                   help="folder that keeps the arm64 roots (one per Debian release) between runs (default: %(default)s)")
    p.add_argument("--suite", choices=("auto", *SUITES), default="auto",
                   help="Debian release of the root; auto tries trixie (Python 3.13) and falls back to bookworm "
                        "(Python 3.11), saying so in the table (default: %(default)s)")
    p.add_argument("--mirror", default=None, help="Debian mirror for debootstrap (default: the first one in /etc/apt/sources.list*)")
    p.add_argument("--rebuild", action="store_true", help="delete and rebuild the cached root instead of reusing it")
    p.add_argument("--reinstall", action="store_true",
                   help="make the root's edge venv afresh; by default a venv made for the same pyproject.toml keeps its dependencies and only fedpft is reinstalled from the checkout")
    p.add_argument("--cloud-venv", type=Path, default=ROOT / ".venv",
                   help="x86_64 venv with fedpft[cloud] (fedpft-cloud prepare, the x86_64 fedpft-edge train, the comparison) (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=32, help="token limit of the MiniLM bundle (default: %(default)s)")
    p.add_argument("--lines", type=int, default=32, help="lines of debian-sections train data in the local data file (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="training steps on each side (--max-steps) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per training step (default: %(default)s)")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="largest allowed |x86_64 - aarch64| of any update element (default: %(default)s; see the module docstring)")
    p.add_argument("--stats-atol", type=float, default=1e-2,
                   help="largest allowed difference of any neuron's APoZ (share of GELU outputs <= 0) in the update's "
                        "activation statistics (default: %(default)s)")
    p.add_argument("--write", type=Path, default=None, help="write the `aarch64` section of this BENCHMARKS.md (default: only print it)")
    a = p.parse_args(argv)

    if os.geteuid() != 0:
        p.error("needs root: debootstrap, mount and chroot")
    if platform.machine() != "x86_64":
        p.error("runs on an x86_64 host: it compares x86_64 against emulated aarch64")
    cloud = a.cloud_venv.resolve()
    if not (cloud / "bin/fedpft-cloud").is_file():
        p.error(f"no fedpft-cloud in {cloud}: give --cloud-venv")
    ensure_host_tools()
    flags = ensure_binfmt()
    a.qemu_version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "qemu-user-static"], stdout=subprocess.PIPE, text=True).stdout.strip()
    mirror = a.mirror or host_mirror()

    suites = SUITES if a.suite == "auto" else (a.suite,)
    notes, info, root, suite = [], None, None, None
    for suite in suites:
        root = a.cache.expanduser().resolve() / f"{suite}-arm64"
        try:
            build_root(root, suite, mirror, a.rebuild, flags)
            with mounted(root):
                info = install_edge(root, a.reinstall)
            break
        except Exception as e:  # noqa: BLE001 - any failure of one release is reported, then the next is tried
            first = str(e).strip().splitlines()[0]
            log(f"{suite} failed: {e}")
            notes.append(f"{suite} failed ({first[:200]}), so this ran on the next release.")
    if info is None:
        log("no Debian release could be built: " + " | ".join(notes))
        return 1
    log(f"edge venv on {info['uname']}: Python {info['python']}, onnxruntime {info['ort']}, site-packages {info['site_mb']:.1f} MB")

    work = root / WORK_IN.lstrip("/")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    make_inputs(work, cloud, a.max_length, a.lines)

    t0 = time.monotonic()
    run([cloud / "bin/fedpft-edge", *train_args(str(work), "u_x86.safetensors", a)])
    x86_s = time.monotonic() - t0
    with mounted(root):
        t0 = time.monotonic()
        in_root(root, [f"{VENV_IN}/bin/fedpft-edge", *train_args(WORK_IN, "u_arm.safetensors", a)])
        arm_s = time.monotonic() - t0

    cmp = compare(cloud, work / "u_x86.safetensors", work / "u_arm.safetensors")
    probe = "import platform, numpy, tokenizers, onnxruntime as o; print(platform.python_version(), o.__version__, numpy.__version__, tokenizers.__version__)"
    x86_python, x86_ort, x86_np, x86_tok = run([cloud / "bin/python", "-c", probe], capture=True).stdout.split()[-4:]
    verdict = judge(cmp, a)
    text = section(a, suite, " ".join(notes), info, arm_s, x86_s, x86_python, x86_ort, f"{x86_np} / {x86_tok}", cmp, verdict)
    print(text)
    log(("PASS: " if verdict["ok"] else "FAIL: ") + verdict["summary"])
    if a.write:
        # a failure is recorded too (the table says FAIL and why): the point is what was run
        write_section(SECTION, text, a.write)
        log(f"wrote section {SECTION} of {a.write}")
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
