"""Where one device round's time goes: the steps of `edge.trainer.train_round`, timed one by one.

    python benchmarks/round_pieces.py BUNDLE SHARD THREADS

Wall and CPU seconds (`time.process_time`) of: bundle verification (sha256 of the device files;
a device's agent does it twice a round: at install check and in train_round), reading the data,
the tokenizer, opening the session (parameters + training and eval graphs), tokenizing the
training and held-out batches, one held-out evaluation (a round does two: before and after),
and the training steps (batch 16, one epoch, 10% held out). Prints the two dicts.
"""

import sys
import time
from pathlib import Path

from fedpft.edge.session import open_session
from fedpft.shared.manifest import verify_bundle
from fedpft.shared.records import BatchMaker, batches, epoch_order, read_local_data

bundle, shard, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
T, C = {}, {}


def t(name, f):
    t0, c0 = time.perf_counter(), time.process_time()
    r = f()
    T[name], C[name] = time.perf_counter() - t0, time.process_time() - c0
    return r


m = t("verify", lambda: verify_bundle(bundle, device_only=True))
data = t("read", lambda: read_local_data(shard, m))
train, held = data.split(0.1, 0)
maker = t("maker", lambda: BatchMaker(bundle, m))
s = t("open_session", lambda: open_session(bundle, None, threads, m))
s.set_learning_rate(3e-3)
bl = t("tokenize_train", lambda: list(batches(train, maker, 16, data.skips, epoch_order(len(train), 0, 0))))
hb = t("tokenize_held", lambda: list(batches(held, maker, 32, data.skips)))
t("eval_held", lambda: s.accuracy(hb))


def steps():
    for b in bl:
        s.train_step(b)


t("train", steps)
print("wall", {k: round(v, 3) for k, v in T.items()}, "steps", len(bl), "n_train", len(train), "held", len(held))
print("cpu", {k: round(v, 3) for k, v in C.items()}, "cpu per step", round(C["train"] / len(bl), 3))
