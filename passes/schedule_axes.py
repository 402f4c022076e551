"""Which axes a register tile uses: the vector (lane) axis, the row axes, the rfactor axis.

``_find_vector_axis`` picks the lane iter of a conv/matmul block and the input read along it
(contiguously, with stride 2, or transposed: ``schedule_layouts.py`` then rewrites that
operand's layout); ``_find_rfactor_axis`` the reduction to split into lanes when no output
axis fits a vector; ``_row_axes`` the unrolled row axes whose rows share one vector load.
Used by ``schedule_tiling.py``; nothing here is public.
"""

from __future__ import annotations

from splitc.passes.schedule_blocks import _Block, _coef, _largest_divisor, _uses

__all__: list[str] = []  # internal to passes/schedule_*.py

# Unrolled accumulator rows of a tile at most (schedule_tiling's register budget: 8 rows x
# 2 vectors of the 32 zmm registers).
_MAX_ROWS = 8


def _find_vector_axis(info: _Block, lanes: int):
    """(spatial iter index, reader index) of the lane axis: for outputs whose rows are
    shorter than a vector, a channel (``_outer_lane``); else the output's innermost iter, read
    by some input along its innermost axis with stride 1 (preferred) or 2 (stride-2 convs,
    made contiguous by ``_unstride``), or on an outer axis by a matmul's B (``B[n, k]``,
    packed by ``_pack_transposed``)."""
    out_idx = [r.min for r in info.writes[0].region]
    if not out_idx:
        return None
    last = out_idx[-1]
    # No whole-vector tile along the output rows: weight-gradient windows (1-4 wide), 28/56-wide
    # images (1.75 vectors a row: 28x28 3x3 conv 296 -> 35 ms, 56x56 292 -> 49 ms with channel
    # lanes, one loaded-machine run) and 7/14-wide ones (ResNet-50 b8, 512 channels, 1 thread,
    # medians of 9 and 21 in one run each, row lanes -> channel lanes: 3x3 conv at 7x7 46.6 ->
    # 36.2 ms, its data gradient 50.8 -> 36.9, at 14x14 19.9 -> 18.7 and 20.5 -> 19.7; the
    # stride-2 data gradient's 7x7 phases 144 -> 65 ms, 14x14 phases 60.4 -> 37.2). 1x1 convs
    # at 7/14 do not get here: they are pixel GEMMs (passes/pointwise_convs.py).
    short = all(not last.same_as(iv.var) or e % lanes for iv, e in zip(info.iters, info.extents))
    found = _outer_lane(info, lanes) if short and _OUTER_LANES else None
    if found is not None:
        return found  # a channel fills the vector where a 3- or 4-wide output row cannot
    for stride in (1, 2):
        for i, iv in enumerate(info.iters):
            if info.kinds[i] != "S" or not last.same_as(iv.var):
                continue
            if _largest_divisor(info.extents[i], 2 * lanes) < 4:
                continue  # e.g. 10 classes: no vector tile; the parallel fallback is right
            if info.extents[i] < lanes and _full_rfactor_axis(info, lanes):
                # a 4-wide output row (the stride-2 weight gradient's 4x4 window) fills a
                # quarter of a 16-lane vector; rfactor over the image fills it: 12.5 -> 7.6 ms
                continue
            for j, rd in enumerate(info.reads):
                if not rd.region or rd.source.same_as(info.writes[0].source):
                    continue
                rlast = rd.region[-1].min
                if _uses(rlast, iv.var) and _coef(rlast, iv.var) == stride:
                    return i, j
    for i, iv in enumerate(info.iters):
        if info.kinds[i] == "S" and last.same_as(iv.var) and info.extents[i] % lanes == 0:
            j = _transposed_reader(info, i)
            if j is not None:
                return i, j  # _register_tile packs it
    return None


_OUTER_LANES = True  # False: rfactor for these (kept for measurements)


def _outer_lane(info: _Block, lanes: int):
    """(iter, reader) for a two-input reduction whose output rows are shorter than a vector
    (a weight gradient's 3x3 or 1x1 window): a spatial iter read by one input only, on one
    of its outer axes (a channel); ``_register_tile`` packs that input with the iter
    innermost, the other input supplies the rows, and the accumulator tile keeps the lanes
    contiguous: a GEMM tile (output x input channels) per window position instead of rfactor
    over the image rows. Measured against rfactor, same run, batch 32, 1 thread: 3x3 weight
    gradients 64ch 16x16 7.54 -> 5.92 ms, 32ch 32x32 8.36 -> 6.26 ms, stride-2 8.04 -> 5.74."""
    ins = [
        j
        for j, rd in enumerate(info.reads)
        if rd.region and not rd.source.same_as(info.writes[0].source)
    ]
    if len(ins) != 2:
        return None
    best, best_key = None, None
    for i, iv in enumerate(info.iters):
        if info.kinds[i] != "S" or info.extents[i] % lanes:
            continue
        users = [j for j in ins if any(_uses(r.min, iv.var) for r in info.reads[j].region)]
        if len(users) != 1:
            continue
        idx = [r.min for r in info.reads[users[0]].region]
        dims = [d for d, e in enumerate(idx) if _uses(e, iv.var)]
        if len(dims) != 1 or not idx[dims[0]].same_as(iv.var) or dims[0] == len(idx) - 1:
            continue
        # rows: an iter of the other input only, long enough for 8 accumulator rows (the
        # 3-channel first conv's weight gradient, 3 rows: 0.73 ms rfactor, 0.83 ms this way)
        other = ins[1 - ins.index(users[0])]
        rows = [
            k
            for k, kv in enumerate(info.iters)
            if info.kinds[k] == "S"
            and info.extents[k] >= _MAX_ROWS
            and any(_uses(r.min, kv.var) for r in info.reads[other].region)
            and not any(_uses(r.min, kv.var) for r in info.reads[users[0]].region)
        ]
        if not rows:
            continue
        key = info.extents[i]
        if best_key is None or key > best_key:
            best, best_key = (i, users[0]), key
    return best


def _transposed_reader(info: _Block, vi: int):
    """The reader of a matmul-like block that reads lane iter ``vi`` on an outer axis and a
    reduction on its innermost axis (B[n, k] of C[m, n] = A[m, k] B[n, k]), when the other
    reader does not depend on ``vi``; else None. Rows sums and softmax denominators have one
    reader and stay on the rfactor path."""
    var = info.iters[vi].var
    ins = [
        j
        for j, rd in enumerate(info.reads)
        if rd.region and not rd.source.same_as(info.writes[0].source)
    ]
    if len(ins) != 2:
        return None
    for j in ins:
        idx = [r.min for r in info.reads[j].region]
        dims = [d for d, e in enumerate(idx) if _uses(e, var)]
        if len(dims) != 1 or dims[0] == len(idx) - 1 or not idx[dims[0]].same_as(var):
            continue
        if not any(
            idx[-1].same_as(it.var) and kind == "R" for it, kind in zip(info.iters, info.kinds)
        ):
            continue
        other = ins[1 - ins.index(j)]
        if any(_uses(r.min, var) for r in info.reads[other].region):
            continue
        return j
    return None


def _full_rfactor_axis(info: _Block, lanes: int) -> bool:
    ri = _find_rfactor_axis(info, lanes)
    return ri is not None and _largest_divisor(info.extents[ri], lanes) == lanes


def _find_rfactor_axis(info: _Block, lanes: int):
    """A reduction iter that every read buffer depending on it reads along its innermost axis
    only, with stride 1 or 2; the longest such iter with all strides 1 wins, then the longest."""
    best, best_key = None, None
    for i, iv in enumerate(info.iters):
        if info.kinds[i] != "R" or _largest_divisor(info.extents[i], lanes) < 4:
            continue
        ok, used, unit = True, False, True
        for rd in info.reads:
            if rd.source.same_as(info.writes[0].source):
                continue
            idx = [r.min for r in rd.region]
            if not idx:
                continue
            coef = _coef(idx[-1], iv.var) if _uses(idx[-1], iv.var) else None
            elsewhere = any(_uses(e, iv.var) for e in idx[:-1])
            if coef in (1, 2) and not elsewhere:
                used = True
                unit = unit and coef == 1
            elif coef is not None or elsewhere:
                ok = False
        key = (unit, info.extents[i])
        if ok and used and (best_key is None or key > best_key):
            best, best_key = i, key
    return best


def _row_key(info: _Block, i: int):
    """Longest row axis first; among equals, one that some input reads along its innermost
    axis (an image row: 8 rows are one 32-byte run, not 8 lines): a 1x1 conv 8x256x56x56 ->
    64 with channel lanes took 31.0 ms with rows over the image height."""
    var = info.iters[i].var
    inner = any(rd.region and _uses(rd.region[-1].min, var) for rd in info.reads)
    return info.extents[i], inner


def _row_axes(info: _Block, vi: int, reader: int):
    """(first row iter, second row iter) for lane iter ``vi`` (either may be None).

    Row axis: a spatial iter the contiguous reader does not depend on, so one vector load of
    that reader serves ``rows`` rows (a conv's output channels, a matmul's rows). The costliest
    load is reused first: a stride-2 reader (4x the load work of a contiguous one on the
    stride-2 weight-gradient convs) before the contiguous one. Second row axis: when the reader
    that depends on the first row axis is itself a vector load (weight-gradient convs: both
    operands are read along the lane axis), a second axis it does not depend on, so each vector
    load feeds ``rows2`` (resp. ``rows``) FMAs instead of 1."""
    vvar = info.iters[vi].var
    readers = sorted(
        (
            j
            for j, rd in enumerate(info.reads)
            if rd.region
            and not rd.source.same_as(info.writes[0].source)
            and _uses(rd.region[-1].min, vvar)
        ),
        key=lambda j: -(_coef(info.reads[j].region[-1].min, vvar) or 0),
    ) + [reader]
    ri = None
    for j in readers:
        rd_idx = [r.min for r in info.reads[j].region]
        for i, iv in enumerate(info.iters):
            if i == vi or info.kinds[i] != "S" or info.extents[i] < 2:
                continue
            if any(_uses(e, iv.var) for e in rd_idx):
                continue
            if ri is None or _row_key(info, i) > _row_key(info, ri):
                ri = i
        if ri is not None:
            break
    r2 = None
    if ri is not None:
        for rd in info.reads:
            if not rd.region or rd.source.same_as(info.writes[0].source):
                continue
            idx = [r.min for r in rd.region]
            if not any(_uses(e, info.iters[ri].var) for e in idx) or not _uses(idx[-1], vvar):
                continue
            for i, iv in enumerate(info.iters):
                if i in (vi, ri) or info.kinds[i] != "S" or info.extents[i] < 2:
                    continue
                if any(_uses(e, iv.var) for e in idx):
                    continue
                if r2 is None or info.extents[i] > info.extents[r2]:
                    r2 = i
    return ri, r2
