"""Conv weight gradients for GPU targets: an im2col GEMM over exactly the filter's window.

``relax.transform.Gradient`` writes the weight gradient of ``conv2d(x, w, stride=s, pad=p)``
as ``conv2d(x, dy, data_layout="CNHW", kernel_layout="IOHW", dilation=s)`` (plus a
``strided_slice`` when the window it computes is wider than the filter, see
``passes/conv_weight_grads.py``). On a GPU that conv is a GEMM with few outputs and a long
reduction: ``O x (I*kh*kw)`` outputs, each a sum over ``N*H*W`` products. dlight's matmul
rule tiles the outputs only and gathers ``x``'s windows inside its tile loads, so ResNet-50's
stem (64 x 147 outputs, 401k-long sums at batch 32) took 126 ms of a 337 ms step on an H100
(cuDNN's whole step: 45 ms), and splitting the sum alone still left a 3x3 gradient at 1 TFLOP/s.
Here the pair becomes four kernels:

    cols[g, (i, a, b), k] = x_pad[n, i, a + s*h, b + s*w]     (im2col, (n, h, w) = chunk g, k)
    dys[g, o, k]          = dy[n, o, h, w]
    part[g, o, c]         = sum_k dys[g, o, k] * cols[g, c, k]  (one batched NT GEMM)
    dw[o, i, a, b]        = sum_g part[g, o, (i, a, b)]

so the GEMM reads two dense operands, as the transformer matmuls that dlight runs at ~17
TFLOP/s in fp32 on the H100. The chunks (``nb`` images by ``band`` rows of dy) split the
reduction so that the partial sums give the GPU enough thread blocks (``_BLOCKS``) while each
stays at least ``_MIN_K`` long and all of them under ``_PART_BYTES``. The gather costs one
write and one read of ``I*kh*kw x N*H*W`` floats (236 MB for ResNet-50's stem at batch 32,
~0.15 ms of HBM3); a gradient whose gather would exceed ``_COLS_BYTES`` (1 GiB) keeps TVM's
form.

Matched: a ``conv2d`` with those layouts, static shapes, groups 1, ``strides`` 1 (the
forward's dilation) and equal dilations, alone or under a ``strided_slice`` from 0 with step 1
that is its only user. ``passes/build.py`` runs it in the GPU pipeline before legalization;
llvm builds use ``passes/conv_weight_grads.py`` instead.
"""

from __future__ import annotations

from splitc.passes.conv_weight_grads import is_weight_grad_conv, replace_weight_grads
from tvm import te

__all__ = ["choose_split", "im2col_te", "legalize_gpu_weight_grads"]

# Thread blocks to aim for: two waves of an H100's 132 SMs (an Orin has 8 or 16, so any
# split that fills an H100 fills it too).
_BLOCKS = 264
# dlight's fp32 matmul tile (outputs per thread block), used to count the blocks of a split.
_TILE_M, _TILE_N = 32, 64
# Shortest partial sum worth a thread block: below this the block's tile loads dominate.
_MIN_K = 256
# The partial sums are written once and read once by the final sum: 64 MiB is ~40 us of HBM3.
_PART_BYTES = 64 << 20
# Largest im2col buffer: ResNet-50's stem at batch 32 needs 236 MB; a weight gradient that
# would need more than this keeps TVM's form (slower, no extra memory) instead.
_COLS_BYTES = 1 << 30


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


def _chunk(k, nb: int, band: int, gw: int):
    """(image, dy row, dy column) offsets of position ``k`` of a partial sum's chunk."""
    return k // (band * gw), (k // gw) % band, k % gw


def im2col_te(x, stride: int, pad: list[int], kh: int, kw: int, gh: int, gw: int, split):
    """``cols[g, (i, a, b), k] = x_pad[n, i, a + s*h, b + s*w]`` for the chunk ``g`` of
    ``nb`` images by ``band`` dy rows (``split``) and ``k`` = (n, h, w) inside it."""
    n, ci, h, w = (int(d) for d in x.shape)
    nb, band = split
    g2 = gh // band
    pt, pl = pad[:2]

    def col(g, c, k):
        dn, dh, dw = _chunk(k, nb, band, gw)
        i, a, b = c // (kh * kw), (c // kw) % kh, c % kw
        hh = a + stride * ((g % g2) * band + dh) - pt
        ww = b + stride * dw - pl
        inside = te.all(hh >= 0, hh < h, ww >= 0, ww < w)
        return te.if_then_else(inside, x[(g // g2) * nb + dn, i, hh, ww], te.const(0, x.dtype))

    return te.compute(((n // nb) * g2, ci * kh * kw, nb * band * gw), col, name="cols")


def dy_chunks_te(dy, split):
    """``dys[g, o, k] = dy[n, o, h, w]``, the same chunks as ``im2col_te``."""
    n, co, gh, gw = (int(d) for d in dy.shape)
    nb, band = split
    g2 = gh // band

    def get(g, o, k):
        dn, dh, dw = _chunk(k, nb, band, gw)
        return dy[(g // g2) * nb + dn, o, (g % g2) * band + dh, dw]

    return te.compute(((n // nb) * g2, co, nb * band * gw), get, name="dys")


def batched_nt_matmul_te(a, b, dtype: str):
    """``part[g, o, c] = sum_k a[g, o, k] * b[g, c, k]``: dlight's GPU matmul rule tiles it."""
    g, m, k = (int(d) for d in a.shape)
    nn = int(b.shape[1])
    rk = te.reduce_axis((0, k), "rk")
    return te.compute(
        (g, m, nn),
        lambda p, i, j: te.sum(a[p, i, rk].astype(dtype) * b[p, j, rk].astype(dtype), axis=rk),
        name="dw_part",
    )


def sum_partials_te(part, ci: int, kh: int, kw: int):
    """``dw[o, i, a, b] = sum_g part[g, o, (i, a, b)]``."""
    g, co = int(part.shape[0]), int(part.shape[1])

    def at(p, o, i, a, b):
        return part[p, o, (i * kh + a) * kw + b]

    if g == 1:
        return te.compute((co, ci, kh, kw), lambda o, i, a, b: at(0, o, i, a, b), name="dw")
    rg = te.reduce_axis((0, g), "rg")
    return te.compute(
        (co, ci, kh, kw), lambda o, i, a, b: te.sum(at(rg, o, i, a, b), axis=rg), name="dw"
    )


def _is_weight_grad(call) -> bool:
    return is_weight_grad_conv(call) and _cols_bytes(call) <= _COLS_BYTES


def _cols_bytes(call) -> int:
    """Bytes of the im2col buffer, at most: the conv's window bounds the filter."""
    n, ci = (int(d) for d in call.args[0].ty.shape.values[:2])
    gh, gw = (int(d) for d in call.args[1].ty.shape.values[2:])
    wh, ww = (int(d) for d in call.ty.shape.values[2:])
    return n * ci * wh * ww * gh * gw * 4


def _emit(bb, conv, kh: int, kw: int):
    """Four kernels: the im2col gather, dy in the same chunks, one batched GEMM of partial
    sums, their sum (module docstring)."""
    at = conv.attrs
    pad = [int(v) for v in at.padding]
    s, dtype = int(at.dilation[0]), conv.ty.dtype
    x, dy = conv.args
    n, ci = (int(d) for d in x.ty.shape.values[:2])
    _, co, gh, gw = (int(d) for d in dy.ty.shape.values)
    split = choose_split(n, gh, gw, co, ci * kh * kw)
    # "conv2d_...": cost_models.features.parse_kinds files the kernels in the conv family
    cols = bb.emit_te(
        im2col_te, x, s, pad, kh, kw, gh, gw, split, primfunc_name_hint="conv2d_wgrad_cols"
    )
    dys = bb.emit_te(dy_chunks_te, dy, split, primfunc_name_hint="conv2d_wgrad_dy")
    part = bb.emit_te(
        batched_nt_matmul_te, dys, cols, dtype, primfunc_name_hint="conv2d_wgrad_gemm"
    )
    return bb.call_te(sum_partials_te, part, ci, kh, kw, primfunc_name_hint="conv2d_wgrad_sum")


def legalize_gpu_weight_grads(mod):
    """``mod`` with every matched weight-gradient conv (and its slice) as the kernels above."""
    return replace_weight_grads(mod, _is_weight_grad, _emit)
