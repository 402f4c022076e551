"""Max-pool backward as max, first argmax and phase planes over the few windows covering a pixel.

TVM legalizes ``relax.grad.max_pool2d_backward`` with TOPI's ``pool_grad``: a tuple (value,
index) argmax reduction the CPU rules cannot vectorise, then a reduction over every window
position for each input pixel. ResNet-50's stem pool (3x3, stride 2, pad 1; 8x64x112x112
input) took 101 ms of a 3.9 s step that way (1 thread). Here, one PrimFunc:

    x_pad[n, c, i, j]        = x (or the lowest float in the padding)
    peak[n, c, p, q]         = max_{a,b} x_pad[n, c, s*p + a, s*q + b]
    first[n, c, p, q]        = min_{a,b} (a*kw + b if x_pad[...] == peak else kh*kw)
    planes[a, b, n, c, u, v] = sum over the windows (p, q) = (u - t, v - t') whose offset
                               (a + s*t, b + s*t') lies inside the window, of dy[n, c, p, q]
                               where first[n, c, p, q] is that offset
    dx[n, c, i, j]           = planes[(i + pt) % s, (j + pl) % s, n, c, i // s, j // s]

Each phase (a, b) of the padded image (rows s*u + a, columns s*v + b) is covered by a fixed
set of window offsets, so ``planes`` reads ``first`` and ``dy`` contiguously along v (padded
with -1 and 0 so every window index is in bounds), and ``dx`` is one load per pixel. The
first maximum in row-major window order gets the gradient, as in PyTorch (ties are common
after a ReLU: a window of zeros); plain reductions (max, min) vectorise where a tuple argmax
does not, and the comparisons are ``Select``s, not ``if_then_else`` (which the vectoriser
turns into a scalar loop). The stem pool, 1 thread, one run, medians of 9 (min): 90.2 (67.3)
ms with the previous gather over every covering window (clamped indices, ``if_then_else``),
51.8 (39.4) ms this way; with the phases but ``if_then_else`` 91.4 (68.2) ms.

Matched: NCHW, dilation 1, ``ceil_mode`` False, padding below the pool size (no window is all
padding), static shapes. ``passes/schedules.py`` and ``passes/build.py`` run it on llvm
builds before ``LegalizeOps``.
"""

from __future__ import annotations

import tvm
from splitc.passes.compat import has_static_shape
from tvm import relax, te, tirx
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
            tirx.Select(
                x_pad[nn, cc, sh * p + fa, sw * q + fb] == peak[nn, cc, p, q],
                fa * kw + fb,
                kh * kw,
            ),
            axis=[fa, fb],
        ),
        name="first",
    )
    planes = _planes(first, dy, (h, w), pool, strides, pad)
    return te.compute(
        (n, c, h, w),
        # (i + pt) // sh - u0(phase) == i // sh: the row of the phase plane
        lambda nn, cc, i, j: planes[(i + pt) % sh, (j + pl) % sw, nn, cc, i // sh, j // sw],
        name="dx",
    )


def _planes(first, dy, hw, pool, strides, pad):
    """planes[a, b, n, c, u, v]: the gradient of padded pixel (s*(u + u0(a)) + a, ...), where
    u0(a) is the first phase row inside the image (so row u of every plane is image row
    s*u + ..., and ``dx`` reads row i // s)."""
    n, c, ph, pw = (int(d) for d in dy.shape)
    (h, w), (kh, kw), (sh, sw), (pt, pl) = hw, pool, strides, pad[:2]
    th, tw = -(-kh // sh), -(-kw // sw)  # windows covering a pixel, per axis (at most)
    rows, cols = -(-h // sh), -(-w // sw)  # rows and columns of a phase plane

    def u0(a, s, p0):  # first u whose padded row s*u + a is an image row (>= p0)
        return (p0 - a + s - 1) // s

    # first padded with -1 (no window) and dy with 0, so window u0 + u - t is in bounds
    lo_h, lo_w = th - 1, tw - 1
    hi_h = max(0, u0(0, sh, pt) + rows - ph)
    hi_w = max(0, u0(0, sw, pl) + cols - pw)
    shape = (n, c, lo_h + ph + hi_h, lo_w + pw + hi_w)

    def pad_of(t, fill):
        def body(nn, cc, p, q):
            inside = te.all(p >= lo_h, p < lo_h + ph, q >= lo_w, q < lo_w + pw)
            return te.if_then_else(inside, t[nn, cc, p - lo_h, q - lo_w], fill)

        return te.compute(shape, body, name=f"{t.op.name}_pad")

    first_pad = pad_of(first, te.const(-1, first.dtype))
    dy_pad = pad_of(dy, te.const(0, dy.dtype))
    rt, ru = te.reduce_axis((0, th), "rt"), te.reduce_axis((0, tw), "ru")

    def plane(a, b, nn, cc, u, v):
        p = u + u0(a, sh, pt) - rt + lo_h
        q = v + u0(b, sw, pl) - ru + lo_w
        hit = te.all(
            a + sh * rt < kh,
            b + sw * ru < kw,
            first_pad[nn, cc, p, q] == (a + sh * rt) * kw + (b + sw * ru),
        )
        return te.sum(tirx.Select(hit, dy_pad[nn, cc, p, q], te.const(0, dy.dtype)), axis=[rt, ru])

    # a reduction (over the covering windows), so the schedule rules do not inline it into dx
    return te.compute((sh, sw, n, c, rows, cols), plane, name="planes")


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
