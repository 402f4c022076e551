"""The rules behind ``passes/schedules.py``: plain TIR schedule primitives on one kernel.

Kept apart from the public API so each file stays readable; nothing here is public. Every
rule takes a ``tvm.s_tir.Schedule`` and facts about one root block (:class:`_Block`) and
either schedules it or raises; ``schedule_prim_func`` turns a raise into a reported fallback.
"""

from __future__ import annotations

import tvm
from tvm import sym, tirx

_GET_REALIZE = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")

__all__ = ["lanes_for", "schedule_prim_func"]

# Register budget for the accumulator tile: AVX-512 has 32 zmm registers; 16 accumulators
# leave room for the broadcast weights and the input vector (rt=8 rows x 2 vectors).
_MAX_ACC_VECTORS = 16
_MAX_ROWS = 8
# Below this many iterations a parallel loop costs more in thread wake-up (~5 us on the
# dev box) than it saves.
_MIN_PARALLEL_WORK = 4096


def lanes_for(target: tvm.target.Target, dtype_bits: int) -> int:
    """Vector lanes the target's code generator will use for ``dtype_bits`` elements.

    A bare ``llvm`` target (no ``mcpu``/``mattr``) is compiled for the generic CPU of its
    triple (x86-64: SSE2, 128 bits) whatever the host has, so tiles are sized for 128 bits.
    """
    bits = 128
    if target.attrs.get("mcpu") or target.attrs.get("mattr"):
        try:
            from tvm.target.codegen import llvm_get_vector_width

            bits = int(llvm_get_vector_width(target)) or 128
        except Exception:  # noqa: BLE001 - the width is only a tuning hint
            bits = 128
    return max(bits // dtype_bits, 4)


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


def _inline_injective(sch) -> None:
    """Inline injective producers that feed only injective consumers (never into a reduction,
    so conv inputs stay materialised and their loads stay unconditional vector loads)."""
    changed = True
    while changed:
        changed = False
        for rv in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
            stmt = sch.get(rv)
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in stmt.iter_vars):
                continue
            consumers = sch.get_consumers(rv)
            if not consumers:
                continue
            if any(
                any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(c).iter_vars)
                for c in consumers
            ):
                continue
            try:
                sch.compute_inline(rv)
                changed = True
                break
            except Exception:  # noqa: BLE001, S112 - not inlinable (an output buffer): keep it
                continue


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _parallel_vectorize_injective(sch, info: _Block, lanes: int) -> None:
    """Vectorise the innermost loop alone (fusing it with outer loops would turn every lane's
    index into div/mod arithmetic and a broadcast operand such as a [1, C, 1, 1] scale into a
    gather: 14.6 ms instead of 0.5 ms for a 32x64x16x16 multiply) and parallelise the rest."""
    loops, extents = list(info.loops), list(info.extents)
    total = 1
    for e in extents:
        total *= e
    if extents[-1] % lanes == 0:
        o, v = sch.split(loops[-1], [None, lanes])
        sch.vectorize(v)
        outer = loops[:-1] + [o]
    elif extents[-1] >= 4:
        outer = loops[:-1]  # odd rows (e.g. 34 wide pads): LLVM's loop vectoriser takes them
    else:
        outer = loops  # unit or tiny rows (a [N, C, 1, 1] output): parallel over everything
    if not outer or total < _MIN_PARALLEL_WORK:
        return
    # unit loops fuse for free; fusing keeps one parallel region per kernel
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)


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


def _rfactor_tile(sch, info: _Block, ri: int, lanes: int) -> None:
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
    found = _find_vector_axis(rf_info, lanes)
    if found is None:
        raise ValueError("rfactor block has no contiguous lane axis")
    _register_tile(sch, rf_info, found[0], found[1], lanes)
    # The final cross-lane sum is small (output x vt): parallelise its spatial loops.
    final = _block_facts(sch, info.rv)
    if final is not None:
        _parallel_reduction(sch, final)


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


def _schedule_block(sch, info: _Block, lanes: int) -> str:
    work = 1
    for e in info.extents:
        work *= e
    if work < _MIN_PARALLEL_WORK:
        # e.g. the batch-mean of a loss: microseconds either way (and rfactor of a 0-d
        # reduction hits an internal check in TVM 0.27's BlockReplacer)
        return "small"
    if info.injective:
        _parallel_vectorize_injective(sch, info, lanes)
        return "injective"
    if len(info.writes) == 1 and info.has_init:
        found = _find_vector_axis(info, lanes)
        if found is not None:
            _register_tile(sch, info, found[0], found[1], lanes)
            return "tile"
        ri = _find_rfactor_axis(info, lanes)
        if ri is not None:
            _rfactor_tile(sch, info, ri, lanes)
            return "rfactor"
    _parallel_reduction(sch, info)
    return "parallel"


def schedule_prim_func(
    func: tirx.PrimFunc, target: tvm.target.Target
) -> tuple[tirx.PrimFunc, list[str]]:
    """Schedule one kernel; returns (scheduled function, [problems]); never raises for a rule.

    Each root block is scheduled on its own; a block whose rule raises is retried with the
    generic parallel fallback on the schedule state before that rule, then left unscheduled.
    """
    problems: list[str] = []
    sch = tvm.s_tir.Schedule(func)
    try:
        _inline_injective(sch)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"inline: {_first_line(exc)}")
        sch = tvm.s_tir.Schedule(func)
    names = (
        [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
        if _has_root(sch)
        else []
    )
    for name in names:
        snapshot = sch.copy()
        try:
            rv = sch.get_sblock(name)
            if not sch.get_loops(rv):
                continue  # a 0-d kernel (a scalar loss): nothing to parallelise
            info = _block_facts(sch, rv)
            if info is None:
                problems.append(f"{name}: loops not in normal form")
                continue
            lanes = lanes_for(target, _dtype_bits(sch.get(rv)))
            _schedule_block(sch, info, lanes)
        except Exception as exc:  # noqa: BLE001 - a rule must never break the build
            problems.append(f"{name}: {_first_line(exc)}")
            sch = snapshot
            keep = sch.copy()
            try:
                info = _block_facts(sch, sch.get_sblock(name))
                if info is not None and not info.injective:
                    _parallel_reduction(sch, info)
            except Exception as exc2:  # noqa: BLE001 - keep the naive loops of this block
                problems.append(f"{name} (parallel fallback): {_first_line(exc2)}")
                sch = keep
    return sch.mod["main"], problems


def _dtype_bits(block) -> int:
    try:
        return int(tvm.runtime.DataType(block.writes[0].source.dtype).bits)
    except Exception:  # noqa: BLE001
        return 32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = next((t for t in text if t.strip()), type(exc).__name__)
    return line[:200]
