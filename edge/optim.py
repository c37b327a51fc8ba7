"""The device optimizer: onnxruntime-training's AdamWOptimizer (adam_mode 1) in numpy.

adam_mode 1 is Hugging Face's AdamW, which ORT's artifacts ask for:
    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
    step = lr * sqrt(1 - b2^t) / (1 - b1^t)   (lr when bias correction is off)
    p <- p - step * m / (sqrt(v) + eps)
    p <- p - lr * weight_decay * p            (decoupled, after the update, with the plain lr)
In float32 like the kernel; parameters are updated in place, so OrtValues that share their
memory (CPU) see the new values without being bound again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedpft.shared.manifest import OptimizerSpec


class AdamW:
    def __init__(self, spec: OptimizerSpec, params: Mapping[str, np.ndarray], lr: float = 1e-3):
        self.spec, self.params, self.lr, self.t = spec, dict(params), float(lr), 0
        self.m = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: np.zeros_like(p) for n, p in self.params.items()}

    def step_size(self) -> float:
        s = self.spec
        if not s.bias_correction:
            return self.lr
        return self.lr * math.sqrt(1.0 - s.beta2**self.t) / (1.0 - s.beta1**self.t)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        s = self.spec
        self.t += 1
        size = np.float32(self.step_size())
        b1, b2 = np.float32(s.beta1), np.float32(s.beta2)
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= size * m / (np.sqrt(v) + np.float32(s.eps))
            if s.weight_decay > 0:
                p -= np.float32(self.lr * s.weight_decay) * p
