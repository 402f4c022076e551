"""Max-pool backward as max + first argmax + phase planes (passes/max_pool_grads.py): equal to
torch's autograd, including windows of tied zeros after a ReLU (the first maximum in
row-major order gets the gradient), scheduled and unscheduled.

Tolerance: a pixel gets at most 4 window gradients (3x3 windows, stride 2), summed in a
different order than torch: 1e-6 absolute on unit-normal values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from splitc.passes.max_pool_grads import (
    is_max_pool_grad,
    legalize_max_pool_grads,
)
from splitc.passes.schedules import default_cpu_schedule, host_llvm_target
from tvm import relax, te


def _module(xs, k, s, p, ceil_mode=False):
    n, c, h, _ = xs
    out = (h + 2 * p - k) // s + 1
    bb = relax.BlockBuilder()
    dy = relax.Var("dy", relax.TensorType((n, c, out, out), "float32"))
    x = relax.Var("x", relax.TensorType(xs, "float32"))
    with bb.function("main", [dy, x]):
        with bb.dataflow():
            g = relax.op.grad.max_pool2d_backward(
                dy, x, [k, k], [s, s], [p, p, p, p], ceil_mode=ceil_mode
            )
            gv = bb.emit_output(bb.emit(g))
        bb.emit_func_output(gv)
    return bb.get(), (n, c, out, out)


@pytest.mark.parametrize(
    "xs,k,s,p",
    [
        ((2, 16, 12, 12), 3, 2, 1),  # ResNet's stem pool
        ((1, 8, 9, 9), 3, 2, 1),  # odd input: the last window is clipped by the padding
        ((1, 8, 8, 8), 2, 2, 0),  # disjoint windows
        ((1, 8, 7, 7), 3, 1, 1),  # stride 1: a pixel is in up to 9 windows
        ((1, 8, 10, 10), 3, 2, 0),  # no padding: the last row and column are in no window
        ((1, 8, 11, 11), 3, 3, 1),  # stride 3: 3x3 phases, each covered by one window
        ((1, 8, 9, 9), 2, 2, 1),  # even pool, padded: rows of phase 0 start at window 1
    ],
)
@pytest.mark.parametrize("scheduled", [False, True])
def test_max_pool_grad_equals_torch_with_ties(xs, k, s, p, scheduled):
    mod, dys = _module(xs, k, s, p)
    new = legalize_max_pool_grads(mod)
    assert [gv.name_hint for gv in new.functions if gv.name_hint != "main"] == ["max_pool2d_grad"]
    target = host_llvm_target() if scheduled else tvm.target.Target("llvm")
    if scheduled:
        fallbacks = []
        new = default_cpu_schedule(new, target, fallbacks.append)
        assert fallbacks == []  # the per-plane schedule took it (it reports when it falls back)
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(xs), 0).astype("float32")  # half zeros: ties
    x[0, 0, :4, :4] = 1.0  # a block of equal non-zero maxima
    dy = rng.standard_normal(dys).astype("float32")
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(xt, k, s, p).backward(torch.from_numpy(dy))
    vm = relax.VirtualMachine(tvm.compile(new, target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(dy), tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=0, atol=1e-6)


def test_ceil_mode_keeps_tvm_legalization():
    mod, _ = _module((1, 8, 9, 9), 3, 2, 0, ceil_mode=True)
    tvm.ir.assert_structural_equal(legalize_max_pool_grads(mod), mod)


def test_fused_relu_backward_runs_in_the_per_plane_schedule():
    """The step's kernel: max-pool grad with the ReLU backward fused after it (FuseOps), one
    parallel loop over the n*c planes, equal to torch's autograd through relu + max-pool."""
    n, c, h = 2, 3, 10
    bb = relax.BlockBuilder()
    dy = relax.Var("dy", relax.TensorType((n, c, 5, 5), "float32"))
    z = relax.Var("z", relax.TensorType((n, c, h, h), "float32"))
    with bb.function("main", [dy, z]):
        with bb.dataflow():
            x = bb.emit(relax.op.nn.relu(z))
            g = bb.emit(relax.op.grad.max_pool2d_backward(dy, x, [3, 3], [2, 2], [1, 1, 1, 1]))
            m = bb.emit(relax.op.less_equal(z, relax.const(0.0, "float32")))
            gv = bb.emit_output(bb.emit(relax.op.where(m, relax.const(0.0, "float32"), g)))
        bb.emit_func_output(gv)
    target = host_llvm_target()
    fallbacks = []
    new = default_cpu_schedule(bb.get(), target, fallbacks.append)
    assert fallbacks == []
    pool = {
        gv.name_hint: f
        for gv, f in new.functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and "mp_planes" in f.script()
    }
    [(name, func)] = pool.items()
    assert name.endswith("_where")  # the ReLU backward's mask is fused into it
    assert func.script().count("T.parallel") == 1
    rng = np.random.default_rng(1)
    zs = rng.standard_normal((n, c, h, h)).astype("float32")
    dys = rng.standard_normal((n, c, 5, 5)).astype("float32")
    zt = torch.tensor(zs, requires_grad=True)
    y = torch.nn.functional.max_pool2d(torch.relu(zt), 3, 2, 1)
    y.backward(torch.from_numpy(dys))
    vm = relax.VirtualMachine(tvm.compile(new, target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(dys), tvm.runtime.tensor(zs)).numpy()
    np.testing.assert_allclose(got, zt.grad.numpy(), rtol=0, atol=1e-6)


def test_only_max_pool_grad_kernels_are_recognised():
    mod, _ = _module((1, 8, 8, 8), 2, 2, 0)
    legal = relax.transform.LegalizeOps()(legalize_max_pool_grads(mod))
    assert is_max_pool_grad(legal["max_pool2d_grad"])
    a = te.placeholder((4, 4), name="a")
    other = te.create_prim_func([a, te.compute((4, 4), lambda i, j: a[i, j] * 2, name="mp_peak")])
    assert not is_max_pool_grad(other)  # one stage name is not enough


@pytest.mark.parametrize(
    "xs,k,s,p",
    [((2, 16, 12, 12), 3, 2, 1), ((1, 8, 9, 9), 3, 2, 1), ((1, 8, 8, 8), 2, 2, 0),
     ((1, 8, 7, 7), 3, 1, 1), ((1, 8, 11, 11), 3, 3, 1)],
)  # fmt: skip
def test_forward_pool_equals_torch(xs, k, s, p):
    """The forward pool as the phase split + window max, scheduled per plane, relu fused in."""
    bb = relax.BlockBuilder()
    z = relax.Var("z", relax.TensorType(xs, "float32"))
    with bb.function("main", [z]):
        with bb.dataflow():
            x = bb.emit(relax.op.nn.relu(z))
            y = bb.emit(relax.op.nn.max_pool2d(x, [k, k], [s, s], [p, p, p, p]))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    new = legalize_max_pool_grads(bb.get())
    assert "max_pool2d" in [gv.name_hint for gv in new.functions]
    target = host_llvm_target()
    fallbacks = []
    new = default_cpu_schedule(new, target, fallbacks.append)
    assert fallbacks == []
    zs = np.random.default_rng(2).standard_normal(xs).astype("float32")
    want = torch.nn.functional.max_pool2d(torch.relu(torch.from_numpy(zs)), k, s, p).numpy()
    vm = relax.VirtualMachine(tvm.compile(new, target), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(zs)).numpy(), want)
