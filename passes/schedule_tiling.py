"""Block facts and the register-tiling rules behind ``passes/schedule_rules.py``.

:class:`_Block` holds plain facts about one root block; ``_register_tile`` tiles a conv or
matmul into register accumulators (parallel outer loops, unrolled rows, vector lanes),
``_find_vector_axis`` / ``_find_rfactor_axis`` pick its lane axis, and
``_parallel_reduction`` is the generic fallback for any reduction. Before tiling, an operand
read with stride 2 along the lanes (stride-2 convs) is stored as 2x2 phases and a matmul
operand read transposed (``B[n, k]``) is copied to ``[k, n]`` inside the kernel, so every
lane load is contiguous. Loop order and K panels follow the lane operand's size (L2).

Public: :class:`TileKnobs` (one tile shape) and :func:`tile_candidates` (shapes worth timing
for a block, the heuristic first) for the knob tuner (``passes/tune_knobs.py``);
``schedule_prim_func(func, target, knobs=...)`` passes a choice through to
``_register_tile``. Everything else is driven per kernel by ``passes/schedule_rules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm
from tvm import sym, tirx

__all__ = ["TileKnobs", "tile_candidates"]  # the rest: passes/schedule_rules.py only

_GET_REALIZE = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")

# Register budget for the accumulator tile: AVX-512 has 32 zmm registers; 16 accumulators
# leave room for the broadcast weights and the input vector (rt=8 rows x 2 vectors).
_MAX_ACC_VECTORS = 16
_MAX_ROWS = 8
# Below this many iterations a parallel loop costs more in thread wake-up (~5 us on the
# dev box) than it saves.
_MIN_PARALLEL_WORK = 4096
# Row tiles go innermost above this lane-operand size (2x Zen4's 1 MiB L2: at 1.5 MB the
# lanes-innermost order still wins); K panels of 256 (a 256 x 32 panel of B is 32 KiB, L1d).
_LANE_OPERAND_BYTES = 1 << 21
_K_BLOCK = 256
# Rows innermost parallelises over lane tiles only: keep it to kernels with at least this
# many (a 1x1 weight gradient 512 <- 128 channels at 28x28 has 8 of 32 lanes: 28.0 -> 13.5 ms
# rows innermost, 1 thread; fewer tasks than cores idle part of a many-core board).
_MIN_TASKS = 8


def _int(expr) -> int | None:
    return int(expr) if isinstance(expr, tirx.IntImm | int) else None


def _vars_in(expr) -> list:
    return list(tirx.analysis.undefined_vars(expr))


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in _vars_in(expr))


def _coef(expr, var) -> int | None:
    """Coefficient of ``var`` in ``expr`` when ``expr`` is linear in it, else None."""
    try:
        res = sym.detect_linear_equation(expr, [var])
    except Exception:  # noqa: BLE001
        return None
    if len(res) != 2:
        return None
    return _int(sym.Analyzer().simplify(res[0]))


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


class _Block:
    """Plain facts about one root block whose loops map 1-1 onto its iter vars."""

    def __init__(self, sch, rv):
        self.rv = rv
        stmt = sch.get(rv)
        self.name = stmt.name_hint
        self.loops = list(sch.get_loops(rv))
        self.iters = list(stmt.iter_vars)
        self.kinds = [
            "S"
            if iv.iter_type == tirx.IterVar.DataPar
            else "R"
            if iv.iter_type == tirx.IterVar.CommReduce
            else "O"
            for iv in self.iters
        ]
        self.extents = [_int(iv.dom.extent) for iv in self.iters]
        self.writes = list(stmt.writes)
        self.reads = list(stmt.reads)
        self.has_init = stmt.init is not None
        self.sch = sch  # for tile_candidates (it tiles an rfactor block on a copy)

    @property
    def injective(self) -> bool:
        return all(k == "S" for k in self.kinds)


def _block_facts(sch, rv) -> _Block | None:
    """Facts about ``rv`` when each iter var is bound to exactly one loop var, else None.

    ``info.loops[i]`` is the loop bound to iter ``i`` (the loop order may differ, e.g. after
    ``rfactor``)."""
    info = _Block(sch, rv)
    if len(info.loops) != len(info.iters) or "O" in info.kinds or None in info.extents:
        return None
    bindings = _bindings(sch, rv)
    if bindings is None:
        return None
    by_var = {}
    for loop in info.loops:
        by_var[sch.get(loop).loop_var] = loop
    ordered = []
    for value in bindings:
        loop = next((l for v, l in by_var.items() if v.same_as(value)), None)
        if loop is None:
            return None
        ordered.append(loop)
    if len({sch.get(l).loop_var for l in ordered}) != len(ordered):
        return None
    info.loops = ordered
    return info


def _bindings(sch, rv):
    try:
        return list(_GET_REALIZE(sch, rv).iter_values)
    except Exception:  # noqa: BLE001
        return None


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
    # No whole-vector tile along the output rows: weight-gradient windows (1-4 wide) and
    # 28/56-wide images (1.75 vectors a row: 28x28 3x3 conv 296 -> 35 ms, 56x56 292 -> 49 ms
    # with channel lanes, one loaded-machine run). 7/14-wide rows keep one partial vector
    # (1x1 conv 14x14: 24.7 ms that way, 34.0 ms with channel lanes).
    short = all(
        not last.same_as(iv.var) or (e % lanes and (e <= 4 or e > lanes))
        for iv, e in zip(info.iters, info.extents)
    )
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


@dataclass(frozen=True)
class TileKnobs:
    """Tile shape of one register-tiled block, for a tuner (``tile_candidates`` lists some).

    ``lane_tile``: elements of the vector axis per tile (a divisor of its extent, >= 4);
    ``rows`` / ``rows2``: unrolled rows of the first / second row axis (divisors of their
    extents; 1 when the block has no such axis); ``rows_inner``: order the parallel tile
    loops so that row tiles are innermost (consecutive tasks reuse one panel of the lane-axis
    operand, e.g. K x lane_tile of a matmul's B, from L2) instead of lane tiles innermost
    (consecutive tasks reuse the rows of A); ``k_block``: split the longest reduction loop
    into ``k_block``-long panels and run them outside the tile loops (0: no split).
    """

    lane_tile: int
    rows: int = 1
    rows2: int = 1
    rows_inner: bool = False
    k_block: int = 0


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


def _lane_operand_bytes(info: _Block, vi: int, reader: int) -> int:
    """Bytes of the lane reader that one pass over the reduction reads: reduction iters and the
    lane axis it depends on (a matmul's K x N of B; per batch element for a batched B)."""
    idx = [r.min for r in info.reads[reader].region]
    n = 4
    for i, iv in enumerate(info.iters):
        if (i == vi or info.kinds[i] == "R") and any(_uses(e, iv.var) for e in idx):
            n *= info.extents[i]
    return n


def _lane_tasks(info: _Block, vi: int, reader: int, vt: int) -> int:
    """Parallel tasks when row tiles go innermost: lane tiles x the lane reader's own outer
    spatial loops (a batched B's batch)."""
    idx = [r.min for r in info.reads[reader].region]
    n = info.extents[vi] // vt
    for i, iv in enumerate(info.iters):
        if i != vi and info.kinds[i] == "S" and any(_uses(e, iv.var) for e in idx):
            n *= info.extents[i]
    return n


def _lane_tile(ext: int, lanes: int) -> int:
    """Whole vectors (2 or 1) when they divide the axis, else at most one partial vector: a
    28-wide tile (1.75 vectors x 8 rows) ran a 28x28 conv at 12.5 GF/s, 14 x 8 at 90."""
    for vt in (2 * lanes, lanes):
        if ext % vt == 0:
            return vt
    return _largest_divisor(ext, lanes)


def _heuristic_knobs(info: _Block, vi: int, reader: int, ri, r2, lanes: int) -> TileKnobs:
    vt = _lane_tile(info.extents[vi], lanes)
    vecs = -(-vt // lanes)
    rt2 = _largest_divisor(info.extents[r2], 4) if r2 is not None else 1
    max_rows = max(1, min(_MAX_ROWS, _MAX_ACC_VECTORS // (vecs * rt2)))
    rt = _largest_divisor(info.extents[ri], max_rows) if ri is not None else 1
    # Row tiles innermost when the lane operand does not fit in L2 (1 MiB on Zen4), e.g. B of
    # 512x768 @ 768x3072 (9.4 MB): 25.7 -> 18.4 ms (min of 9); below that the lanes-innermost
    # order wins (3072x512 @ 512x768, B 1.5 MB: 24.9 vs 38.5 ms rows innermost).
    rows_inner = (
        ri is not None
        and _lane_operand_bytes(info, vi, reader) > _LANE_OPERAND_BYTES
        and _lane_tasks(info, vi, reader, vt) >= _MIN_TASKS
    )
    # K panels for long reductions: 512x3072 @ 3072x768 24.9 -> 22.7 ms with 256-long panels;
    # no gain at K=512 (25.0 vs 25.9 ms).
    reds = [e for e, k in zip(info.extents, info.kinds) if k == "R"]
    k = max(reds) if reds else 0
    kb = _largest_divisor(k, _K_BLOCK) if rows_inner and k >= 4 * _K_BLOCK else 0
    return TileKnobs(vt, rt, rt2, rows_inner, kb if kb >= _K_BLOCK // 2 else 0)


def _rfactor_block(sch, info: _Block, ri: int, lanes: int) -> _Block:
    """Split reduction iter ``ri`` by the vector width and rfactor the lane part; facts about
    the factored block (the one ``_register_tile`` tiles on the rfactor path)."""
    ext = info.extents[ri]
    vt = _largest_divisor(ext, lanes)
    if vt < 4:
        raise ValueError(f"reduction extent {ext} has no divisor >= 4")
    loops = info.loops
    r_o, r_i = sch.split(loops[ri], [None, vt])
    # Move the lane loop innermost among the reductions so rfactor sees it last.
    reds_before = [loops[i] for i in range(len(loops)) if info.kinds[i] == "R" and i != ri]
    spat = [loops[i] for i in range(len(loops)) if info.kinds[i] == "S"]
    sch.reorder(*spat, *reds_before, r_o, r_i)
    rf = sch.rfactor(r_i, factor_axis=len(info.writes[0].region))
    rf_info = _block_facts(sch, rf)
    if rf_info is None:
        raise ValueError("rfactor block is not in normal form")
    return rf_info


def _tile_view(info: _Block, lanes: int):
    """(block, lane iter, lane reader) that the tile rule tiles for ``info``: the block itself,
    or its rfactor block (on a copy of the schedule), or None when neither rule applies."""
    sch = info.sch.copy()
    blk = _block_facts(sch, sch.get_sblock(info.name))
    found = _find_vector_axis(blk, lanes)
    if found is None:
        ri = _find_rfactor_axis(blk, lanes)
        if ri is None:
            return None
        blk = _rfactor_block(sch, blk, ri, lanes)
        found = _find_vector_axis(blk, lanes)
        if found is None:
            return None
    vi, reader = found
    if not _uses(blk.reads[reader].region[-1].min, blk.iters[vi].var):
        blk, reader = _pack_transposed(sch, blk, vi, reader, lanes)
    return _unstride(sch, blk, vi), vi, reader


def tile_candidates(info: _Block, lanes: int) -> list[TileKnobs]:
    """Up to 12 tile shapes worth timing for the block ``info`` (the heuristic first).

    ``info`` is a root block as the tile rules see it (``_block_facts``); for a block that
    is tiled through ``rfactor`` (weight-gradient convs) the shapes are those of the factored
    block. Every candidate is valid for the block (its sizes divide the axes). Empty when no
    tile rule applies (the kernel's schedule has no tile knob)."""
    view = _tile_view(info, lanes)
    if view is None:
        return []
    blk, vi, reader = view
    ri, r2 = _row_axes(blk, vi, reader)
    best = _heuristic_knobs(blk, vi, reader, ri, r2, lanes)
    out = [best]

    def add(k: TileKnobs) -> None:
        try:
            _check_knobs(blk, vi, ri, r2, k)
        except ValueError:
            return
        if k not in out and (k.rows_inner or not k.k_block):
            out.append(k)

    reds = [e for e, kd in zip(blk.extents, blk.kinds) if kd == "R"]
    k_ext = max(reds) if reds else 0
    add(replace(best, rows_inner=not best.rows_inner, k_block=0))
    for kb in (_K_BLOCK, 2 * _K_BLOCK, _K_BLOCK // 2, _largest_divisor(k_ext, k_ext // 2)):
        if k_ext > kb >= 8:
            add(replace(best, rows_inner=True, k_block=kb))
    r_ext = blk.extents[ri] if ri is not None else 1
    r2_ext = blk.extents[r2] if r2 is not None else 1
    # accumulator budgets around the heuristic's 16 vectors (32 zmm registers in all)
    v_ext = blk.extents[vi]
    partial = (_largest_divisor(v_ext, lanes), _largest_divisor(v_ext, lanes // 2))
    for vt in dict.fromkeys((best.lane_tile, lanes, 2 * lanes, *partial)):
        vecs = -(-vt // lanes)
        for acc in (16, 24, 12, 8):
            for rows2 in dict.fromkeys((best.rows2, _largest_divisor(r2_ext, 2))):
                rows = _largest_divisor(r_ext, max(1, acc // (vecs * rows2)))
                add(replace(best, lane_tile=vt, rows=rows, rows2=rows2))
    return out[:12]


def _check_knobs(info: _Block, vi: int, ri, r2, knobs: TileKnobs) -> None:
    for name, axis, size in (
        ("lane_tile", vi, knobs.lane_tile),
        ("rows", ri, knobs.rows),
        ("rows2", r2, knobs.rows2),
    ):
        ext = info.extents[axis] if axis is not None else 1
        if size < 1 or ext % size:
            raise ValueError(f"{name}={size} does not divide the axis extent {ext}")
    if knobs.lane_tile < 4:
        raise ValueError(f"lane_tile={knobs.lane_tile} is below 4")
    reds = [e for e, k in zip(info.extents, info.kinds) if k == "R"]
    kb = knobs.k_block
    if kb < 0 or (kb and (not reds or max(reds) % kb or max(reds) == kb)):
        raise ValueError(
            f"k_block={kb} does not divide the longest reduction extent "
            f"{max(reds) if reds else 0} into 2 or more panels"
        )


def _register_tile(
    sch, info: _Block, vi: int, reader: int, lanes: int, knobs: TileKnobs | None = None
) -> None:
    """Tile a reduction: parallel spatial outer loops, reductions, unrolled rows, vector lanes.

    ``knobs`` None: the heuristic tile (``tile_candidates(...)[0]``)."""
    vext = info.extents[vi]
    if _largest_divisor(vext, 2 * lanes) < 4:
        raise ValueError(f"vector axis extent {vext} has no divisor >= 4")
    rlast = info.reads[reader].region[-1].min
    if not _uses(rlast, info.iters[vi].var):
        info, reader = _pack_transposed(sch, info, vi, reader, lanes)
    info = _unstride(sch, info, vi)
    ri, r2 = _row_axes(info, vi, reader)
    if knobs is None:
        knobs = _heuristic_knobs(info, vi, reader, ri, r2, lanes)
    _check_knobs(info, vi, ri, r2, knobs)
    vt, rt, rt2 = knobs.lane_tile, knobs.rows, knobs.rows2
    if rt == 1:
        ri = None
    if rt2 == 1:
        r2 = None

    kb = knobs.k_block
    out_idx = [r.min for r in info.writes[0].region]
    lane_dim = next((d for d, e in enumerate(out_idx) if e.same_as(info.iters[vi].var)), None)
    outer_lane = lane_dim is not None and lane_dim != len(out_idx) - 1
    # k_block: a matmul's output itself accumulates across K panels (a register tile cannot
    # live across the row tiles of a panel), so no local write cache; with outer lanes the
    # task's accumulators (all rows x lane_tile) are a local buffer (L1) instead.
    local_wb = None if kb and not outer_lane else sch.cache_write(info.rv, 0, "local")
    if outer_lane:
        # an outer lane (a weight gradient's input channel): the accumulator tile keeps the
        # lanes contiguous (a register vector); the write-back transposes it
        nd = len(out_idx)
        perm = [d for d in range(nd) if d != lane_dim] + [lane_dim]
        dtype = str(info.writes[0].source.shape[0].ty)
        sch.transform_layout(
            info.rv,
            ("write", 0),
            tirx.IndexMap.from_func(lambda *ax: [ax[d] for d in perm], ndim=nd, index_dtype=dtype),
        )
    loops = info.loops
    v_o, v_i = sch.split(loops[vi], [None, vt])
    if ri is not None:
        r_o, r_i = sch.split(loops[ri], [None, rt])
    if r2 is not None:
        r2_o, r2_i = sch.split(loops[r2], [None, rt2])
    spatial_outer = [i for i in range(len(loops)) if info.kinds[i] == "S" and i not in (vi, ri, r2)]
    reds = [loops[i] for i in range(len(loops)) if info.kinds[i] == "R"]
    tiles = ([r2_o] if r2 is not None else []) + ([r_o] if ri is not None else [])
    if knobs.rows_inner:
        # the lane reader's own loops, its lane tile, then every loop it does not depend on:
        # consecutive tasks read the same panel of it (K x lane_tile of a matmul's B).
        lane_rd = [r.min for r in info.reads[reader].region]
        dep = [i for i in spatial_outer if any(_uses(e, info.iters[i].var) for e in lane_rd)]
        par = [loops[i] for i in dep] + [v_o]
        ser = [loops[i] for i in spatial_outer if i not in dep] + tiles
    else:
        par, ser = [loops[i] for i in spatial_outer] + tiles, [v_o]
    inner = ([r2_i] if r2 is not None else []) + ([r_i] if ri is not None else []) + [v_i]
    if kb:
        ext = [_int(sch.get(l).extent) for l in reds]
        longest = max(range(len(reds)), key=lambda i: ext[i])  # _check_knobs: divisible
        k_o, k_i = sch.split(reds[longest], [None, kb])
        if outer_lane:
            # every reduction but the kb-long panel outside the row tiles
            others = [r for j, r in enumerate(reds) if j != longest]
            sch.reorder(*par, *others, k_o, *ser, k_i, *inner)
            fused = sch.fuse(*par) if len(par) > 1 else par[0]
            sch.reverse_compute_at(local_wb, fused)
            k_o = others[0] if others else k_o  # decompose the init before all panels
            reds = [k_i]
        else:
            reds = reds[:longest] + [k_i] + reds[longest + 1 :]
            # Within one task, a K panel of the lane reader (kb x lane_tile) stays in L1 while
            # all row tiles pass over it; the output tile is reloaded once per panel.
            sch.reorder(*par, k_o, *ser, *reds, *inner)
            fused = sch.fuse(*par) if len(par) > 1 else par[0]
    else:
        outer = par + ser
        sch.reorder(*outer, *reds, *inner)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.reverse_compute_at(local_wb, fused)
    # Parallelise the fused outer spatial loops; keep at least one vector tile per task.
    sch.parallel(fused)
    # Vectorise before decompose_reduction: vectorize needs the block to still own its init;
    # the init loops copied by decompose_reduction keep the vectorized/unrolled kinds.
    if ri is not None:
        sch.unroll(r_i)
    if r2 is not None:
        sch.unroll(r2_i)
    sch.vectorize(v_i)
    if kb:
        sch.decompose_reduction(info.rv, k_o)
    elif reds:
        sch.decompose_reduction(info.rv, reds[0])
    if local_wb is None:
        return
    wb_loops = sch.get_loops(local_wb)
    # write-back: innermost loop is the output's innermost axis (vt wide after compute_at)
    if len(wb_loops) > 1:
        wl = wb_loops[-1]
        ext = _int(sch.get(wl).extent)
        if ext and ext % 4 == 0:
            sch.vectorize(wl)


def _parallel_reduction(sch, info: _Block) -> None:
    """Generic fallback for a reduction: spatial loops outermost, fused, parallel."""
    s_loops = [l for l, k in zip(info.loops, info.kinds) if k == "S"]
    r_loops = [l for l, k in zip(info.loops, info.kinds) if k == "R"]
    if not s_loops:
        return
    sch.reorder(*s_loops, *r_loops)
    fused = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0]
    work = 1
    for e, k in zip(info.extents, info.kinds):
        work *= e
    if work >= _MIN_PARALLEL_WORK:
        sch.parallel(fused)
