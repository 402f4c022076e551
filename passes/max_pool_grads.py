"""Max-pool forward and backward as phase-split stages, one image plane at a time.

TVM legalizes ``relax.grad.max_pool2d_backward`` with TOPI's ``pool_grad``: a tuple (value,
index) argmax reduction the CPU rules cannot vectorise, then a reduction over every window
position for each input pixel. ResNet-50's stem pool (3x3, stride 2, pad 1; 8x64x112x112
input) took 101 ms of a 3.9 s step that way (1 thread). Here, one PrimFunc of injective
stages, per (n, c) plane (s = stride, offsets o = a*kw + b in row-major window order):

    xph[n, c, a', b', u, v]   = x[s*u + a' - pt, s*v + b' - pl], indices clamped to the image
    peak[n, c, p, q]          = max_o xph[a % s, b % s, p + a//s, q + b//s]
    first[n, c, p, q]         = the first o inside the image whose pixel equals peak
    planes[n, c, a, b, u, v]  = sum over the windows (p, q) = (u - t, v - t') whose offset
                                (a + s*t, b + s*t') lies inside the window, of dy[n, c, p, q]
                                where first[n, c, p, q] is that offset
    dx[n, c, i, j]            = planes[n, c, (i + pt) % s, (j + pl) % s, i // s, j // s]

The input is split into its s x s phases once, so every window read is contiguous along q;
``planes`` reads ``first`` and ``dy`` contiguously along v (padded with -1 and 0 so every
window index is in bounds), and ``dx`` is one load per pixel. The first maximum in
row-major window order gets the gradient, as in PyTorch (ties are common after a ReLU: a
window of zeros). The window offsets are unrolled in the stage bodies (Selects, not
``if_then_else``, which the vectoriser turns into a scalar loop). The forward
``max_pool2d`` is the first two stages (``mp_xph``, ``mp_pool``).

``schedule_max_pool_grad`` (called by ``schedule_rules.schedule_prim_func`` for kernels
with these stages) runs every stage inside one parallel loop over the n*c planes, so the
intermediates of a plane (6 x 12.5k floats for the stem pool) stay in cache and only x, dy
and dx (and whatever the kernel fused: the ReLU backward's mask) cross DRAM. Stem pool, b8,
1 thread, same run, medians: backward with the fused ReLU backward 41.3 ms (session 5: phase
planes as reductions, each stage its own parallel loop, ~7 whole-tensor passes) -> 11.7 ms;
forward 13.3 -> 5.5 ms (TOPI's pool: stride-2 scalar loads).

Matched: NCHW, dilation 1, ``ceil_mode`` False, padding below the pool size (no window is all
padding), static shapes. ``passes/schedules.py`` and ``passes/build.py`` run it on llvm
builds before ``LegalizeOps``.
"""

from __future__ import annotations

import tvm
from splitc.passes.compat import has_static_shape
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = [
    "STAGES",
    "is_max_pool_grad",
    "legalize_max_pool_grads",
    "max_pool_grad_te",
    "max_pool_te",
    "schedule_max_pool_grad",
]

_MAX_POOL_GRAD = tvm.ir.Op.get("relax.grad.max_pool2d_backward")
_MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")

# the per-plane stages, in producer order (block names of the kernel)
STAGES = ("mp_xph", "mp_peak", "mp_first", "mp_fpad", "mp_dpad", "mp_planes")


def _clamp(e, hi):
    # clamped indices: loads that are in bounds for every lane (padding reads a neighbour)
    return tirx.max(tirx.min(e, hi), 0)


def _phases(x, ph: int, pw: int, pool, strides, pad):
    """(xph, pixel(nn, cc, p, q, a, b), inside(p, q, a, b)): x split into its stride phases,
    the padding filled with the nearest image pixel (a plain clamped load, which vectorises:
    an ``if_then_else`` made a scalar loop, 13.0 -> 11.3 ms for the stem pool, and a
    ``Select`` had the simplifier drop the clamp under its condition and read out of
    bounds). With padding below the pool size, every window that covers padding also covers
    the image row or column that fills it, so the window maximum is unchanged; ``inside``
    tells the argmax which offsets are image pixels."""
    n, c, h, w = (int(d) for d in x.shape)
    (kh, kw), (sh, sw), (pt, pl) = pool, strides, pad[:2]

    def xbody(nn, cc, a, b, u, v):
        return x[nn, cc, _clamp(sh * u + a - pt, h - 1), _clamp(sw * v + b - pl, w - 1)]

    # rows and columns of a phase that some window reads
    shape = (n, c, sh, sw, ph + (kh - 1) // sh, pw + (kw - 1) // sw)
    xph = te.compute(shape, xbody, name="mp_xph")

    def pixel(nn, cc, p, q, a, b):
        return xph[nn, cc, a % sh, b % sw, p + a // sh, q + b // sw]

    def inside(p, q, a, b):
        i, j = sh * p + a - pt, sw * q + b - pl
        return te.all(i >= 0, i < h, j >= 0, j < w)

    return xph, pixel, inside


def _peak(pixel, shape, pool, name: str):
    offs = [(a, b) for a in range(pool[0]) for b in range(pool[1])]

    def body(nn, cc, p, q):
        v = pixel(nn, cc, p, q, *offs[0])
        for o in offs[1:]:
            v = tirx.max(v, pixel(nn, cc, p, q, *o))
        return v

    return te.compute(shape, body, name=name)


def max_pool_te(x, pool: list[int], strides: list[int], pad: list[int]):
    """The forward pool as the first two stages (``mp_xph``, ``mp_pool``)."""
    n, c, h, w = (int(d) for d in x.shape)
    ph = (h + pad[0] + pad[2] - pool[0]) // strides[0] + 1
    pw = (w + pad[1] + pad[3] - pool[1]) // strides[1] + 1
    _, pixel, _ = _phases(x, ph, pw, pool, strides, pad)
    return _peak(pixel, (n, c, ph, pw), pool, "mp_pool")


def max_pool_grad_te(dy, x, pool: list[int], strides: list[int], pad: list[int]):
    """TE of the stages above; ``pad`` is (top, left, bottom, right)."""
    n, c, h, w = (int(d) for d in x.shape)
    _, _, ph, pw = (int(d) for d in dy.shape)
    (kh, kw), (pt, pl) = pool, pad[:2]
    sh, sw = strides
    _, pixel, inside = _phases(x, ph, pw, pool, strides, pad)
    peak = _peak(pixel, (n, c, ph, pw), pool, "mp_peak")
    offs = [(a, b) for a in range(kh) for b in range(kw)]

    def first_body(nn, cc, p, q):
        f = tirx.const(kh * kw, "int32")
        for k in reversed(range(len(offs))):  # the last Select applied is offset 0's
            hit = te.all(
                inside(p, q, *offs[k]), pixel(nn, cc, p, q, *offs[k]) == peak[nn, cc, p, q]
            )
            f = tirx.Select(hit, tirx.const(k, "int32"), f)
        return f

    first = te.compute((n, c, ph, pw), first_body, name="mp_first")
    planes = _planes(first, dy, (h, w), pool, strides, pad)
    return te.compute(
        (n, c, h, w),
        # (i + pt) // sh - u0(phase) == i // sh: the row of the phase plane
        lambda nn, cc, i, j: planes[nn, cc, (i + pt) % sh, (j + pl) % sw, i // sh, j // sw],
        name="dx",
    )


def _planes(first, dy, hw, pool, strides, pad):
    """planes[n, c, a, b, u, v]: the gradient of padded pixel (s*(u + u0(a)) + a, ...), where
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

    def pad_of(t, fill, name):
        def body(nn, cc, p, q):
            inside = te.all(p >= lo_h, p < lo_h + ph, q >= lo_w, q < lo_w + pw)
            at = t[nn, cc, _clamp(p - lo_h, ph - 1), _clamp(q - lo_w, pw - 1)]
            return te.if_then_else(inside, at, fill)

        return te.compute(shape, body, name=name)

    first_pad = pad_of(first, tirx.const(-1, first.dtype), "mp_fpad")
    dy_pad = pad_of(dy, tirx.const(0, dy.dtype), "mp_dpad")
    zero = tirx.const(0, dy.dtype)

    def phase(nn, cc, a, b, u, v):  # a, b: Python ints
        acc = zero
        for t in range(th):
            for tt in range(tw):
                if a + sh * t >= kh or b + sw * tt >= kw:
                    continue  # offset outside the window
                p = u + u0(a, sh, pt) - t + lo_h
                q = v + u0(b, sw, pl) - tt + lo_w
                hit = first_pad[nn, cc, p, q] == (a + sh * t) * kw + (b + sw * tt)
                acc = acc + tirx.Select(hit, dy_pad[nn, cc, p, q], zero)
        return acc

    def plane(nn, cc, a, b, u, v):
        # one branch per phase; the schedule unrolls a and b, so each branch stands alone
        out = zero
        for av in range(sh):
            for bv in range(sw):
                out = tirx.Select(tirx.all(a == av, b == bv), phase(nn, cc, av, bv, u, v), out)
        return out

    return te.compute((n, c, sh, sw, rows, cols), plane, name="mp_planes")


def _stage_names(func: tirx.PrimFunc) -> set:
    sch = tvm.s_tir.Schedule(func)
    try:
        return {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except Exception:  # noqa: BLE001 - no root block: not a TE kernel
        return set()


def is_max_pool_grad(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` holds the stages of :func:`max_pool_grad_te` (fused or not), or of
    the forward :func:`max_pool_te` (``mp_xph`` and ``mp_pool``)."""
    names = _stage_names(func)
    return set(STAGES) <= names or {"mp_xph", "mp_pool"} <= names


def schedule_max_pool_grad(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """One parallel loop over the n*c planes of the output; every stage computed at it
    (a plane's intermediates stay in cache), innermost loops vectorised, the phase loops of
    ``planes`` unrolled. Other injective blocks (a fused ReLU backward) are inlined into the
    output. Raises where the kernel does not have that shape."""
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    *rest, out = blocks
    for b in rest:
        if sch.get(b).name_hint not in STAGES:
            sch.compute_inline(b)  # a fused elementwise producer or consumer
    loops = sch.get_loops(out)
    if len(loops) != 4:
        raise ValueError(f"max-pool grad output has {len(loops)} loops, expected 4")
    planes_loop = sch.fuse(loops[0], loops[1])
    sch.parallel(planes_loop)
    cols = loops[3]
    if int(sch.get(cols).extent) % lanes == 0:
        cols = sch.split(cols, [None, lanes])[1]
    sch.vectorize(cols)
    names = _stage_names(func)
    for name in [n for n in reversed(STAGES) if n in names]:
        block = sch.get_sblock(name)
        sch.compute_at(block, planes_loop)
        inner = sch.get_loops(block)[1:]
        if name == "mp_planes":
            sch.unroll(inner[0])
            sch.unroll(inner[1])
        sch.vectorize(inner[-1])
    return sch.mod["main"]


def _matched(call) -> bool:
    at = call.attrs
    pool = [int(v) for v in at.pool_size]
    pad = [int(v) for v in at.padding]
    return (
        all(has_static_shape(a) for a in call.args)
        and has_static_shape(call)
        and at.layout == "NCHW"
        and str(getattr(at, "out_layout", "NCHW") or "NCHW") == "NCHW"
        and not bool(at.ceil_mode)
        and all(int(v) == 1 for v in at.dilation)
        and len(pad) == 4
        and max(pad[0], pad[2]) < pool[0]
        and max(pad[1], pad[3]) < pool[1]
    )


def legalize_max_pool_grads(mod):
    """``mod`` with every matched ``max_pool2d_backward`` as the kernel above, and every
    matched forward ``max_pool2d`` as its first two stages (TOPI's pool reads the input at
    stride 2 along w, scalar loads: the stem pool took 14.6 ms at b8, 2.2 GB/s)."""

    @mutator
    class _M(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            grad, fwd = call.op.same_as(_MAX_POOL_GRAD), call.op.same_as(_MAX_POOL)
            if not (grad or fwd) or not _matched(call):
                return call
            at = call.attrs
            pool = [int(v) for v in at.pool_size]
            strides = [int(v) for v in at.strides]
            pad = [int(v) for v in at.padding]
            if fwd:
                return self.builder_.call_te(
                    lambda x: max_pool_te(x, pool, strides, pad),
                    call.args[0],
                    primfunc_name_hint="max_pool2d",
                )
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
