"""Dense per-family sampling: random one-block training models, one kernel family each.

The learned model prices a kernel measured in calibration by look-up (97 % of such held-out
kernels within +-10 %, session 5) and predicts the rest (48 %). Its misses (session 5's
dataset, 271 predicted held-out kernels): the big conv, transposed-conv and matmul kernels
(>= 1 ms, 94 % of the predicted time) were over-predicted by +7 % in the median and up to
+39 %, because the nearest training kernel with the same fused ops was 0.4-0.5 decades away
in FLOPs and bytes (a bias-free 3x3 conv's forward had only the op sweep's five; its
training neighbours were depthwise weight gradients at 20 GFLOP/s). nn-Meter gets 83-99 %
by sampling each kernel family densely over its configuration space; this module does that
for the families training steps run, with the same build as real models (the blocks go
through ``workloads.model_module``: the same passes, fusion and schedules, so the fused
forward, data-gradient, weight-gradient and update kernels look exactly like a model's):

- ``conv``: conv (1x1 / 3x3, stride 1 / 2, with or without bias) [+ batch norm] + ReLU,
  optionally a second 3x3 conv and a residual add (with a 1x1 projection when shapes change);
  a third of the conv and pool blocks flatten into their linear head (VGG's and wide_cnn's
  head: a 10 x 16,384 weight, its transposes and gradients), the others mean-pool;
- ``dwconv``: MobileNetV2 inverted residual (expand 1x1, depthwise 3x3, project 1x1), its
  three convs with or without bias (MobileNetV2's own have none: batch norm follows);
- ``dense``: linear layers on (batch, features) or (batch, seq, features), bias or not,
  ReLU / GELU / Tanh / none, residual adds where the widths allow;
- ``attention``: pre-LN attention + MLP block (layer norm, softmax, batched matmuls);
- ``pool``: conv + max or average pooling.

Every block but attention starts with a *stem* (a 1x1 conv or a linear layer of the block's
input width, then ReLU or ReLU6): without it the block's first layer reads the model input,
which has no gradient, so the sweep never ran that layer's data gradient (session 6's sweep:
no ``conv2d_transpose+phases+less+where``, the strided data gradient with the ReLU mask, and
one ``conv2d_transpose+add+less+where``, the residual's, against 2 and 3 of them in cnn_small
and small_resnet, 13-33 % of their steps, all predicted).

Sizes are drawn from generic grids (powers of two and the usual channel counts, not the test
models' shapes) and capped so no single kernel passes ~1 GFLOP (~10 ms here): a block costs
seconds of timing, not minutes. Blocks are training data only, timed without their whole
step (``model_module(..., step=False)``): the kernels are what the regressors learn from.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from splitc import InputError

__all__ = ["FAMILY_KINDS", "PREFIX", "family_block", "family_models"]

FAMILY_KINDS = ("conv", "dense", "dwconv", "attention", "pool")
# file-name prefix of the exported blocks (cached by name), new whenever a kind's draws change
# so that a cached file never stands in for another block: "famB" from the stems of session 7
# (session 6's "fam" blocks had none), "famC" from session 11's draws of the dwconv blocks'
# biases (earlier ones all had them) and of the conv and pool blocks' flatten heads
PREFIX = "famC"

_BATCH = [1, 2, 4, 8, 16, 32]
_CH = [3, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
_HW = [4, 7, 8, 14, 16, 28, 32, 56]
# multiples of 32 only: session 13 timed 160 dense blocks with 100, 300, 784 and 1,000 in the
# grid too, and held-out kernels fell from 485 to 478 of 539 (tools/BENCHMARK_LOG.md)
_WIDTH = [32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048]
# one kernel's forward FLOPs at most: a 1 GFLOP conv runs ~10 ms at ~100 GFLOP/s here, and its
# gradients as long; bigger ones add timing time, not new behaviour (GFLOP/s flat above ~1 ms)
_MAX_FLOPS = 1.0e9
# a flatten head's inputs at most (wide_cnn's 64 x 16 x 16 = 16,384): a 10 x 32,768 weight
_MAX_FLAT = 32768


def _out_side(hw: int, s: int) -> int:
    """Height (= width) of a conv's output: padding k // 2, stride ``s``."""
    return (hw + s - 1) // s


def _conv_flops(n, cin, cout, hw, k, s, groups=1) -> float:
    o = _out_side(hw, s)
    return 2.0 * n * cout * o * o * (cin // groups) * k * k


def _pool_pad(cfg: dict) -> int:
    return cfg["pk"] // 2 if cfg["pk"] == 3 else 0


def _head_side(cfg: dict) -> int:
    """Height (= width) of a conv or pool block's output, what its head reads."""
    o = _out_side(cfg["hw"], cfg["s"])
    if cfg["pool"]:
        o = (o + 2 * _pool_pad(cfg) - cfg["pk"]) // cfg["ps"] + 1
    return o


def _draw(kind: str, rng) -> dict:
    """One configuration of ``kind`` (plain data), redrawn until every kernel fits."""
    c = lambda xs: xs[int(rng.integers(len(xs)))]
    for _ in range(1000):
        if kind in ("conv", "pool"):
            n, cin, cout, hw = c(_BATCH), c(_CH), c(_CH[1:]), c(_HW[1:])
            cfg = {"n": n, "cin": cin, "cout": cout, "hw": hw, "k": c([1, 3, 3]),
                   "s": c([1, 1, 2]), "bias": bool(rng.integers(2)), "bn": bool(rng.integers(2)),
                   "second": bool(rng.integers(2)) and kind == "conv",
                   "pool": c(["max", "avg"]) if kind == "pool" else None,
                   "pk": c([2, 3]), "ps": c([1, 2]), "stem": c(["relu", "relu6"]),
                   "head": c(["mean", "mean", "flatten"])}
            o = _out_side(hw, cfg["s"])
            if cout * _head_side(cfg) ** 2 > _MAX_FLAT:
                cfg["head"] = "mean"
            flops = max(_conv_flops(n, cin, cout, hw, cfg["k"], cfg["s"]),
                        _conv_flops(n, cout, cout, o, 3, 1) if cfg["second"] else 0.0,
                        _conv_flops(n, cin, cin, hw, 1, 1))  # the stem
        elif kind == "dwconv":
            n, ch, hw, e = c(_BATCH), c(_CH[1:8]), c(_HW[1:]), c([2, 4, 6])
            cfg = {"n": n, "ch": ch, "hw": hw, "e": e, "s": c([1, 1, 2]),
                   "bn": bool(rng.integers(2)), "stem": c(["relu", "relu6"]),
                   "bias": bool(rng.integers(2))}
            flops = _conv_flops(n, ch, ch * e, hw, 1, 1)
        elif kind == "dense":
            seq = c([None, None, 8, 16, 32, 64, 128])
            cfg = {"b": c(_BATCH + [64, 128]), "seq": seq,
                   "dims": [c(_WIDTH) for _ in range(int(rng.integers(2, 5)))],
                   "bias": bool(rng.integers(2)), "act": c(["relu", "gelu", "tanh", "none"]),
                   "stem": c(["relu", "relu6"])}
            rows = cfg["b"] * (seq or 1)
            dims = [cfg["dims"][0], *cfg["dims"]]  # the stem first
            flops = max(2.0 * rows * a * b for a, b in itertools.pairwise(dims))
        elif kind == "attention":
            d, h = c([32, 64, 96, 128, 192, 256, 384, 512]), c([1, 2, 4, 8])
            if d % h:
                continue
            cfg = {"d": d, "h": h, "b": c(_BATCH), "s": c([8, 16, 32, 64, 128]),
                   "r": c([2, 4])}
            flops = 2.0 * cfg["b"] * cfg["s"] * d * d * cfg["r"]
        else:
            raise InputError(f"Calibrate: unknown family block {kind!r}; use one of "
                             f"{', '.join(FAMILY_KINDS)}")
        if flops <= _MAX_FLOPS:
            return cfg
    raise InputError(f"Calibrate: no {kind} block under {_MAX_FLOPS:.0e} FLOPs in 1000 draws")


def family_block(kind: str, rng):
    """(torch module, input shape, has batch norm, config) of one random block of ``kind``,
    with a pooled linear head so it trains like a classifier."""
    import torch
    from torch import nn

    cfg = _draw(kind, rng)
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "none": nn.Identity,
            "relu6": nn.ReLU6}

    def stem(layer):  # the block's input gets a gradient: its first layer's data gradient runs
        return nn.Sequential(layer, acts[cfg["stem"]]())

    if kind in ("conv", "pool"):
        norm = (lambda ch: nn.BatchNorm2d(ch)) if cfg["bn"] else (lambda ch: nn.Identity())
        k, s, cin, cout = cfg["k"], cfg["s"], cfg["cin"], cfg["cout"]

        class Conv(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = stem(nn.Conv2d(cin, cin, 1, bias=False))
                self.c1 = nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=cfg["bias"]),
                                        norm(cout), nn.ReLU())
                self.c2 = (nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=cfg["bias"]),
                                         norm(cout)) if cfg["second"] else None)
                self.sc = (None if not cfg["second"] or (cin == cout and s == 1) else
                           nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), norm(cout)))
                pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}.get(cfg["pool"])
                self.pool = pool(cfg["pk"], cfg["ps"], _pool_pad(cfg)) if pool else None
                flat = cfg["head"] == "flatten"
                self.head = nn.Linear(cout * _head_side(cfg) ** 2 if flat else cout, 10)

            def forward(self, x):
                x = self.stem(x)
                y = self.c1(x)
                if self.c2 is not None:
                    y = torch.relu(self.c2(y) + (x if self.sc is None else self.sc(x)))
                if self.pool is not None:
                    y = self.pool(y)
                if cfg["head"] == "flatten":  # VGG's and wide_cnn's head, not a mean pool
                    return self.head(y.flatten(1))
                return self.head(y.mean((2, 3)))

        return Conv(), (cfg["n"], cin, cfg["hw"], cfg["hw"]), cfg["bn"], cfg
    if kind == "dwconv":
        norm = (lambda ch: nn.BatchNorm2d(ch)) if cfg["bn"] else (lambda ch: nn.Identity())
        ch, m, s = cfg["ch"], cfg["ch"] * cfg["e"], cfg["s"]

        class Inverted(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = stem(nn.Conv2d(ch, ch, 1, bias=False))
                b = cfg["bias"]
                self.f = nn.Sequential(nn.Conv2d(ch, m, 1, bias=b), norm(m), nn.ReLU6(),
                                       nn.Conv2d(m, m, 3, s, 1, groups=m, bias=b), norm(m),
                                       nn.ReLU6(), nn.Conv2d(m, ch, 1, bias=b), norm(ch))
                self.head = nn.Linear(ch, 10)

            def forward(self, x):
                x = self.stem(x)
                y = self.f(x)
                return self.head((y + x if s == 1 else y).mean((2, 3)))

        return Inverted(), (cfg["n"], ch, cfg["hw"], cfg["hw"]), cfg["bn"], cfg
    if kind == "dense":
        dims = cfg["dims"]

        class Dense(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = stem(nn.Linear(dims[0], dims[0], bias=cfg["bias"]))
                self.fc = nn.ModuleList(nn.Linear(a, b, bias=cfg["bias"])
                                        for a, b in itertools.pairwise(dims))
                self.act = acts[cfg["act"]]()
                self.head = nn.Linear(dims[-1], 10)

            def forward(self, x):
                x = self.stem(x)
                for fc in self.fc:
                    y = self.act(fc(x))
                    x = x + y if y.shape == x.shape else y
                return self.head(x if x.dim() == 2 else x.mean(1))

        shape = (cfg["b"], dims[0]) if cfg["seq"] is None else (cfg["b"], cfg["seq"], dims[0])
        return Dense(), shape, False, cfg
    d, h, r = cfg["d"], cfg["h"], cfg["r"]

    class Attention(nn.Module):  # pre-LN encoder block + mean pool + head
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, r * d), nn.Linear(r * d, d)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2)
                       for t in self.qkv(self.ln1(x)).split(d, dim=-1))
            a = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1) @ v
            x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
            x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
            return self.head(x.mean(1))

    return Attention(), (cfg["b"], cfg["s"], d), False, cfg


def family_models(out: Path, n: int, seed: int = 0, only=()) -> list[Path]:
    """``n`` random blocks (``FAMILY_KINDS`` in turn; sizes drawn with ``seed``) exported to
    ONNX under ``out`` as ``<PREFIX><seed>_<i>_<kind>.onnx`` (cached by name: a resumed
    calibration finds the same files and skips their measured rows); with ``only``, just the
    blocks of those kinds (block ``i`` keeps its kind and draws). Needs torch."""
    from splitc.cost_models.workloads import export_random_models

    return export_random_models(out, n, FAMILY_KINDS, f"{PREFIX}{seed}",
                                lambda i: [seed, i, 2], family_block, "--family-sweep", only)
