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

A 1x1 stride-1 gradient with fewer output than input channels on a map of 28x28 or more
(ResNet-50's reducing 1x1 convs) is a GEMM with lanes over output channels instead
(``weight_grad_pointwise_te``): the smaller dy is packed, x is read in place (see
``_pointwise_cout`` for times).

With fewer input channels than a vector (an RGB stem: 3) the lanes run over output channels
instead, and the image is cut into row bands whose partial sums are added at the end
(``weight_grad_cout_te``): ResNet-50's stem (7x7, stride 2, 3 -> 64 channels, 8x3x224x224)
57.0 -> 29.7 ms against TVM's window + slice (1 thread, same run, medians of 11).

Matched: a ``conv2d`` with those layouts, groups 1, ``strides`` 1 (the forward's dilation),
input channels a multiple of 8 (the vector lanes) or else output channels a multiple of 8, a
stride above 1 or (with input-channel lanes) a 1x1 window or a map narrower than 8 (a 3x3
stride-1 gradient has no excess window and TVM's kernel is as fast at 14x14 and above), and
either no consumer slice (window == filter) or a ``strided_slice`` from 0 with step 1 that is
its only user.
Anything else keeps TVM's legalization. ``passes/schedules.py`` and
``passes/build.py`` run it on llvm builds before ``LegalizeOps`` (after Gradient).
"""

from __future__ import annotations

import tvm
from splitc.passes.compat import has_static_shape
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = [
    "is_weight_grad_conv",
    "legalize_conv_weight_grads",
    "replace_weight_grads",
    "weight_grad_cout_te",
    "weight_grad_pointwise_te",
    "weight_grad_te",
]

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_SLICE = tvm.ir.Op.get("relax.strided_slice")
# The kernel's vector lanes run over input channels: 8 (AVX2) fills a vector, 3 does not.
_MIN_LANES = 8
# weight_grad_cout_te: rows of dy per partial sum, so that one task's channels-last band of dy
# (rows x gw x 32 lanes x 4 bytes) fits in half of Zen4's 1 MiB L2 while the 3 x 7 filter rows
# pass over it, and a batch of 8 gives 8 x 4 tasks instead of 8. ResNet-50 stem (112 rows),
# 1 thread, one loaded run, min of 25: one band 25.9 ms, 28-row bands 25.3, 8-row bands 29.0.
_BAND_BYTES = 1 << 19
# _pointwise_cout: maps of at least 28x28 (measured there; even at 14x14, slower at 7x7)
_POINTWISE_MIN_PIXELS = 28 * 28
_TILE_LANES = 32  # schedule_tiling's lane tile: 2 AVX-512 vectors of float32


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


def weight_grad_cout_te(
    x, dy, stride: int, pad: list[int], kh: int, kw: int, dtype: str, band_bytes: int = _BAND_BYTES
):
    """``weight_grad_te`` with the lanes on output channels, for inputs with fewer channels
        than a vector (3 for an RGB image):

            dyt[n, h, w, o]        = dy[n, o, h, w]                (one channels-last copy)
            part[n, r, i, a, b, o] = sum_{h in band r, w} dyt[n, h, w, o] * x_pad[n, i, a+s*h, b+s*w]
            dw[o, i, a, b]         = sum_{n, r} part[n, r, i, a, b, o]

        The register tile is filter columns (rows) x output channels (lanes): each ``x_pad`` load is
        one broadcast for a whole vector of output channels. The bands (``_BAND_BYTES``) give the
        tile rule one task per image and band, each re-reading an L2-resident slice of dy (bands of
    at most ``band_bytes``, whole rows)."""
    n, ci, h, w = (int(d) for d in x.shape)
    _, co, gh, gw = (int(d) for d in dy.shape)
    s, (pt, pl) = stride, pad[:2]
    hp, wp = h + pt + pad[2], w + pl + pad[3]

    def padded(nn, i, hh, ww):
        inside = te.all(hh >= pt, hh < pt + h, ww >= pl, ww < pl + w)
        return te.if_then_else(inside, x[nn, i, hh - pt, ww - pl], te.const(0, x.dtype))

    xp = te.compute((n, ci, hp, wp), padded, name="x_pad")
    dyt = te.compute((n, gh, gw, co), lambda nn, hh, ww, o: dy[nn, o, hh, ww], name="dy_nhwc")
    row_bytes = gw * min(co, _TILE_LANES) * 4  # one task's lanes of one row of dyt
    band = max(
        d for d in range(1, gh + 1) if gh % d == 0 and d * row_bytes <= max(band_bytes, row_bytes)
    )
    bands = gh // band
    rh = te.reduce_axis((0, band), "rh")
    rw = te.reduce_axis((0, gw), "rw")
    part = te.compute(
        (n, bands, ci, kh, kw, co),
        lambda nn, r, i, a, b, o: te.sum(
            dyt[nn, r * band + rh, rw, o].astype(dtype)
            * xp[nn, i, a + s * (r * band + rh), b + s * rw].astype(dtype),
            axis=[rh, rw],
        ),
        name="dw_part",
    )
    rn = te.reduce_axis((0, n), "rn")
    rr = te.reduce_axis((0, bands), "rr")
    return te.compute(
        (co, ci, kh, kw),
        lambda o, i, a, b: te.sum(part[rn, rr, i, a, b, o], axis=[rn, rr]),
        name="dw",
    )


def weight_grad_pointwise_te(x3, dy3, dtype: str):
    """A 1x1 stride-1 unpadded weight gradient as a GEMM with lanes over output channels, on
    (n, c, h*w) views of x and dy:

        dwt[i, o]      = sum_{n,p} x3[n, i, p] * dy3[n, o, p]
        dw[o, i, 0, 0] = dwt[i, o]

    The tile rule packs dy (the operand with fewer channels) with ``o`` innermost and reads x
    as broadcasts in its own layout, instead of a channels-last copy of the larger x. One
    h*w-long reduction instead of h and w: 256 -> 128 channels at 56x56, b8, 1 thread, one
    loaded run, 25.1 ms against 56.5 ms over (n, h, w)."""
    n, ci, hw = (int(d) for d in x3.shape)
    co = int(dy3.shape[1])
    rn, rp = te.reduce_axis((0, n), "rn"), te.reduce_axis((0, hw), "rp")
    dwt = te.compute(
        (ci, co),
        lambda i, o: te.sum(
            x3[rn, i, rp].astype(dtype) * dy3[rn, o, rp].astype(dtype), axis=[rn, rp]
        ),
        name="dwt",
    )
    return te.compute((co, ci, 1, 1), lambda o, i, a, b: dwt[i, o], name="dw")


def _pointwise_cout(conv, kh: int, kw: int) -> bool:
    """``weight_grad_pointwise_te`` for 1x1 stride-1 unpadded gradients with fewer output than
    input channels on maps of 28x28 and up. ResNet-50 b8, 1 thread, min of 5 rounds, one
    loaded run (channels-last x -> this): 256 -> 64 at 56x56 24.4 -> 9.0 ms, 256 -> 128 39.5
    -> 30.4, 512 -> 128 at 28x28 13.3 -> 8.3, 512 -> 256 26.4 -> 19.9; over (n, h, w) at 14x14
    even (20.3 vs 20.9 ms), at 7x7 slower (9.2 vs 12.2 ms)."""
    ci, co = (int(conv.args[k].ty.shape.values[1]) for k in (0, 1))
    h, w = (int(v) for v in conv.args[0].ty.shape.values[2:])
    at = conv.attrs
    return (
        (kh, kw) == (1, 1)
        and int(at.dilation[0]) == 1
        and not any(int(v) for v in at.padding)
        and co < ci
        and co % _MIN_LANES == 0
        and h * w >= _POINTWISE_MIN_PIXELS
    )


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


def _cout_lanes(call) -> bool:
    """Too few input channels for a vector (3 of an RGB input: lanes over them took the 7x7
    stem from 60 to 1196 ms): ``weight_grad_cout_te``, lanes over output channels."""
    ci, co = (int(call.args[k].ty.shape.values[1]) for k in (0, 1))
    return ci % _MIN_LANES != 0 and co % _MIN_LANES == 0


def is_weight_grad_conv(call) -> bool:
    """A static-shaped ``conv2d`` in the form Gradient gives a weight gradient: CNHW data,
    IOHW kernel, CNHW out, groups 1, strides 1 (the forward's dilation), equal dilations (the
    forward's stride). Both weight-gradient passes (this one, ``gpu_weight_grads``) start
    from it."""
    if not isinstance(call, relax.Call) or not call.op.same_as(_CONV2D):
        return False
    at = call.attrs
    return (
        all(has_static_shape(a) for a in call.args)
        and has_static_shape(call)
        and at.data_layout == "CNHW"
        and at.kernel_layout == "IOHW"
        and at.out_layout == "CNHW"
        and int(at.groups) == 1
        and all(int(v) == 1 for v in at.strides)
        and int(at.dilation[0]) == int(at.dilation[1])
    )


def _is_weight_grad(call) -> bool:
    if not is_weight_grad_conv(call):
        return False
    at = call.attrs
    ci, k = int(call.args[0].ty.shape.values[1]), int(call.ty.shape.values[2])
    gw = int(call.args[1].ty.shape.values[3])
    return (
        # a stride-1 gradient has no excess window and TVM's own kernel is as fast: tiled by
        # schedule_axes' outer lanes at 3x3 (ResNet-50 b8: 20.7 vs 20.8 ms at 14x14, 23.8 vs
        # 27.7 ms at 56x56), by rfactor for 3 input channels (small ResNet's stem, 32x3x32x32:
        # 0.88 ms, 1.59 ms with output-channel lanes), except on maps narrower than 8: 512
        # channels at 7x7, 1 thread, medians of 11 (TVM -> this): batch 8 66.2 -> 59.1 ms,
        # batch 32 446 -> 376 ms (at 14x14: 53.1 and 53.3 ms)
        (
            k == 1
            and ci % _MIN_LANES == 0
            or int(at.dilation[0]) > 1
            or gw < 8
            and ci % _MIN_LANES == 0
        )
        and (ci % _MIN_LANES == 0 or _cout_lanes(call))
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

    te_fn = weight_grad_cout_te if _cout_lanes(conv) else weight_grad_te
    if _pointwise_cout(conv, kh, kw):
        views = []
        for a in conv.args[:2]:
            n, c, h, w = (int(d) for d in a.ty.shape.values)
            views.append(bb.emit(relax.op.memory.view(a, relax.ShapeExpr([n, c, h * w]))))
        return bb.call_te(
            lambda x3, dy3: weight_grad_pointwise_te(x3, dy3, dtype),
            *views,
            primfunc_name_hint="conv2d_weight_grad",
        )

    def compute(x, dy):
        return te_fn(x, dy, s, pad, kh, kw, dtype)

    # "conv2d_...": cost_models.features.parse_kinds files the kernel in the conv family
    hint = "conv2d_weight_grad"
    return bb.call_te(compute, conv.args[0], conv.args[1], primfunc_name_hint=hint)


def legalize_conv_weight_grads(mod):
    """``mod`` with every matched weight-gradient conv (and its slice) as the direct kernel
    above; the rest stays Relax for the normal pipeline."""
    return replace_weight_grads(mod, _is_weight_grad, _emit)


def replace_weight_grads(mod, matches, emit):
    """``mod`` with every weight-gradient conv that ``matches(call)`` (with its slice: a
    ``strided_slice`` from 0, step 1, that is its only user) replaced by ``emit(builder, conv,
    kh, kw)``, the filter's ``kh x kw`` read off the slice (or the conv when unsliced). Shared
    by this pass and ``passes/gpu_weight_grads.py``."""

    @mutator
    class _M(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.sliced: dict = {}  # strided_slice call -> its weight-gradient conv call

        def visit_call_(self, call):
            conv = self.sliced.get(call)
            if conv is not None:
                shape = [int(d) for d in call.ty.shape.values]
                return emit(self.builder_, conv, shape[2], shape[3])
            if matches(call) and not any(c.same_as(call) for c in self.sliced.values()):
                shape = [int(d) for d in call.ty.shape.values]
                return emit(self.builder_, call, shape[2], shape[3])
            return super().visit_call_(call)  # a sliced conv: dead after its slice, DCE'd

    m = _M(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            m.sliced = _sliced_weight_grads(func, matches)
            m.builder_.update_func(gv, m.visit_expr(func))
    return relax.transform.DeadCodeElimination()(m.builder_.get())


def _sliced_weight_grads(func, matches) -> dict:
    """{strided_slice call: weight-gradient conv call} for each slice from 0, step 1, of a
    conv that ``matches`` and has no other user."""
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
                and matches(bound.get(v.args[0]))
                and uses.get(v.args[0], 0) == 1
                and has_static_shape(v)
                and _slice_from_zero(v)
            ):
                out[v] = bound[v.args[0]]
    return out
