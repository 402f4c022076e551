"""Block facts and the register-tiling rules behind ``passes/schedule_rules.py``.

:class:`_Block` holds plain facts about one root block; ``_register_tile`` tiles a conv or
matmul into register accumulators (parallel outer loops, unrolled rows, vector lanes),
``_find_vector_axis`` / ``_find_rfactor_axis`` pick its lane axis, and
``_parallel_reduction`` is the generic fallback for any reduction. Nothing here is public;
``passes/schedule_rules.py`` drives these rules per kernel.
"""

from __future__ import annotations

import tvm
from tvm import sym, tirx

__all__: list[str] = []  # private rules; used by passes/schedule_rules.py only

_GET_REALIZE = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")

# Register budget for the accumulator tile: AVX-512 has 32 zmm registers; 16 accumulators
# leave room for the broadcast weights and the input vector (rt=8 rows x 2 vectors).
_MAX_ACC_VECTORS = 16
_MAX_ROWS = 8
# Below this many iterations a parallel loop costs more in thread wake-up (~5 us on the
# dev box) than it saves.
_MIN_PARALLEL_WORK = 4096


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
    """(spatial iter index, reader index) such that the output's innermost index is that
    iter and some read buffer reads it along its innermost axis with stride 1 (preferred) or
    2 (a stride-2 conv: LLVM turns the strided vector load into two loads and a shuffle)."""
    out_idx = [r.min for r in info.writes[0].region]
    if not out_idx:
        return None
    last = out_idx[-1]
    for stride in (1, 2):
        for i, iv in enumerate(info.iters):
            if info.kinds[i] != "S" or not last.same_as(iv.var):
                continue
            if _largest_divisor(info.extents[i], 2 * lanes) < 4:
                continue  # e.g. 10 classes: no vector tile; the parallel fallback is right
            for j, rd in enumerate(info.reads):
                if not rd.region or rd.source.same_as(info.writes[0].source):
                    continue
                rlast = rd.region[-1].min
                if _uses(rlast, iv.var) and _coef(rlast, iv.var) == stride:
                    return i, j
    return None


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


def _register_tile(sch, info: _Block, vi: int, reader: int, lanes: int) -> None:
    """Tile a reduction: parallel spatial outer loops, reductions, unrolled rows, vector lanes."""
    vext = info.extents[vi]
    vt = _largest_divisor(vext, 2 * lanes)
    if vt < 4:
        raise ValueError(f"vector axis extent {vext} has no divisor >= 4")
    # Row axis: a spatial iter the contiguous reader does not depend on, so one vector load
    # of that reader serves rt rows (a conv's output channels, a matmul's rows).
    # Prefer reusing the costliest load: a stride-2 reader (4x the load work of a contiguous
    # one on the stride-2 weight-gradient convs) before the contiguous one.
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
            if ri is None or info.extents[i] > info.extents[ri]:
                ri = i
        if ri is not None:
            break
    # Second row axis: when the reader that depends on the first row axis is itself a vector
    # load (weight-gradient convs: both operands are read along the lane axis), block a second
    # axis it does not depend on, so each vector load feeds rt2 (resp. rt) FMAs instead of 1.
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
    vecs = max(1, vt // lanes)
    rt2 = _largest_divisor(info.extents[r2], 4) if r2 is not None else 1
    max_rows = max(1, min(_MAX_ROWS, _MAX_ACC_VECTORS // (vecs * rt2)))
    rt = _largest_divisor(info.extents[ri], max_rows) if ri is not None else 1
    if rt2 == 1:
        r2 = None

    local_wb = sch.cache_write(info.rv, 0, "local")
    loops = info.loops
    v_o, v_i = sch.split(loops[vi], [None, vt])
    if ri is not None:
        r_o, r_i = sch.split(loops[ri], [None, rt])
    if r2 is not None:
        r2_o, r2_i = sch.split(loops[r2], [None, rt2])
    spatial_outer = [
        loops[i] for i in range(len(loops)) if info.kinds[i] == "S" and i not in (vi, ri, r2)
    ]
    reds = [loops[i] for i in range(len(loops)) if info.kinds[i] == "R"]
    outer = spatial_outer + ([r2_o] if r2 is not None else [])
    outer += ([r_o] if ri is not None else []) + [v_o]
    inner = ([r2_i] if r2 is not None else []) + ([r_i] if ri is not None else []) + [v_i]
    sch.reorder(*outer, *reds, *inner)
    # Parallelise the fused outer spatial loops; keep at least one vector tile per task.
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)
    sch.reverse_compute_at(local_wb, fused)
    # Vectorise before decompose_reduction: vectorize needs the block to still own its init;
    # the init loops copied by decompose_reduction keep the vectorized/unrolled kinds.
    if ri is not None:
        sch.unroll(r_i)
    if r2 is not None:
        sch.unroll(r2_i)
    sch.vectorize(v_i)
    if reds:
        sch.decompose_reduction(info.rv, reds[0])
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
