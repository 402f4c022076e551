"""Conv weight gradients for GPU targets: exactly the filter's window, the reduction split.

``relax.transform.Gradient`` writes the weight gradient of ``conv2d(x, w, stride=s, pad=p)``
as ``conv2d(x, dy, data_layout="CNHW", kernel_layout="IOHW", dilation=s)`` (plus a
``strided_slice`` when the window it computes is wider than the filter, see
``passes/conv_weight_grads.py``). On a GPU that conv is a GEMM with few outputs and a long
reduction: ``O x (I*kh*kw)`` outputs, each a sum over ``N*H*W`` products. dlight's matmul
rule tiles the outputs only, so ResNet-50's stem (64 x 147 outputs, 401k-long sums at batch
32) ran on a handful of thread blocks: 126 ms of a 337 ms step on an H100, where cuDNN's
whole step takes 45 ms. Here the pair becomes

    part[g1, g2, o, i, a, b] = sum_{n < nb, h < band, w} dy[g1*nb + n, o, g2*band + h, w]
                                   * x_pad[g1*nb + n, i, a + s*(g2*band + h), b + s*w]
    dw[o, i, a, b]           = sum_{g1, g2} part[g1, g2, o, i, a, b]

with the split (``nb`` images by ``band`` rows of dy per partial sum) chosen so that the
partial sums give the GPU enough thread blocks (``_BLOCKS``) while keeping each partial sum
at least ``_MIN_K`` products long and the partials under ``_PART_BYTES``. A weight gradient
with enough output tiles keeps one partial (no split) and still loses the excess window.

Matched: a ``conv2d`` with those layouts, static shapes, groups 1, ``strides`` 1 (the
forward's dilation) and equal dilations, alone or under a ``strided_slice`` from 0 with step 1
that is its only user. ``passes/build.py`` runs it in the GPU pipeline before legalization;
llvm builds use ``passes/conv_weight_grads.py`` instead.
"""

from __future__ import annotations

import tvm
from splitc.passes.compat import has_static_shape
from splitc.passes.conv_weight_grads import _slice_from_zero
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["choose_split", "legalize_gpu_weight_grads", "weight_grad_split_te"]

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_SLICE = tvm.ir.Op.get("relax.strided_slice")
# Thread blocks to aim for: two waves of an H100's 132 SMs (an Orin has 8 or 16, so any
# split that fills an H100 fills it too).
_BLOCKS = 264
# dlight's fp32 matmul tile (outputs per thread block), used to count the blocks of a split.
_TILE_M, _TILE_N = 32, 64
# Shortest partial sum worth a thread block: below this the block's tile loads dominate.
_MIN_K = 256
# The partial sums are written once and read once by the final sum: 64 MiB is ~40 us of HBM3.
_PART_BYTES = 64 << 20


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_split(n: int, gh: int, gw: int, co: int, ck: int) -> tuple[int, int]:
    """(images per partial, dy rows per partial) for ``n`` images of ``gh x gw`` gradient
    pixels, ``co`` output channels and ``ck`` = input channels x filter positions: the fewest
    partial sums that reach ``_BLOCKS`` thread blocks, else as many as the limits allow."""
    tiles = -(-co // _TILE_M) * -(-ck // _TILE_N)
    whole = (n, gh)

    def parts(c):
        return (n // c[0]) * (gh // c[1])

    allowed = [
        (nb, band)
        for nb in _divisors(n)
        for band in _divisors(gh)
        if (nb, band) == whole
        or nb * band * gw >= _MIN_K
        and parts((nb, band)) * co * ck * 4 <= _PART_BYTES
    ]
    reaching = [c for c in allowed if parts(c) * tiles >= _BLOCKS]
    if reaching:  # fewest partials; of those, whole images before row bands
        return min(reaching, key=lambda c: (parts(c), -c[1]))
    return max(allowed, key=lambda c: (parts(c), c[1]))


def weight_grad_split_te(x, dy, stride: int, pad: list[int], kh: int, kw: int, dtype: str):
    """TE of the split weight gradient (module docstring); ``pad`` is (top, left, bottom,
    right)."""
    n, ci, h, w = (int(d) for d in x.shape)
    _, co, gh, gw = (int(d) for d in dy.shape)
    s, (pt, pl) = stride, pad[:2]
    nb, band = choose_split(n, gh, gw, co, ci * kh * kw)
    hp, wp = h + pt + pad[2], w + pl + pad[3]

    def padded(nn, i, hh, ww):
        inside = te.all(hh >= pt, hh < pt + h, ww >= pl, ww < pl + w)
        return te.if_then_else(inside, x[nn, i, hh - pt, ww - pl], te.const(0, x.dtype))

    xp = te.compute((n, ci, hp, wp), padded, name="pad_temp")
    rn = te.reduce_axis((0, nb), "rn")
    rh = te.reduce_axis((0, band), "rh")
    rw = te.reduce_axis((0, gw), "rw")
    if (nb, band) == (n, gh):  # enough output tiles: one pass, no partials
        return te.compute(
            (co, ci, kh, kw),
            lambda o, i, a, b: te.sum(
                dy[rn, o, rh, rw].astype(dtype) * xp[rn, i, a + s * rh, b + s * rw].astype(dtype),
                axis=[rn, rh, rw],
            ),
            name="dw",
        )
    g1, g2 = n // nb, gh // band
    part = te.compute(
        (g1, g2, co, ci, kh, kw),
        lambda p, q, o, i, a, b: te.sum(
            dy[p * nb + rn, o, q * band + rh, rw].astype(dtype)
            * xp[p * nb + rn, i, a + s * (q * band + rh), b + s * rw].astype(dtype),
            axis=[rn, rh, rw],
        ),
        name="dw_part",
    )
    rp = te.reduce_axis((0, g1), "rp")
    rq = te.reduce_axis((0, g2), "rq")
    return te.compute(
        (co, ci, kh, kw),
        lambda o, i, a, b: te.sum(part[rp, rq, o, i, a, b], axis=[rp, rq]),
        name="dw",
    )


def _is_weight_grad(call) -> bool:
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


def _emit(bb, conv, kh: int, kw: int):
    at = conv.attrs
    pad = [int(v) for v in at.padding]
    s, dtype = int(at.dilation[0]), conv.ty.dtype

    def compute(x, dy):
        return weight_grad_split_te(x, dy, s, pad, kh, kw, dtype)

    # "conv2d_...": cost_models.features.parse_kinds files the kernel in the conv family
    return bb.call_te(compute, conv.args[0], conv.args[1], primfunc_name_hint="conv2d_wgrad")


def legalize_gpu_weight_grads(mod):
    """``mod`` with every matched weight-gradient conv (and its slice) as the split kernel."""

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
            m.sliced = _sliced(func)
            m.builder_.update_func(gv, m.visit_expr(func))
    return relax.transform.DeadCodeElimination()(m.builder_.get())


def _sliced(func) -> dict:
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
