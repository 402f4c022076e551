"""Schedule-aware features of one SCHEDULED kernel (a ``tirx.PrimFunc`` after
``passes/schedules.py: default_cpu_schedule``).

A kernel's time is set by how it was scheduled as much as by its FLOPs: on this CPU a matmul
that got register tiling runs ~10x faster per FLOP than the same matmul left to the parallel
fallback. ``KernelFeatures`` (``features.py``) sees only sizes; this module reads the loops:

- *loop features* (``LOOP_FEATURES``), from a walk over the kernel's blocks and the loops
  above each leaf block: blocks and reduction blocks, iterations (total and of the heaviest
  block), the share of iterations under a vectorised / parallel loop, vector lanes, parallel
  extent, innermost serial trip count and unroll of the heaviest block, whether it keeps a
  register accumulator (``cache_write`` to ``local``: the *register tile* rule) or an
  ``rfactor`` block (the *rfactor* rule), the share of iterations left unscheduled, and
  intermediate buffer bytes. Which rule handled a block follows from these (injective:
  vectorised, no reduction; tile: local accumulator; rfactor: ``_rf`` block; parallel
  fallback: parallel reduction without vectors; small/unscheduled: neither).
- *MetaSchedule features*: TVM's ``PerStoreFeature`` (the 164 per-store features of Ansor /
  MetaSchedule's XGBoost cost model: arithmetic counts, vectorise/unroll/parallel
  annotations, per-buffer access strides and reuse, arithmetic-intensity curve), reduced over
  the kernel's stores by max (adding a log2-sum reduction gained nothing: 44.2 vs 44.8 %
  of held-out kernels within +-10 %, at twice the fitting time).

The planner prices ops before anything is scheduled, so ``LearnedModel.op_cost`` keeps the
plain features (``features.vector``); these features serve kernels that exist
(``LearnedModel.kernel_times`` on calibrated or compiled kernels). Needs TVM.
"""

from __future__ import annotations

import math

__all__ = ["LOOP_FEATURES", "MS_FEATURES", "SCHED_FEATURE_NAMES", "schedule_features"]

LOOP_FEATURES = (
    "n_blocks", "n_reduce_blocks", "log_iters", "log_iters_heavy", "vec_share", "par_share",
    "max_lanes", "log_par_heavy", "log_inner_heavy", "local_accum", "rfactor",
    "unscheduled_share", "log_unroll_heavy", "log_alloc_bytes", "heavy_reduce",
)
_N_MS = 164  # PerStoreFeature width with extract_workload=False (TVM 0.27)
MS_FEATURES = tuple(f"ms_max{i}" for i in range(_N_MS))
SCHED_FEATURE_NAMES = LOOP_FEATURES + MS_FEATURES


def _int(x, default: int = 1) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return default  # symbolic extent


def _walk(stmt, loops: list, out: list, allocs: list) -> None:
    """Collect (block, loops above it, is_leaf) for every block under ``stmt``."""
    from tvm import s_tir, tirx

    if stmt is None:
        return
    if isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            _walk(s, loops, out, allocs)
    elif isinstance(stmt, tirx.For):
        _walk(stmt.body, loops + [stmt], out, allocs)
    elif isinstance(stmt, s_tir.SBlockRealize):
        _walk(stmt.block, loops, out, allocs)
    elif isinstance(stmt, s_tir.SBlock):
        allocs.extend(stmt.alloc_buffers)
        n = len(out)
        out.append([stmt, loops, True])  # [block, loops above it, is_leaf]
        _walk(stmt.body, loops, out, allocs)
        if len(out) > n + 1:
            out[n][2] = False  # has child blocks: not a leaf
    elif isinstance(stmt, tirx.IfThenElse):
        _walk(stmt.then_case, loops, out, allocs)
        _walk(stmt.else_case, loops, out, allocs)
    elif hasattr(stmt, "body"):  # AttrStmt, Bind, AllocBuffer, DeclBuffer, While, ...
        if isinstance(stmt, (tirx.AllocBuffer,)) and hasattr(stmt, "buffer"):
            allocs.append(stmt.buffer)
        _walk(stmt.body, loops, out, allocs)


def _scope(buf) -> str:
    try:
        return str(buf.scope())
    except Exception:  # noqa: BLE001 - not a buffer (a tensor expression): global memory
        return "global"


def _nbytes(buf) -> int:
    n = 1
    for d in buf.shape:
        n *= _int(d)
    return n * max(_int(buf.dtype.bits, 32) // 8, 1)


def loop_features(func) -> list[float]:
    """``LOOP_FEATURES`` of one scheduled PrimFunc."""
    from tvm import tirx

    blocks: list = []
    allocs: list = []
    _walk(func.body, [], blocks, allocs)
    leaves = [(b, ls) for b, ls, leaf in blocks if leaf and b.name_hint != "root"]
    if not leaves:
        return [0.0] * len(LOOP_FEATURES)
    rows = []
    for b, ls in leaves:
        iters = math.prod(_int(lp.extent) for lp in ls) if ls else 1
        par = math.prod(_int(lp.extent) for lp in ls if lp.kind == tirx.ForKind.PARALLEL)
        vec = math.prod(_int(lp.extent) for lp in ls if lp.kind == tirx.ForKind.VECTORIZED)
        unr = math.prod(_int(lp.extent) for lp in ls if lp.kind == tirx.ForKind.UNROLLED)
        serial = [_int(lp.extent) for lp in ls if lp.kind == tirx.ForKind.SERIAL]
        local = any("local" in _scope(w.source) for w in b.writes)
        # a reduction block has a CommReduce (2) iter var; its init may be a separate block
        red = any(int(iv.iter_type) == 2 for iv in b.iter_vars)
        rows.append((iters, par, vec, unr, serial[-1] if serial else 1, red,
                     local, "rf" in b.name_hint.split("_")))
    total = sum(r[0] for r in rows)
    h = max(rows, key=lambda r: r[0])
    vec_it = sum(r[0] for r in rows if r[2] > 1)
    par_it = sum(r[0] for r in rows if r[1] > 1)
    none_it = sum(r[0] for r in rows if r[1] <= 1 and r[2] <= 1)
    alloc = sum(_nbytes(b) for b in allocs)
    return [float(len(rows)), float(sum(r[5] for r in rows)), math.log10(total + 1),
            math.log10(h[0] + 1), vec_it / total, par_it / total, float(max(r[2] for r in rows)),
            math.log10(h[1]), math.log10(h[4]), float(any(r[6] for r in rows)),
            float(any(r[7] for r in rows)), none_it / total, math.log10(h[3]),
            math.log10(alloc + 1), float(h[5])]


def _context(mod, target):
    """A ``TuneContext`` without ``TuneContext.__init__``: that imports
    ``tvm.s_tir.tensor_intrin``, which parses ~500 TVMScript functions (40 s here), and the
    feature extractor needs none of them."""
    from tvm.s_tir.meta_schedule import TuneContext, _ffi_api

    ctx = TuneContext.__new__(TuneContext)
    ctx.__init_handle_by_constructor__(_ffi_api.TuneContext, mod, target, None, None, "main",
                                       1, -1, None)
    return ctx


def ms_features(func, target) -> list[float]:
    """MetaSchedule ``PerStoreFeature`` reduced over stores by max."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod = tvm.IRModule({"main": func})
    ctx = _context(mod, target)
    cand = ms.MeasureCandidate(tvm.s_tir.Schedule(mod), ms.arg_info.ArgInfo.from_prim_func(func))
    f = ms.feature_extractor.PerStoreFeature(extract_workload=False).extract_from(ctx, [cand])
    a = f[0].numpy()
    if a.ndim != 2 or a.shape[0] == 0:
        return [0.0] * _N_MS
    return a[:, :_N_MS].max(0).tolist()


def schedule_features(func, target) -> tuple[float, ...]:
    """``SCHED_FEATURE_NAMES`` of one scheduled kernel; MetaSchedule's part is zeros when its
    extractor rejects the kernel (it is a best effort on hand-scheduled TIR)."""
    try:
        ms = ms_features(func, target)
    except Exception:  # noqa: BLE001 - PerStoreFeature asserts on some opaque kernels
        ms = [0.0] * _N_MS
    return tuple(round(x, 5) for x in loop_features(func) + ms)
