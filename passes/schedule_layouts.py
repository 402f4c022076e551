"""Operand layouts for register tiles: packed transposed operands and stride-2 phases.

Before tiling, ``_register_tile`` makes every lane load contiguous: a matmul operand read
transposed (``B[n, k]``) is copied to ``[k, n]`` inside the kernel (``_pack_transposed``),
and an intermediate read with stride 2 along the lanes (stride-2 convs and their weight
gradients) is stored as its 2x2 phases (``_unstride``). Nothing here is public.
"""

from __future__ import annotations

from splitc.passes.schedule_blocks import _Block, _block_facts, _coef, _int, _largest_divisor, _uses
from tvm import tirx

__all__: list[str] = []  # internal to passes/schedule_*.py


def _pack_transposed(sch, info: _Block, vi: int, reader: int, lanes: int):
    """Copy a transposed lane operand (B[n, k]) into a buffer with the lane axis innermost
    (B'[k, n]) inside the kernel; (fresh facts, reader index). Measured in one run (1 thread,
    a loaded machine): 512x3072 @ (768x3072)^T 101 -> 48 ms, 512x768 @ (3072x768)^T 176 ->
    58 ms against rfactor over k."""
    var = info.iters[vi].var
    src = info.reads[reader].source
    idx = [r.min for r in info.reads[reader].region]
    d = next(k for k, e in enumerate(idx) if _uses(e, var))
    nd = len(idx)
    perm = [k for k in range(nd) if k != d] + [d]
    cb = sch.cache_read(info.rv, reader, "global")
    index_map = tirx.IndexMap.from_func(
        lambda *ax: [ax[k] for k in perm], ndim=nd, index_dtype=str(src.shape[0].ty)
    )
    sch.transform_layout(cb, ("write", 0), index_map)
    loops = sch.get_loops(cb)
    ordered = [loops[k] for k in perm]
    sch.reorder(*ordered)
    ext = [_int(sch.get(lp).extent) for lp in ordered]
    # 16 x 16 tiles, vectorised along the source's contiguous axis (k): 768x3072 in 1.53 ms,
    # 2.26 ms vectorised along the destination's
    a_o, a_i = sch.split(ordered[-2], [None, _largest_divisor(ext[-2], lanes)])
    b_o, b_i = sch.split(ordered[-1], [None, lanes])
    sch.reorder(*ordered[:-2], a_o, b_o, b_i, a_i)
    sch.vectorize(a_i)
    outer = [*ordered[:-2], a_o]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    info = _block_facts(sch, info.rv)
    for j, rd in enumerate(info.reads):
        if rd.region and _uses(rd.region[-1].min, var) and _coef(rd.region[-1].min, var) == 1:
            return info, j
    raise ValueError("packed operand is not read along the lane axis")


def _unstride(sch, info: _Block, vi: int) -> _Block:
    """Store each intermediate buffer that ``info`` reads with stride 2 along lane iter ``vi``
    (the padded input of a stride-2 conv or weight gradient) as its even and odd phases:
    ``[..., h, w] -> [..., h % 2, w % 2, h // 2, w // 2]``, so the lane reads are contiguous.
    Returns fresh facts when a layout changed. Measured (batch 32, 32x32 -> 16x16, 1 thread):
    3x3 stride-2 weight gradient 12.5 -> 7.6 ms, its 1x1 shortcut 4.6 -> 2.3 ms, the stride-2
    forward conv 4.6 -> 3.9 ms (two loads and a shuffle per vector before)."""
    var = info.iters[vi].var
    written = []
    for p in sch.get_producers(info.rv):
        written += [w.source for w in sch.get(p).writes]
    changed = False
    for j, rd in enumerate(info.reads):
        idx = [r.min for r in rd.region]
        if len(idx) < 2 or not _uses(idx[-1], var) or _coef(idx[-1], var) != 2:
            continue
        if not any(b.same_as(rd.source) for b in written):
            continue  # a function parameter: its layout is the caller's
        shape = [_int(d) for d in rd.source.shape]
        rows_strided = any(_coef(idx[-2], iv.var) == 2 for iv in info.iters)
        dims = [len(idx) - 2, len(idx) - 1] if rows_strided else [len(idx) - 1]
        if any(shape[d] is None or shape[d] % 2 for d in dims):
            continue
        index_map = tirx.IndexMap.from_func(
            _phases(len(idx), dims), ndim=len(idx), index_dtype=str(rd.source.shape[0].ty)
        )
        sch.transform_layout(info.rv, ("read", j), index_map)
        changed = True
    return _block_facts(sch, info.rv) if changed else info


def _phases(ndim: int, dims: list[int]):
    def index_map(*ax):
        keep = [ax[d] for d in range(ndim) if d not in dims]
        return [*keep, *[ax[d] % 2 for d in dims], *[ax[d] // 2 for d in dims]]

    return index_map
