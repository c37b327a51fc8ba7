"""The cloud's work per accepted update, stage by stage, in one thread: what a 1,000-device round
costs the cloud's CPU without the broker, the fleet and the other threads around it.

    python benchmarks/ingest.py [--updates 1000] [--folder DIR] [--repeats 3]

MiniLM r=8 adapter shapes (scale.py's synthetic bundle), one chunk per update as devices send
them. Stages, as `Federation` runs them on an upload: parse the chunk (`Chunk.from_bytes`, which
hashes it), decode the safetensors blob, check binding, shapes, dtypes and finiteness
(`split_update`), the float64 change and its norm (`RoundFold.change_flat`, `contribution`), the
durable write (`RunStore.save_update` under `--folder`: the run folder's file system matters), and
the fold into the running sum. Prints CPU ms per update per stage (`time.process_time`, best of
`--repeats`); the write's system CPU counts, the wait for the disk does not. For side-by-side
comparisons run it from each tree's own environment: the numbers are this machine's, at its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import synthetic_bundle  # noqa: E402

from fedpft.cloud.fold import RoundFold  # noqa: E402
from fedpft.cloud.state import RunStore  # noqa: E402
from fedpft.shared.chunks import Chunk, split  # noqa: E402
from fedpft.shared.codec import decode_tensors, encode_tensors  # noqa: E402
from fedpft.shared.manifest import BundleManifest  # noqa: E402
from fedpft.shared.update import binding, check_binding, split_update  # noqa: E402

STAGES = ("chunk", "decode", "checks", "change", "write", "fold")


def updates(n: int, reference: dict[str, np.ndarray], run_id: str) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        dev = f"dev{i:05d}"
        tensors = {k: v + (0.001 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in reference.items()}
        blob = encode_tensors(tensors, binding(run_id, 0, dev, "task0"))
        (payload,) = split(f"up-{dev}", blob, chunk_size=len(blob))
        out.append((dev, payload))
    return out


def one_pass(batch, expected, reference, folder: Path, run_id: str) -> dict[str, float]:
    cpu = dict.fromkeys(STAGES, 0.0)
    store = RunStore(folder)
    fold = RoundFold(reference, 500)

    def timed(stage, fn, *args):
        t0 = time.process_time()
        r = fn(*args)
        cpu[stage] += time.process_time() - t0
        return r

    for dev, payload in batch:
        chunk = timed("chunk", Chunk.from_bytes, payload)
        tensors, meta = timed("decode", decode_tensors, chunk.data)
        adapters, stats = timed("checks", lambda: (check_binding(meta, run_id, 0, dev, "task0"), split_update(tensors, expected, {}))[1])
        change = timed("change", fold.change_flat, adapters)
        c = timed("change", fold.contribution, dev, adapters, 100, None, None, None, change)
        timed("write", store.save_update, 0, dev, chunk.data, chunk.blob_sha256)
        timed("fold", fold.add, c, adapters, stats, change)
    return {k: 1000 * v / len(batch) for k, v in cpu.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=1000, help="updates per pass")
    ap.add_argument("--repeats", type=int, default=3, help="passes; the best (least CPU) of each stage is reported")
    ap.add_argument("--folder", type=Path, default=None, help="where the run folder goes (default: the system temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpft-ingest-", dir=args.folder))
    try:
        bundle = synthetic_bundle(work / "bundle")
        m = BundleManifest.load(bundle)
        expected = {t.key: (tuple(t.shape), t.dtype) for t in m.trainable}
        reference = decode_tensors((bundle / m.files["adapters_init"].path).read_bytes())[0]
        batch = updates(args.updates, reference, "ingest")
        best: dict[str, float] = {}
        for r in range(args.repeats):
            run = work / f"run{r}"
            got = one_pass(batch, expected, reference, run, "ingest")
            shutil.rmtree(run)
            best = {k: min(v, best.get(k, v)) for k, v in got.items()}
        best["total"] = sum(best[k] for k in STAGES)
        print(json.dumps({"updates": args.updates, "cpu_ms_per_update": {k: round(v, 3) for k, v in best.items()},
                          "folder": str(args.folder or tempfile.gettempdir()), "load": os.getloadavg()[0]}))
        if args.json:
            args.json.write_text(json.dumps(best, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
