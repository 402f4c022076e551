"""1x1 convs as one GEMM over all pixels (passes/pointwise_convs.py): equal to torch, scheduled
and unscheduled, with pixel counts that are not whole vectors (2 x 7 x 7 = 98 -> 112), and
only the matched convs rewritten.

Stride-1 convs with whole vectors of pixels per image (4 x 8 = 32) skip the pixel copy: a
per-image GEMM on a zero-copy view of the input.

Tolerance: float32 sums of at most 16 products of unit normals: 1e-5 relative, 1e-5 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from splitc.passes.pointwise_convs import legalize_pointwise_convs
from splitc.passes.schedules import default_cpu_schedule, host_llvm_target
from tvm import relax


def _module(xs, ws, stride=1, pad=0, transpose=False):
    """main(x, w) = relu(conv2d(x, w)) (or of conv2d_transpose, weight IOHW)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(xs, "float32"))
    w = relax.Var("w", relax.TensorType(ws, "float32"))
    op = relax.op.nn.conv2d_transpose if transpose else relax.op.nn.conv2d
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(op(x, w, strides=stride, padding=pad))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get()


def _called(mod) -> list[str]:
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            is_tir = e.op.name == "relax.call_tir"
            names.append(e.args[0].name_hint if is_tir else e.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return names


@pytest.mark.parametrize(
    "xs,ws,stride,transpose,kernel",
    [
        ((2, 16, 7, 7), (24, 16, 1, 1), 1, False, "conv2d_pixels"),  # 98 pixels, padded to 112
        ((2, 16, 8, 8), (8, 16, 1, 1), 2, False, "conv2d_pixels"),  # every other pixel
        ((2, 16, 5, 5), (16, 24, 1, 1), 1, True, "conv2d_transpose_pixels"),  # a data gradient
        # 4 x 8 = 32 pixels per image, whole vectors: per-image GEMM on a (n, c, h*w) view
        ((2, 16, 4, 8), (24, 16, 1, 1), 1, False, "conv2d_pixels"),
        ((2, 24, 8, 8), (24, 16, 1, 1), 1, True, "conv2d_transpose_pixels"),
    ],
)
@pytest.mark.parametrize("scheduled", [False, True])
def test_pointwise_conv_equals_torch(xs, ws, stride, transpose, kernel, scheduled):
    new = legalize_pointwise_convs(_module(xs, ws, stride, transpose=transpose))
    # the view's optional dtype and offset arguments are null values
    view = (
        ["relax.null_value", "relax.memory.view"] if stride == 1 and xs[2] * xs[3] % 16 == 0 else []
    )
    assert _called(new) == [*view, kernel, "relax.nn.relu"]
    target = host_llvm_target() if scheduled else tvm.target.Target("llvm")
    fallbacks = []
    if scheduled:
        new = default_cpu_schedule(new, target, fallbacks.append)
    assert fallbacks == []
    vm = relax.VirtualMachine(tvm.compile(new, target), tvm.cpu())
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(xs, "float32"), rng.standard_normal(ws, "float32")
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    f = torch.nn.functional.conv_transpose2d if transpose else torch.nn.functional.conv2d
    want = torch.relu(f(torch.from_numpy(x), torch.from_numpy(w), stride=stride)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "xs,ws,stride,pad,transpose",
    [
        ((2, 16, 7, 7), (8, 16, 3, 3), 1, 1, False),  # 3x3
        ((2, 16, 7, 7), (8, 16, 1, 1), 1, 1, False),  # padded 1x1
        ((2, 16, 4, 4), (16, 8, 1, 1), 2, 0, True),  # strided transpose: conv_transpose_phases
    ],
)
def test_other_convs_are_left_alone(xs, ws, stride, pad, transpose):
    mod = _module(xs, ws, stride, pad, transpose)
    tvm.ir.assert_structural_equal(legalize_pointwise_convs(mod), mod)


def test_default_schedule_rewrites_data_gradients_before_the_phase_legalization():
    """conv_transpose_phases legalizes every conv2d_transpose (stride 1 through TOPI), so the
    1x1 GEMM rewrite must run before it in default_cpu_schedule."""
    mod = default_cpu_schedule(_module((2, 16, 5, 5), (16, 24, 1, 1), transpose=True), "llvm")
    names = [gv.name_hint for gv in mod.functions]
    assert any("conv2d_transpose_pixels" in n for n in names), names


def test_conv_kernels_off_keeps_tvm_conv():
    """default_cpu_schedule(conv_kernels=False) (the benchmark's --ablate) leaves 1x1 convs to
    TVM's own legalization."""
    mod = _module((2, 16, 7, 7), (24, 16, 1, 1))
    on = [gv.name_hint for gv in default_cpu_schedule(mod, "llvm").functions]
    off = [gv.name_hint for gv in default_cpu_schedule(mod, "llvm", conv_kernels=False).functions]
    assert any("conv2d_pixels" in n for n in on), on
    assert not any("pixels" in n for n in off) and any("conv2d" in n for n in off), off
