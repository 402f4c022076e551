"""Max-pool backward as max, first-argmax and a gather over the few windows covering a pixel.

TVM legalizes ``relax.grad.max_pool2d_backward`` with TOPI's ``pool_grad``: a tuple (value,
index) argmax reduction the CPU rules cannot vectorise, then a reduction over every window
position for each input pixel. ResNet-50's stem pool (3x3, stride 2, pad 1; 8x64x112x112
input) took 101 ms of a 3.9 s step that way, 71 ms as below (1 thread, same run; ReLU'd input,
equal to torch within 1e-6). Here, one PrimFunc:

    x_pad[n, c, i, j] = x (or -inf in the padding)
    peak[n, c, p, q]  = max_{a,b} x_pad[n, c, s*p + a, s*q + b]
    first[n, c, p, q] = min_{a,b} (a*kw + b if x_pad[...] == peak else kh*kw)
    dx[n, c, i, j]    = sum over the ceil(kh/s) x ceil(kw/s) windows (p, q) covering (i, j)
                        of dy[n, c, p, q] where first[n, c, p, q] is (i, j)'s offset

The first maximum in row-major window order gets the gradient, as in PyTorch (ties are common
after a ReLU: a window of zeros); plain reductions (max, min) vectorise where a tuple argmax
does not. Matched: NCHW, dilation 1, ``ceil_mode`` False, padding below the pool size (no
window is all padding), static shapes. ``passes/schedules.py`` and ``passes/build.py`` run it
on llvm builds before ``LegalizeOps``.
"""

from __future__ import annotations

import tvm
from splitc.passes.compat import has_static_shape
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["legalize_max_pool_grads", "max_pool_grad_te"]

_MAX_POOL_GRAD = tvm.ir.Op.get("relax.grad.max_pool2d_backward")


def max_pool_grad_te(dy, x, pool: list[int], strides: list[int], pad: list[int]):
    """TE of the stages above; ``pad`` is (top, left, bottom, right)."""
    n, c, h, w = (int(d) for d in x.shape)
    _, _, ph, pw = (int(d) for d in dy.shape)
    (kh, kw), (sh, sw), (pt, pl) = pool, strides, pad[:2]
    lowest = te.min_value(x.dtype)

    def padded(nn, cc, i, j):
        inside = te.all(i >= pt, i < pt + h, j >= pl, j < pl + w)
        return te.if_then_else(inside, x[nn, cc, i - pt, j - pl], lowest)

    x_pad = te.compute((n, c, h + pt + pad[2], w + pl + pad[3]), padded, name="x_pad")
    ra, rb = te.reduce_axis((0, kh), "ra"), te.reduce_axis((0, kw), "rb")
    peak = te.compute(
        (n, c, ph, pw),
        lambda nn, cc, p, q: te.max(x_pad[nn, cc, sh * p + ra, sw * q + rb], axis=[ra, rb]),
        name="peak",
    )
    fa, fb = te.reduce_axis((0, kh), "fa"), te.reduce_axis((0, kw), "fb")
    first = te.compute(
        (n, c, ph, pw),
        lambda nn, cc, p, q: te.min(
            te.if_then_else(
                x_pad[nn, cc, sh * p + fa, sw * q + fb] == peak[nn, cc, p, q],
                fa * kw + fb,
                kh * kw,
            ),
            axis=[fa, fb],
        ),
        name="first",
    )

    def grad(nn, cc, i, j):
        ip, jp = i + pt, j + pl  # padded coordinates
        val = te.const(0, dy.dtype)
        for a in range(-(-kh // sh)):
            p = ip // sh - a  # window row; the offset inside it is ip - sh * p < kh
            for b in range(-(-kw // sw)):
                q = jp // sw - b
                pc, qc = te.max(te.min(p, ph - 1), 0), te.max(te.min(q, pw - 1), 0)
                hit = te.all(
                    p >= 0,
                    p < ph,
                    q >= 0,
                    q < pw,
                    ip - sh * p < kh,
                    jp - sw * q < kw,
                    first[nn, cc, pc, qc] == (ip - sh * p) * kw + (jp - sw * q),
                )
                val = val + te.if_then_else(hit, dy[nn, cc, pc, qc], te.const(0, dy.dtype))
        return val

    return te.compute((n, c, h, w), grad, name="dx")


def _matched(call) -> bool:
    at = call.attrs
    pool = [int(v) for v in at.pool_size]
    pad = [int(v) for v in at.padding]
    return (
        all(has_static_shape(a) for a in call.args)
        and at.layout == "NCHW"
        and not bool(at.ceil_mode)
        and all(int(v) == 1 for v in at.dilation)
        and len(pad) == 4
        and max(pad[0], pad[2]) < pool[0]
        and max(pad[1], pad[3]) < pool[1]
    )


def legalize_max_pool_grads(mod):
    """``mod`` with every matched ``max_pool2d_backward`` as the kernel above."""

    @mutator
    class _M(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(_MAX_POOL_GRAD)):
                return call
            if not _matched(call):
                return call
            at = call.attrs
            pool = [int(v) for v in at.pool_size]
            strides = [int(v) for v in at.strides]
            pad = [int(v) for v in at.padding]
            return self.builder_.call_te(
                lambda dy, x: max_pool_grad_te(dy, x, pool, strides, pad),
                call.args[0],
                call.args[1],
                primfunc_name_hint="max_pool2d_grad",
            )

    m = _M(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(func))
    return m.builder_.get()
