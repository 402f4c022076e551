"""Strided conv2d_transpose legalized as dense phase convolutions equals TVM's legalization
and torch's conv_transpose2d, with and without the default CPU schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from splitc.passes.conv_transpose_phases import legalize_strided_conv_transposes
from splitc.passes.schedules import default_cpu_schedule
from tvm import relax


def _module(n, ci, co, h, k, s, p, op):
    x = relax.Var("x", relax.TensorType((n, ci, h, h), "float32"))
    w = relax.Var("w", relax.TensorType((ci, co, k, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        y = bb.emit(
            relax.op.nn.conv2d_transpose(x, w, strides=s, padding=p, output_padding=op)
        )
        bb.emit_func_output(y)
    return bb.get()


def _run(mod, args):
    ex = tvm.compile(mod, "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


@pytest.mark.parametrize(
    "n,ci,co,h,k,s,p,op",
    [
        (2, 8, 4, 5, 3, 2, 1, 1),  # the data gradient of a 3x3 stride-2 pad-1 conv
        (2, 8, 16, 4, 1, 2, 0, 1),  # 1x1 stride-2 shortcut, 16 pixels: GEMM on a view of dy
        (2, 8, 16, 5, 1, 2, 0, 1),  # 25 pixels: the padded pixel GEMM
        (1, 3, 5, 3, 4, 2, 1, 0),  # even kernel
        (1, 4, 4, 3, 3, 3, 1, 2),  # stride 3
        (1, 4, 4, 5, 3, 2, 1, 0),  # odd output (2h-1): TVM's own legalization
    ],
)
def test_phases_equal_torch_and_tvm(n, ci, co, h, k, s, p, op):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, ci, h, h)).astype("float32")
    w = rng.standard_normal((ci, co, k, k)).astype("float32")
    ref = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=s, padding=p, output_padding=op
    ).numpy()
    mod = _module(n, ci, co, h, k, s, p, op)
    phased = legalize_strided_conv_transposes(mod)
    names = [gv.name_hint for gv in phased.functions if gv.name_hint != "main"]
    out = (h - 1) * s - 2 * p + k + op  # output rows: phases only when s divides them
    assert names == (["conv2d_transpose_phases"] if out % s == 0 else ["conv2d_transpose"])
    np.testing.assert_allclose(_run(phased, [x, w]), ref, rtol=1e-5, atol=1e-5)
    sched = default_cpu_schedule(mod, tvm.target.Target("llvm"))
    np.testing.assert_allclose(_run(sched, [x, w]), ref, rtol=1e-5, atol=1e-5)
