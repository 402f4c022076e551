"""Conv weight gradients as direct channels-last kernels (passes/conv_weight_grads.py): equal
to torch's conv2d_weight, scheduled and unscheduled, and only the matched convs rewritten.

Tolerance: float32 sums of N x gh x gw (<= 2 x 8 x 8 = 128; 784 for the 28x28 case) products of unit normals, in a
different order than torch's: 1e-4 absolute on values of size ~10 is a few ulps per product.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import tvm
from splitc.passes.conv_weight_grads import (
    legalize_conv_weight_grads,
    weight_grad_cout_te,
    weight_grad_te,
)
from splitc.passes.schedules import default_cpu_schedule, host_llvm_target
from tvm import relax, te

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "helpers"))
from relax_grads import call_names as _ops
from relax_grads import conv_grad_module as _grad_module

CASES = [  # x shape, w shape, stride, pad
    ((2, 16, 8, 8), (24, 16, 1, 1), 2, 0),  # 2x2 window sliced to 1x1
    ((2, 16, 8, 8), (8, 16, 3, 3), 2, 1),  # 4x4 window sliced to 3x3
    ((2, 16, 9, 9), (8, 16, 3, 3), 2, 1),  # odd input: the window is the filter, no slice
    ((2, 16, 6, 6), (32, 16, 1, 1), 1, 0),  # 1x1 stride 1
    ((2, 16, 7, 7), (8, 16, 3, 3), 1, 1),  # 3x3 stride 1 on a 7x7 map
    ((2, 3, 16, 16), (16, 3, 7, 7), 2, 3),  # RGB stem: 8x8 window sliced to 7x7, co lanes
    ((1, 16, 28, 28), (8, 16, 1, 1), 1, 0),  # 1x1 stride 1, 16 -> 8 at 28x28: dwt[i, o]
]


@pytest.mark.parametrize(
    "xs,ws,pointwise",
    [
        ((1, 16, 28, 28), (8, 16, 1, 1), True),
        ((1, 16, 14, 14), (8, 16, 1, 1), False),  # below 28x28
        ((1, 8, 28, 28), (16, 8, 1, 1), False),  # more output than input channels
    ],
)
def test_pointwise_form_only_for_reducing_convs_on_large_maps(xs, ws, pointwise):
    new = legalize_conv_weight_grads(_grad_module(xs, ws, 1, 0)[0])
    (kernel,) = [f for gv, f in new.functions.items() if "weight_grad" in gv.name_hint]
    assert ('sblock("dwt")' in kernel.script()) == pointwise


@pytest.mark.parametrize("xs,ws,stride,pad", CASES)
@pytest.mark.parametrize("scheduled", [False, True])
def test_weight_grad_equals_torch(xs, ws, stride, pad, scheduled):
    mod, gs = _grad_module(xs, ws, stride, pad)
    new = legalize_conv_weight_grads(mod)
    ops = _ops(new)
    assert "conv2d_weight_grad" in ops and "relax.strided_slice" not in ops
    assert ops.count("relax.nn.conv2d") == 1  # the forward conv alone
    target = host_llvm_target() if scheduled else tvm.target.Target("llvm")
    fallbacks = []
    if scheduled:
        new = default_cpu_schedule(new, target, fallbacks.append)
    vm = relax.VirtualMachine(tvm.compile(new, target), tvm.cpu())
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype("float32") for s in (xs, ws, gs))
    out = vm["main_adjoint"](*(tvm.runtime.tensor(a) for a in (x, w, g)))
    want = torch.nn.grad.conv2d_weight(
        torch.from_numpy(x), ws, torch.from_numpy(g), stride=stride, padding=pad
    )
    np.testing.assert_allclose(out[1][0].numpy(), want.numpy(), rtol=1e-5, atol=1e-4)
    assert [f.kernel for f in fallbacks if "conv2d_weight_grad" in f.kernel] == []


@pytest.mark.parametrize(
    "xs,ws,stride,pad",
    [
        ((2, 3, 8, 8), (12, 3, 1, 1), 2, 0),  # 3 in, 12 out channels: neither fills lanes
        ((2, 3, 8, 8), (16, 3, 3, 3), 1, 1),  # 3 input channels, stride 1: TVM's rfactor
        ((2, 16, 8, 8), (8, 16, 3, 3), 1, 1),  # 3x3 stride 1, 8 wide: TVM's kernel
    ],
)
def test_unmatched_weight_grads_keep_tvm_legalization(xs, ws, stride, pad):
    mod, _ = _grad_module(xs, ws, stride, pad)
    tvm.ir.assert_structural_equal(legalize_conv_weight_grads(mod), mod)


def test_slice_with_a_second_user_keeps_the_window():
    """The full-window conv is read by the slice and by another op: it cannot be dropped, so
    it is rewritten whole (window 2x2) and the slice stays."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 16, 8, 8), "float32"))
    g = relax.Var("g", relax.TensorType((2, 8, 4, 4), "float32"))
    with bb.function("main", [x, g]):
        with bb.dataflow():
            full = bb.emit(
                relax.op.nn.conv2d(
                    x, g, padding=0, dilation=2,
                    data_layout="CNHW", kernel_layout="IOHW", out_layout="CNHW",
                )
            )  # fmt: skip
            cut = bb.emit(relax.op.strided_slice(full, [0, 1, 2, 3], [0, 0, 0, 0], [8, 16, 1, 1]))
            both = bb.emit_output(relax.Tuple([cut, relax.op.sum(full)]))
        bb.emit_func_output(both)
    new = legalize_conv_weight_grads(bb.get())
    ops = _ops(new, "main")
    assert ops.count("conv2d_weight_grad") == 1 and ops.count("relax.strided_slice") == 1
    rng = np.random.default_rng(1)
    xn = rng.standard_normal((2, 16, 8, 8), "float32")
    gn = rng.standard_normal((2, 8, 4, 4), "float32")
    vm = relax.VirtualMachine(tvm.compile(new, "llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(xn), tvm.runtime.tensor(gn))
    # window position (a, b) of the 2x2: sum_{n,h,w} g[n,o,h,w] x[n,i,a+2h,b+2w]
    want = np.einsum("nohw,nihw->oi", gn, xn[:, :, ::2, ::2])
    np.testing.assert_allclose(out[0].numpy()[:, :, 0, 0], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("band_bytes,bands", [(1 << 19, 1), (512, 2), (1, 4)])
def test_weight_grad_cout_te_bands_add_up(band_bytes, bands):
    """Partial sums over bands of dy rows add up to torch's gradient: a row of dy is 4 pixels
    x 16 lanes x 4 bytes = 256 bytes, so 512 bytes give 2-row bands and 1 byte 1-row bands."""
    xs, ws, gs = (2, 3, 7, 7), (16, 3, 3, 3), (2, 16, 4, 4)  # 7x7, pad 1, stride 2 -> 4x4
    x, dy = te.placeholder(xs, name="x"), te.placeholder(gs, name="dy")
    dw = weight_grad_cout_te(x, dy, 2, [1, 1, 1, 1], 3, 3, "float32", band_bytes=band_bytes)
    (part,) = [t for t in dw.op.input_tensors if t.op.name == "dw_part"]
    assert int(part.shape[1]) == bands
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([x, dy, dw])}), "llvm")
    rng = np.random.default_rng(2)
    xn, gn = (rng.standard_normal(s).astype("float32") for s in (xs, gs))
    out = tvm.runtime.tensor(np.zeros(ws, "float32"))
    lib["main"](tvm.runtime.tensor(xn), tvm.runtime.tensor(gn), out)
    want = torch.nn.grad.conv2d_weight(
        torch.from_numpy(xn), ws, torch.from_numpy(gn), stride=2, padding=1
    )
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)


def test_weight_grad_te_one_by_one_reads_only_the_strided_pixels():
    """A 1x1 filter without padding copies x[:, :, ::s, ::s] channels-last, a quarter of x at
    s=2 (4 x 4 x 16 of 8 x 8 x 16 per image), not the padded image."""
    x = te.placeholder((2, 16, 8, 8), name="x")
    dy = te.placeholder((2, 24, 4, 4), name="dy")
    dw = weight_grad_te(x, dy, 2, [0, 0, 0, 0], 1, 1, "float32")
    (pick,) = [t for t in dw.op.input_tensors[0].op.input_tensors if t.op.name == "x_pick"]
    assert tuple(int(d) for d in pick.shape) == (2, 4, 4, 16)
