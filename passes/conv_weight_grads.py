"""Conv weight gradients as one direct kernel over channels-last pixels, without the window.

``relax.transform.Gradient`` writes the weight gradient of ``conv2d(x, w, stride=s, pad=p)``
(NCHW / OIHW) as ``conv2d(x, dy, data_layout="CNHW", kernel_layout="IOHW", dilation=s)``
over a window of ``(H + pt + pb - s*(gh - 1))`` positions per axis, then ``strided_slice``s
the filter's ``kh x kw`` out of it. At stride 2 the window is one wider than the filter
whenever H is even: a 1x1 stride-2 gradient computes 2x2 positions and keeps 1 (4x the MACs),
a 3x3 one computes 4x4 and keeps 3x3 (1.8x). Here the pair becomes

    xp[n, hh, ww, i] = x_padded[n, i, hh, ww]                    (one channels-last copy)
    dwt[o, a, b, i]  = sum_{n,h,w} dy[n, o, h, w] * xp[n, a + s*h, b + s*w, i]
    dw[o, i, a, b]   = dwt[o, a, b, i]

a GEMM-shaped reduction (rows: output channels, lanes: input channels, contiguous in ``xp``)
over exactly the filter's positions. A 1x1 filter without padding copies only the pixels it
reads (``xp[n, h, w, i] = x[n, i, s*h, s*w]``, a quarter of ``x`` at s=2).

ResNet-50 b8, 1 thread, same run (TVM's window + slice -> this): 1x1 stride 2 132 -> 24 ms
(7x7 out), 200 -> 29 (14x14), 230 -> 23 (28x28); 3x3 stride 2 73 -> 37 and 51 -> 31 ms; 1x1
stride 1 40 -> 10, 17 -> 11, 15 -> 9 ms.

Matched: a ``conv2d`` with those layouts, groups 1, ``strides`` 1 (the forward's dilation),
input channels a multiple of 8 (the vector lanes), a 1x1 window or a stride above 1 (a 3x3
stride-1 gradient has no excess window and TVM's kernel is as fast), and either no consumer
slice (window == filter) or a ``strided_slice`` from 0 with step 1 that is its only user.
Anything else keeps TVM's legalization. ``passes/schedules.py`` and
``passes/build.py`` run it on llvm builds before ``LegalizeOps`` (after Gradient).
"""

from __future__ import annotations

import tvm
from splitc.passes.compat import has_static_shape
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["legalize_conv_weight_grads", "weight_grad_te"]

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_SLICE = tvm.ir.Op.get("relax.strided_slice")
# The kernel's vector lanes run over input channels: 8 (AVX2) fills a vector, 3 does not.
_MIN_LANES = 8


def weight_grad_te(x, dy, stride: int, pad: list[int], kh: int, kw: int, dtype: str):
    """TE of ``dw[o, i, a, b] = sum_{n,h,w} dy[n,o,h,w] * x_pad[n, i, a + s*h, b + s*w]`` for
    a ``kh x kw`` filter; ``pad`` is (top, left, bottom, right)."""
    n, ci, h, w = (int(d) for d in x.shape)
    _, co, gh, gw = (int(d) for d in dy.shape)
    s, (pt, pl) = stride, pad[:2]
    if kh == kw == 1 and pt == pl == 0:
        # only the pixels the 1x1 filter reads, channels last
        xp = te.compute(
            (n, gh, gw, ci), lambda nn, hh, ww, i: x[nn, i, s * hh, s * ww], name="x_pick"
        )
        s_in = 1
    else:
        hp, wp = h + pt + pad[2], w + pl + pad[3]

        def padded(nn, hh, ww, i):
            inside = te.all(hh >= pt, hh < pt + h, ww >= pl, ww < pl + w)
            return te.if_then_else(inside, x[nn, i, hh - pt, ww - pl], te.const(0, x.dtype))

        xp = te.compute((n, hp, wp, ci), padded, name="x_nhwc")
        s_in = s
    rn = te.reduce_axis((0, n), "rn")
    rh = te.reduce_axis((0, gh), "rh")
    rw = te.reduce_axis((0, gw), "rw")
    dwt = te.compute(
        (co, kh, kw, ci),
        lambda o, a, b, i: te.sum(
            dy[rn, o, rh, rw].astype(dtype) * xp[rn, a + s_in * rh, b + s_in * rw, i].astype(dtype),
            axis=[rn, rh, rw],
        ),
        name="dw_ohwi",
    )
    return te.compute((co, ci, kh, kw), lambda o, i, a, b: dwt[o, a, b, i], name="dw")


def _ints(expr) -> list[int] | None:
    """Ints of a Relax tuple of PrimValues / a ShapeExpr, else None."""
    fields = getattr(expr, "fields", None) or getattr(expr, "values", None)
    if fields is None:
        return None
    out = []
    for f in fields:
        v = getattr(f, "value", f)  # PrimValue -> IntImm -> int
        v = getattr(v, "value", v)
        if not isinstance(v, int):
            return None
        out.append(v)
    return out


def _is_weight_grad(call) -> bool:
    if not isinstance(call, relax.Call) or not call.op.same_as(_CONV2D):
        return False
    at = call.attrs
    if not all(has_static_shape(a) for a in call.args):
        return False
    ci, k = int(call.args[0].ty.shape.values[1]), int(call.ty.shape.values[2])
    return (
        # lanes are input channels: 3 (an RGB input) fills no vector (7x7 stem: 60 -> 1196 ms)
        ci % _MIN_LANES == 0
        # a 3x3 stride-1 gradient has no excess window and TVM's own kernel, tiled by
        # schedule_axes' outer lanes, is as fast (ResNet-50 b8: 20.7 vs 20.8 ms at 14x14,
        # 23.8 vs 27.7 ms at 56x56)
        and (k == 1 or int(at.dilation[0]) > 1)
        and at.data_layout == "CNHW"
        and at.kernel_layout == "IOHW"
        and at.out_layout == "CNHW"
        and int(at.groups) == 1
        and all(int(v) == 1 for v in at.strides)
        and int(at.dilation[0]) == int(at.dilation[1])
    )


def _slice_from_zero(call) -> bool:
    """A strided_slice that starts at 0 with step 1 on every axis it names."""
    begin = _ints(call.args[2])
    strides = _ints(call.args[4]) if len(call.args) > 4 else None
    if begin is None or any(begin):
        return False
    if len(call.args) > 4 and call.args[4] is not None:
        return strides is not None and all(v == 1 for v in strides)
    return True


def _emit(bb, conv, kh: int, kw: int):
    at = conv.attrs
    pad = [int(v) for v in at.padding]
    s = int(at.dilation[0])
    dtype = conv.ty.dtype

    def compute(x, dy):
        return weight_grad_te(x, dy, s, pad, kh, kw, dtype)

    # "conv2d_...": cost_models.features.parse_kinds files the kernel in the conv family
    hint = "conv2d_weight_grad"
    return bb.call_te(compute, conv.args[0], conv.args[1], primfunc_name_hint=hint)


def legalize_conv_weight_grads(mod):
    """``mod`` with every matched weight-gradient conv (and its slice) as the direct kernel
    above; the rest stays Relax for the normal pipeline."""

    @mutator
    class _M(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.sliced: dict = {}  # strided_slice call -> its weight-gradient conv call

        def visit_call_(self, call):
            conv = self.sliced.get(call)
            if conv is not None:
                shape = [int(d) for d in call.ty.shape.values]
                return _emit(self.builder_, conv, shape[2], shape[3])
            if _is_weight_grad(call) and not any(c.same_as(call) for c in self.sliced.values()):
                shape = [int(d) for d in call.ty.shape.values]
                return _emit(self.builder_, call, shape[2], shape[3])
            return super().visit_call_(call)  # a sliced conv: dead after its slice, DCE'd

    m = _M(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            m.sliced = _sliced_weight_grads(func)
            m.builder_.update_func(gv, m.visit_expr(func))
    return relax.transform.DeadCodeElimination()(m.builder_.get())


def _sliced_weight_grads(func) -> dict:
    """{strided_slice call: weight-gradient conv call} for each slice from 0, step 1, of a
    matched conv that has no other user."""
    bound, uses = {}, {}

    def visit(e):
        if isinstance(e, relax.Call):
            for a in e.args:
                if isinstance(a, relax.Var):
                    uses[a] = uses.get(a, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    out = {}
    for block in getattr(func.body, "blocks", []):
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            bound[b.var] = b.value
            v = b.value
            if (
                isinstance(v, relax.Call)
                and v.op.same_as(_SLICE)
                and isinstance(v.args[0], relax.Var)
                and _is_weight_grad(bound.get(v.args[0]))
                and uses.get(v.args[0], 0) == 1
                and has_static_shape(v)
                and _slice_from_zero(v)
            ):
                out[v] = bound[v.args[0]]
    return out
