"""A 2-layer MLP split in two, in numpy, implementing runtime/halves.py's protocols.

device: x (B, 1, 8, 8) -> flatten -> h = relu(x @ W1 + b1)        (cut: h, grad=True)
server: logits = h @ W2 + b2 -> mean softmax cross-entropy(labels) -> dh, SGD update

All arithmetic is float32 and deterministic, so a split run over the network and the unsplit
composition ``MLP`` (the same two halves called back to back in one process) must agree
bit for bit with codec none.
"""

from __future__ import annotations

import socket

import numpy as np
from splitc.runtime.halves import CutSpec

PLAN_ID = "0123456789abcdef"


class NumpyDevice:
    def __init__(
        self,
        batch: int = 16,
        in_dim: int = 64,
        hidden: int = 32,
        seed: int = 0,
        lr: float = 0.1,
        plan_id: str = PLAN_ID,
    ):
        rng = np.random.default_rng(seed)
        self.plan_id, self.lr, self.batch = plan_id, np.float32(lr), batch
        self.cut = (CutSpec("h", (batch, hidden), "float32", True),)
        self.W1 = (rng.standard_normal((in_dim, hidden)) / np.sqrt(in_dim)).astype(np.float32)
        self.b1 = np.zeros(hidden, np.float32)
        self.steps = np.zeros((), np.int64)
        self._res = None

    def forward(self, inputs):
        x = inputs[0].reshape(inputs[0].shape[0], -1).astype(np.float32)
        z = x @ self.W1 + self.b1
        self._res = (x, z)
        return [np.maximum(z, 0)]

    def backward(self, grads):
        x, z = self._res
        g = (grads[0] * (z > 0)).astype(np.float32)
        self.W1 = self.W1 - self.lr * (x.T @ g)
        self.b1 = self.b1 - self.lr * g.sum(0)
        self.steps = self.steps + 1
        self._res = None

    def infer(self, inputs):
        x = inputs[0].reshape(inputs[0].shape[0], -1).astype(np.float32)
        return [np.maximum(x @ self.W1 + self.b1, 0)]

    def state_dict(self):
        return {"W1": self.W1.copy(), "b1": self.b1.copy(), "steps": self.steps.copy()}

    def load_state_dict(self, state):
        self.W1 = np.array(state["W1"], np.float32)
        self.b1 = np.array(state["b1"], np.float32)
        self.steps = np.array(state["steps"], np.int64)


class NumpyServer:
    def __init__(
        self,
        batch: int = 16,
        hidden: int = 32,
        classes: int = 10,
        seed: int = 1,
        lr: float = 0.1,
        plan_id: str = PLAN_ID,
    ):
        rng = np.random.default_rng(seed)
        self.plan_id, self.lr = plan_id, np.float32(lr)
        self.cut = (CutSpec("h", (batch, hidden), "float32", True),)
        self.W2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
        self.b2 = np.zeros(classes, np.float32)

    def _logits(self, h):
        return h @ self.W2 + self.b2

    def step(self, cut, labels):
        h = np.asarray(cut[0], np.float32)
        logits = self._logits(h)
        m = logits - logits.max(1, keepdims=True)
        p = np.exp(m)
        p /= p.sum(1, keepdims=True)
        n = h.shape[0]
        loss = float(-np.mean(np.log(p[np.arange(n), labels] + np.float32(1e-12))))
        d = p.copy()
        d[np.arange(n), labels] -= 1
        d /= np.float32(n)
        dh = d @ self.W2.T
        self.W2 = self.W2 - self.lr * (h.T @ d)
        self.b2 = self.b2 - self.lr * d.sum(0)
        return loss, [dh.astype(np.float32)]

    def infer(self, cut):
        return [self._logits(np.asarray(cut[0], np.float32))]

    def state_dict(self):
        return {"W2": self.W2.copy(), "b2": self.b2.copy()}

    def load_state_dict(self, state):
        self.W2 = np.array(state["W2"], np.float32)
        self.b2 = np.array(state["b2"], np.float32)


def train_unsplit(device: NumpyDevice, server: NumpyServer, loader, steps: int) -> list[float]:
    """The reference: both halves back to back in one process, no network."""
    losses = []
    for i in range(steps):
        x, y = loader.batch(i)
        loss, grads = server.step(device.forward([x]), y)
        device.backward(grads)
        losses.append(loss)
    return losses


def params_equal(a: dict, b: dict) -> bool:
    """Bit-for-bit equality of two state dicts."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
