"""Strided ``conv2d_transpose`` as s*s dense phase convolutions plus one interleave.

``relax.transform.Gradient`` turns the data gradient of a stride-s conv into
``conv2d_transpose(stride=s)``, and TOPI legalizes that as a stride-1 conv over the input
dilated with s-1 zeros per pixel: (s*s-1)/(s*s) of its MACs multiply zeros (3/4 at s=2), and
no TIR schedule can drop them (the reduction domain differs per output phase). Here, per
output phase (a, b):

    out[n, co, s*i + a, s*j + b] = sum_ci sum_{t,u} dy[n, ci, i + qa - t, j + qb - u]
                                   * w[ci, co, kh0(a) + s*t, kw0(b) + s*u]
    kh0(a) = (a + p) mod s,  qa = (a + p - kh0(a)) / s,  t over taps with kh0 + s*t < k

a dense correlation of dy with a sub-kernel; the result is one PrimFunc (s*s reduction
blocks, each register-tiled by the default rules, and an injective interleave). Small ResNet
stride-2 data gradient (32x64x16x16 -> 32x32x32x32, 3x3): 12.5 -> 4.6 ms; 1x1: 2.9 -> 1.0 ms
(1 thread). A 1x1 kernel is one dense phase: the GEMM of ``pointwise_convs.pixel_gemm`` (on a
view of dy when its images are whole vectors of pixels). Groups, dilation, other layouts and output sizes not divisible by s keep TVM's
legalization.

``legalize_strided_conv_transposes(mod)`` legalizes only those calls (the rest stays Relax, so
RewriteGrads still sees ``relax.matmul``); ``passes/build.py`` and
``schedules.default_cpu_schedule`` run it on llvm builds before ``LegalizeOps``.
"""

from __future__ import annotations

from splitc.passes.pointwise_convs import pixel_gemm
from tvm import te, tirx, topi
from tvm.relax.transform.legalize_ops.nn import _nn_conv2d_transpose

__all__ = ["legalize_conv2d_transpose", "legalize_strided_conv_transposes"]


def _taps(a: int, s: int, p: int, k: int):
    kh0 = (a + p) % s
    taps = list(range(kh0, k, s))
    return taps, (a + p - kh0) // s


def _phase_body(dp, wt, rc, rt, ru, s, kh0, kw0, oh, ow, dtype):
    def body(nn, cc, i, j):
        return te.sum(
            dp[nn, rc, i + oh - rt, j + ow - ru].astype(dtype)
            * wt[rc, cc, kh0 + s * rt, kw0 + s * ru].astype(dtype),
            axis=[rc, rt, ru],
        )

    return body


def legalize_conv2d_transpose(bb, call):
    at = call.attrs
    strides = [int(v) for v in at.strides]
    pad = [int(v) for v in at.padding]  # top, left, bottom, right
    opad = [int(v) for v in at.output_padding]
    n, ci, h, w = (int(d) for d in call.args[0].ty.shape)
    _, co, kh, kw = (int(d) for d in call.args[1].ty.shape)
    s = strides[0]
    ho = (h - 1) * s - pad[0] - pad[2] + kh + opad[0]
    wo = (w - 1) * s - pad[1] - pad[3] + kw + opad[1]
    if (
        s == 1
        or strides[1] != s
        or int(at.groups) != 1
        or any(int(d) != 1 for d in at.dilation)
        or at.data_layout != "NCHW"
        or at.kernel_layout != "IOHW"
        or at.out_layout != "NCHW"
        or ho % s
        or wo % s
    ):
        return _nn_conv2d_transpose(bb, call)
    hq, wq = ho // s, wo // s
    dtype = call.ty.dtype
    dy_arg, gemm = call.args[0], None
    if kh == kw == 1 and not any(pad):
        # one dense phase (0, 0), a 1x1 conv of dy: the GEMM of pointwise_convs (ResNet-50 b8,
        # 1 thread, same run: 2048 -> 1024 channels from 7x7 137 -> 22 ms, 1024 -> 512 from
        # 14x14 27.7 -> 24.1 ms, 512 -> 256 from 28x28 27.8 -> 24.3 ms; there, on a view of
        # dy without the pixel copy, 60.2 -> 25.2 ms with its residual add, one loaded run)
        dy_arg, gemm = pixel_gemm(bb, dy_arg, lambda wt, o, i: wt[i, o, 0, 0], co, 1, dtype)

    def compute(dy, wt):
        if gemm is not None:
            y = gemm(dy, wt)
            phases = {(a, b): y if a == b == 0 else None for a in range(s) for b in range(s)}
            return _interleave(phases, n, co, ho, wo, s, dtype)
        phases = {}
        for a in range(s):
            th, qh = _taps(a, s, pad[0], kh)
            for b in range(s):
                tw, qw = _taps(b, s, pad[1], kw)
                if not th or not tw:
                    phases[a, b] = None  # no tap reaches this phase: zeros
                    continue
                # dy index i + q - t for t in taps: pad dy so every read is in bounds
                lo_h, lo_w = max(0, len(th) - 1 - qh), max(0, len(tw) - 1 - qw)
                hi_h = max(0, hq - 1 + qh - (h - 1))
                hi_w = max(0, wq - 1 + qw - (w - 1))
                dp = topi.nn.pad(dy, [0, 0, lo_h, lo_w], [0, 0, hi_h, hi_w], name=f"dy_pad{a}{b}")
                rc = te.reduce_axis((0, ci), "rc")
                rt = te.reduce_axis((0, len(th)), "rt")
                ru = te.reduce_axis((0, len(tw)), "ru")
                body = _phase_body(dp, wt, rc, rt, ru, s, th[0], tw[0], qh + lo_h, qw + lo_w, dtype)
                phases[a, b] = te.compute((n, co, hq, wq), body, name=f"phase{a}{b}")
        return _interleave(phases, n, co, ho, wo, s, dtype)

    return bb.call_te(compute, dy_arg, call.args[1], primfunc_name_hint="conv2d_transpose_phases")


def _interleave(phases, n, co, ho, wo, s, dtype):
    """out[n, c, s*i + a, s*j + b] = phases[a, b][n, c, i, j] (0 where a phase is None)."""

    def pick(nn, cc, i, j):
        val = te.const(0, dtype)
        for (a, b), y in phases.items():
            if y is None:
                continue
            # Select, not if_then_else: every phase's read is in bounds, and under a fused
            # ReLU-backward Select LLVM scalarised the branch (512 -> 256 channels from 28x28,
            # b8, 1 thread, same run: 51.3 -> 22.0 ms)
            val = tirx.Select(te.all(i % s == a, j % s == b), y[nn, cc, i // s, j // s], val)
        return val

    return te.compute((n, co, ho, wo), pick, name="interleave")


def legalize_strided_conv_transposes(mod):
    """Only the conv2d_transpose calls of ``mod`` legalized as above (everything else stays
    Relax for the normal pipeline)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = tvm.ir.Op.get("relax.nn.conv2d_transpose")

    @mutator
    class _M(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(op):
                return legalize_conv2d_transpose(self.builder_, call)
            return call

    m = _M(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(func))
    return m.builder_.get()
