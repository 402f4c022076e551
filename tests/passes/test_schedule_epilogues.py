"""Epilogue fusion (passes/schedule_rules.py ``_fuse_epilogue``): an injective block that
reads a register tile's output as a reshape of its own runs inside the tile's write-back
(no whole-tensor intermediate), and computes exactly what the unfused kernel computes; a
pixel GEMM's epilogue (a different element order) stays a pass of its own.

Tolerance: the fused and unfused kernels add the same products in the same order (the tile
is unchanged, only where the epilogue runs moves): 1e-6 relative on values of ~10.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from splitc.passes.schedules import default_cpu_schedule, host_llvm_target
from tvm import relax


def _conv_bn(n, ci, co, h, k):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, ci, h, h), "float32"))
    w = relax.Var("w", relax.TensorType((co, ci, k, k), "float32"))
    m = relax.Var("m", relax.TensorType((1, co, 1, 1), "float32"))
    with bb.function("main", [x, w, m]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=k // 2))
            y = bb.emit(relax.op.divide(relax.op.subtract(y, m), m))
            gv = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(gv)
    return bb.get()


@pytest.mark.parametrize(
    "shape,k,fused",
    [
        ((2, 8, 16, 8), 1, True),  # 1x1, 8x8 = 64 pixels: per-image GEMM [n, o, h*w]
        ((2, 8, 16, 8), 3, True),  # 3x3: the conv's own [n, o, h, w]
        ((2, 8, 16, 7), 1, False),  # 1x1, 7x7: pixel GEMM [o, n*h*w], another order
    ],
)
def test_epilogue_runs_in_the_tile_write_back_and_matches(shape, k, fused):
    n, ci, co, h = shape
    mod = _conv_bn(n, ci, co, h, k)
    target = host_llvm_target()
    fallbacks = []
    sched = default_cpu_schedule(mod, target, fallbacks.append)
    assert fallbacks == []
    [func] = [f for f in sched.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    blocks = re.findall(r'T\.sblock\("([^"]+)"\)', func.script())
    # fused: no block after the tile's write-back (``*_local``): it applies the epilogue
    assert blocks[-1].endswith("_local") == fused
    rng = np.random.default_rng(0)
    args = [
        rng.standard_normal((n, ci, h, h)).astype("float32"),
        rng.standard_normal((co, ci, k, k)).astype("float32"),
        rng.uniform(1, 2, (1, co, 1, 1)).astype("float32"),
    ]
    x, w, m = args
    xp = np.pad(x, [(0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)])
    conv = np.zeros((n, co, h, h), "float64")
    for a in range(k):
        for b in range(k):
            conv += np.einsum("oi,nihw->nohw", w[:, :, a, b], xp[:, :, a : a + h, b : b + h])
    want = np.maximum((conv - m) / m, 0)
    vm = relax.VirtualMachine(tvm.compile(sched, target), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
