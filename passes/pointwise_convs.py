"""1x1 convolutions (and their stride-1 data gradients) as one GEMM over every pixel of the batch.

A 1x1 conv is ``Y[o, q] = sum_i W[o, i] X[i, q]`` over the pixels q = (n, h, w). Legalized
as a conv (NCHW), the register tile's vector lanes run along one image row: 14 or 7 pixels on
ResNet-50's last stages, a partial vector per row (35-54 GF/s of ~110 on one core). Here the
conv becomes one PrimFunc of three stages

    x_pix[i, q]    = x[n, i, s*h, s*w]       (q = n*gh*gw + h*gw + w, zero past the last pixel)
    gemm[o, q]     = sum_i W[o, i] * x_pix[i, q]
    out[n, o, h, w] = gemm[o, q]

whose GEMM has lanes along q, padded to whole vectors (8 x 7 x 7 = 392 -> 400 pixels), and
rows along o (``schedule_tiling`` tiles it like any matmul; the unpack inlines into a fused
epilogue such as batch norm or ReLU). ResNet-50 b8, 1 thread, same run: 1x1 convs at 7x7
20.2 -> 11.7 ms and 23.4 -> 11.8 ms, at 14x14 15.6 -> 13.6 and 15.2 -> 11.6 ms; their data
gradients (``conv2d_transpose``, 1x1, stride 1) at 7x7 48.5 -> 25.1 ms, at 14x14 26.1 -> 21.5.

Stride 1 with whole vector blocks of pixels per image (56x56: 3136 = 196 x 16; 28x28) skips
the pixel copy: the input is viewed as (n, c, h*w) (``relax.memory.view``, no copy) and the
GEMM ``gemm[n, o, p]`` runs per image with lanes along its pixels (``image_gemm_te``).

Matched: ``conv2d`` NCHW/OIHW with a 1x1 kernel, no padding, no dilation, groups 1 (any
stride: the pack reads every s-th pixel), and ``conv2d_transpose`` NCHW/IOHW with a 1x1
kernel, stride 1, no padding; static shapes. ``passes/schedules.py`` and ``passes/build.py``
run it on llvm builds before ``LegalizeOps`` (after Gradient).
"""

from __future__ import annotations

import tvm
from splitc.passes.compat import has_static_shape
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["image_gemm_te", "legalize_pointwise_convs", "pixel_gemm", "pointwise_te"]

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_CONV2D_T = tvm.ir.Op.get("relax.nn.conv2d_transpose")
# Pixels are padded to a multiple of this (one AVX-512 vector of float32); 16 of 392 is 2 %
# extra work where a multiple of 32 (416) would be 6 %.
_PIXEL_BLOCK = 16


def pointwise_te(x, weight, c_out: int, stride: int, dtype: str):
    """TE of the three stages above; ``weight(o, i)`` is the weight element for output
    channel o and input channel i (``W[o, i, 0, 0]`` or, for a transpose, ``W[i, o, 0, 0]``)."""
    n, ci, h, w = (int(d) for d in x.shape)
    gh, gw = (h - 1) // stride + 1, (w - 1) // stride + 1
    hw, q = gh * gw, n * gh * gw
    qp = -(-q // _PIXEL_BLOCK) * _PIXEL_BLOCK
    s = stride

    def pick(i, p):
        pc = te.min(p, q - 1)  # in-bounds index for the padded pixels (their value is 0)
        val = x[pc // hw, i, s * (pc % hw // gw), s * (pc % gw)]
        return te.if_then_else(p < q, val, te.const(0, x.dtype))

    x_pix = te.compute((ci, qp), pick, name="x_pix")
    r = te.reduce_axis((0, ci), "ri")
    gemm = te.compute(
        (c_out, qp),
        lambda o, p: te.sum(weight(o, r).astype(dtype) * x_pix[r, p].astype(dtype), axis=r),
        name="gemm",
    )
    return te.compute(
        (n, c_out, gh, gw), lambda nn, o, i, j: gemm[o, nn * hw + i * gw + j], name="unpix"
    )


def image_gemm_te(x3, weight, c_out: int, h: int, w: int, dtype: str):
    """TE of the stride-1 form without the pixel copy: ``x3`` is the input viewed as
    (n, c_in, h*w), the GEMM runs per image with lanes along its h*w pixels (a multiple of
    the vector block, so no vector straddles two images)."""
    n, ci, hw = (int(d) for d in x3.shape)
    r = te.reduce_axis((0, ci), "ri")
    gemm = te.compute(
        (n, c_out, hw),
        lambda b, o, p: te.sum(weight(o, r).astype(dtype) * x3[b, r, p].astype(dtype), axis=r),
        name="gemm",
    )
    return te.compute((n, c_out, h, w), lambda b, o, i, j: gemm[b, o, i * w + j], name="unpix")


def _image_lanes(x, stride: int) -> bool:
    """Stride 1 and whole vector blocks per image (56x56: 3136 = 196 x 16, 28x28: 784)."""
    _, _, h, w = (int(d) for d in x.ty.shape.values)
    return stride == 1 and (h * w) % _PIXEL_BLOCK == 0


def pixel_gemm(bb, x, pick, c_out: int, stride: int, dtype: str):
    """(argument, TE function ``f(arg, wt)`` -> (n, c_out, gh, gw)) of the 1x1 conv of ``x``
    (NCHW) with the weight element ``pick(wt, o, i)``: the per-image GEMM on a zero-copy
    (n, c, h*w) view of x (emitted here) when ``_image_lanes`` (the pixel copy is a full pass
    over x: 64 -> 256 channels at 56x56, b8, 17.9 -> 15.1 ms, 256 -> 64 16.7 -> 10.0 ms, with a
    batch-norm epilogue, 1 thread, min of 5), else x itself and the pixel GEMM."""
    if _image_lanes(x, stride):
        n, ci, h, w = (int(d) for d in x.ty.shape.values)
        view = bb.emit(relax.op.memory.view(x, relax.ShapeExpr([n, ci, h * w])))

        def image(x3, wt):
            return image_gemm_te(x3, lambda o, i: pick(wt, o, i), c_out, h, w, dtype)

        return view, image

    def pixels(x, wt):
        return pointwise_te(x, lambda o, i: pick(wt, o, i), c_out, stride, dtype)

    return x, pixels


def _emit(bb, x, wt, pick, c_out: int, stride: int, dtype: str, name: str):
    arg, f = pixel_gemm(bb, x, pick, c_out, stride, dtype)
    return bb.call_te(f, arg, wt, primfunc_name_hint=name)


def _common(call, kernel_layout: str) -> bool:
    at = call.attrs
    return (
        all(has_static_shape(a) for a in call.args)
        and has_static_shape(call)
        and at.data_layout == "NCHW"
        and at.kernel_layout == kernel_layout
        and at.out_layout == "NCHW"
        and int(at.groups) == 1
        and all(int(v) == 1 for v in at.dilation)
        and all(int(v) == 0 for v in at.padding)
        and all(int(d) == 1 for d in call.args[1].ty.shape.values[2:])
        and int(at.strides[0]) == int(at.strides[1])
    )


def _rewrite(bb, call):
    """The call as the GEMM kernel, or None when it is not a matched 1x1 conv."""
    if call.op.same_as(_CONV2D) and _common(call, "OIHW"):
        x, wt = call.args
        dtype = call.ty.dtype
        c_out, s = int(call.ty.shape.values[1]), int(call.attrs.strides[0])
        # "conv2d_...": cost_models.features.parse_kinds files it in the conv family
        return _emit(bb, x, wt, lambda w, o, i: w[o, i, 0, 0], c_out, s, dtype, "conv2d_pixels")
    if (
        call.op.same_as(_CONV2D_T)
        and _common(call, "IOHW")
        and int(call.attrs.strides[0]) == 1
        and all(int(v) == 0 for v in call.attrs.output_padding)
    ):
        (x, wt), dtype, c_out = call.args, call.ty.dtype, int(call.ty.shape.values[1])
        return _emit(
            bb, x, wt, lambda w, o, i: w[i, o, 0, 0], c_out, 1, dtype, "conv2d_transpose_pixels"
        )
    return None


def legalize_pointwise_convs(mod):
    """``mod`` with every matched 1x1 conv as the GEMM kernel above; the rest stays Relax."""

    @mutator
    class _M(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            new = _rewrite(self.builder_, call) if isinstance(call.op, tvm.ir.Op) else None
            return call if new is None else new

    m = _M(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(func))
    return m.builder_.get()
