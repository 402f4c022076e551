"""The rules behind ``passes/schedules.py``: plain TIR schedule primitives on one kernel.

Kept apart from the public API so each file stays readable; nothing here is public. Every
rule takes a ``tvm.s_tir.Schedule`` and facts about one root block (:class:`_Block`, in
``passes/schedule_blocks.py``; the conv/matmul register tiling is in ``schedule_tiling.py``)
and either schedules it or raises; ``schedule_prim_func`` turns a raise into a reported
fallback. This file holds the injective and row-reduction rules and the per-kernel driver.
"""

from __future__ import annotations

import tvm
from splitc.passes.max_pool_grads import is_max_pool_grad, schedule_max_pool_grad
from splitc.passes.schedule_axes import _find_rfactor_axis, _find_vector_axis
from splitc.passes.schedule_blocks import (
    _MIN_PARALLEL_WORK,
    _Block,
    _block_facts,
    _coef,
    _largest_divisor,
    _parallel_reduction,
    _uses,
)
from splitc.passes.schedule_tiling import _register_tile, _rfactor_block
from tvm import sym, tirx

__all__ = ["lanes_for", "schedule_prim_func"]


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
                and not _reads_each_once(sch.get(c), stmt)
                for c in consumers
            ):
                continue
            try:
                sch.compute_inline(rv)
                changed = True
                break
            except Exception:  # noqa: BLE001, S112 - not inlinable (an output buffer): keep it
                continue


def _reads_each_once(consumer, producer) -> bool:
    """A reduction that reads every element of ``producer``'s output once (its iteration
    space is the buffer's size: a per-channel sum over N x H x W), so inlining recomputes
    nothing and saves writing and reading the intermediate. Batch norm's backward sums of
    ``dy * x_hat`` at 8x512x28x28: 13.9 -> 3.2 ms, at 8x1024x14x14 3.9 -> 0.7 ms (1 thread,
    separate runs). A conv or matmul reads each input element many times (k x k x C_out):
    never inlined into."""
    if len(producer.writes) != 1:
        return False
    size = 1
    for d in producer.writes[0].source.shape:
        size *= _int_or_none(d) or 0
    iters = 1
    for iv in consumer.iter_vars:
        iters *= _int_or_none(iv.dom.extent) or 0
    return size > 0 and iters == size


def _int_or_none(expr):
    return int(expr) if isinstance(expr, tirx.IntImm | int) else None


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


# Transpose tile: 16 iterations of the input's contiguous axis (unrolled) x 8 output lanes
# (one 8-wide gather from 8 input rows per iteration; the 8 rows' cache lines are used up over
# the 16 unrolled steps). (768, 3072) -> (3072, 768) on the dev box, 1 thread, medians of 15:
# 9-17 ms with the plain injective rule (a 768-line column walk per output row), 1.2-2 ms as
# 16x8 tiles, 1.7-3 ms as 16x16, 2-6 ms as 32x16; PyTorch's .t().contiguous() 3-8 ms.
_TRANSPOSE_ROWS = 16
_TRANSPOSE_LANES = 8


def _lane_iter(info: _Block) -> int | None:
    """The iter that is the output's innermost index (the axis written contiguously)."""
    if not info.writes or not info.writes[0].region:
        return None
    last = info.writes[0].region[-1].min
    return next((i for i, iv in enumerate(info.iters) if last.same_as(iv.var)), None)


def _transpose_axis(info: _Block) -> int | None:
    """For an injective block that reads no input contiguously along the output's innermost
    axis: the spatial iter that some input reads along its own innermost axis with stride 1
    (the block is a transpose of that input, possibly fused with elementwise work)."""
    lane = _lane_iter(info)
    if lane is None:
        return None
    lane_var = info.iters[lane].var
    # A fused reshape reads g[(v1 // 3072 + v0) % 2048 // 64, ..., v1 % 3072]: simplified with
    # the iters' ranges that is g[v0 // 64, v0 % 64, v1], whose last index is linear.
    ana = sym.Analyzer()
    for iv in info.iters:
        ana.bind(iv.var, iv.dom)
    best = None
    for rd in info.reads:
        if not rd.region:
            continue
        idx = [ana.simplify(r.min) for r in rd.region]
        rlast = idx[-1]
        if _uses(rlast, lane_var) and _coef(rlast, lane_var) == 1:
            return None  # contiguous along the lanes already: the plain rule is right
        if not any(_uses(e, lane_var) for e in idx):
            continue  # a broadcast operand (a bias): no transpose in it
        for i, iv in enumerate(info.iters):
            if i != lane and _uses(rlast, iv.var) and _coef(rlast, iv.var) == 1:
                best = i if best is None or info.extents[i] > info.extents[best] else best
    return best


def _transpose_fits(info: _Block, src: int) -> bool:
    """Both tile sides have a divisor >= 4 (a 58-row padded image or a 3-wide filter window
    has none: those take the injective rule)."""
    lane = _lane_iter(info)
    rt = _largest_divisor(info.extents[src], _TRANSPOSE_ROWS)
    return rt >= 4 and _largest_divisor(info.extents[lane], _TRANSPOSE_LANES) >= 4


def _transpose_tile(sch, info: _Block, src: int) -> None:
    """Cache-blocked transpose: tiles of rows (the input's contiguous axis, unrolled) x lanes
    (the output's contiguous axis, vectorised); the tile loops are fused and parallelised."""
    lane = _lane_iter(info)
    rt = _largest_divisor(info.extents[src], _TRANSPOSE_ROWS)
    vt = _largest_divisor(info.extents[lane], _TRANSPOSE_LANES)
    if rt < 4 or vt < 4:
        raise ValueError(f"transpose extents {info.extents[src]} x {info.extents[lane]}: no tile")
    r_o, r_i = sch.split(info.loops[src], [None, rt])
    v_o, v_i = sch.split(info.loops[lane], [None, vt])
    others = [l for i, l in enumerate(info.loops) if i not in (src, lane)]
    sch.reorder(*others, r_o, v_o, r_i, v_i)
    fused = sch.fuse(*others, r_o, v_o)
    sch.parallel(fused)
    sch.unroll(r_i)
    sch.vectorize(v_i)


def _parallel_vectorize_injective(sch, info: _Block, lanes: int) -> None:
    """Vectorise the innermost loop alone (fusing it with outer loops would turn every lane's
    index into div/mod arithmetic and a broadcast operand such as a [1, C, 1, 1] scale into a
    gather: 14.6 ms instead of 0.5 ms for a 32x64x16x16 multiply) and parallelise the rest."""
    loops, extents = list(info.loops), list(info.extents)
    total = 1
    for e in extents:
        total *= e
    # Rows that are no whole number of vectors get vectors of a divisor of the row (14 or 28
    # wide: 14 lanes; 7 wide: 7). Left to LLVM's loop vectoriser, a divide + ReLU with a
    # [1, C, 1, 1] operand took 4.28 ms at 8x1024x14x14 and 8.86 ms at 8x512x28x28; 0.39 and
    # 0.98 ms this way (1 thread, separate runs).
    vec = _largest_divisor(extents[-1], lanes)
    if vec >= 4:
        o, v = sch.split(loops[-1], [None, vec])
        sch.vectorize(v)
        outer = loops[:-1] + [o]
    elif extents[-1] >= 4:
        outer = loops[:-1]  # odd rows (34 wide pads: 2 | 34): LLVM's loop vectoriser takes them
    else:
        outer = loops  # unit or tiny rows (a [N, C, 1, 1] output): parallel over everything
    if not outer or total < _MIN_PARALLEL_WORK:
        return
    # unit loops fuse for free; fusing keeps one parallel region per kernel
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)


def _rfactor_tile(sch, info: _Block, ri: int, lanes: int, knobs=None) -> None:
    rf_info = _rfactor_block(sch, info, ri, lanes)
    found = _find_vector_axis(rf_info, lanes)
    if found is None:
        raise ValueError("rfactor block has no contiguous lane axis")
    kw = {} if knobs is None else {"knobs": knobs}
    _register_tile(sch, rf_info, found[0], found[1], lanes, **kw)
    # The final cross-lane sum is small (output x vt): parallelise its spatial loops.
    final = _block_facts(sch, info.rv)
    if final is not None:
        _parallel_reduction(sch, final)


def _schedule_block(sch, info: _Block, lanes: int, knobs=None) -> str:
    work = 1
    for e in info.extents:
        work *= e
    if work < _MIN_PARALLEL_WORK:
        # e.g. the batch-mean of a loss: microseconds either way (and rfactor of a 0-d
        # reduction hits an internal check in TVM 0.27's BlockReplacer)
        return "small"
    if info.injective:
        src = _transpose_axis(info)
        if src is not None and _transpose_fits(info, src):
            _transpose_tile(sch, info, src)
            return "transpose"
        _parallel_vectorize_injective(sch, info, lanes)
        return "injective"
    if len(info.writes) == 1 and info.has_init:
        found = _find_vector_axis(info, lanes)
        if found is not None:
            # knobs only when given: None keeps the heuristic tile of schedule_tiling
            kw = {} if knobs is None else {"knobs": knobs}
            _register_tile(sch, info, found[0], found[1], lanes, **kw)
            return "tile"
        ri = _find_rfactor_axis(info, lanes)
        if ri is not None:
            _rfactor_tile(sch, info, ri, lanes, knobs)
            return "rfactor"
    _parallel_reduction(sch, info)
    return "parallel"


def _flat(buffer, index):
    e = tirx.const(0, "int64")
    for d, i in zip(buffer.shape, index):
        e = e * d + i
    return e


def _fuse_epilogue(sch, rv) -> None:
    """Inline the injective block ``rv`` into the register tile's write-back of its producer
    (the ``cache_write`` block, ``*_local``), so the tile's results go through the epilogue
    (batch norm, ReLU mask, residual add) while in registers instead of a whole-tensor
    intermediate written and read again. Only where the epilogue reads the producer's buffer
    as a reshape of its own output (same row-major order: a conv's [n, o, h, w], a per-image
    GEMM's [n, o, h*w]); a pixel GEMM's [o, n*h*w] would make the stores a scatter (14x14:
    9.8 -> 10.4 ms). 1x1 conv 64 -> 256 at 56x56 + batch norm, b8, 1 thread, same run:
    15.1 -> 12.9 ms. Raises where it does not apply."""
    stmt = sch.get(rv)
    wb = [p for p in sch.get_producers(rv) if sch.get(p).name_hint.endswith("_local")]
    if len(wb) != 1 or len(stmt.writes) != 1:
        raise ValueError("no register write-back producer")
    buf = sch.get(wb[0]).writes[0].source
    reads = [r for r in stmt.reads if r.source.same_as(buf)]
    if len(reads) != 1:
        raise ValueError("reads the write-back buffer more than once")
    idx = [r.min for r in reads[0].region]
    ana = sym.Analyzer()
    for iv in stmt.iter_vars:
        ana.bind(iv.var, iv.dom)
    out = stmt.writes[0]
    diff = ana.simplify(_flat(buf, idx) - _flat(out.source, [r.min for r in out.region]))
    if not (isinstance(diff, tirx.IntImm) and int(diff) == 0):
        raise ValueError("the epilogue does not read its producer as a reshape")
    sch.transform_block_layout(rv, tirx.IndexMap([iv.var for iv in stmt.iter_vars], idx, None))
    sch.reverse_compute_inline(sch.get_sblock(stmt.name_hint))


def schedule_prim_func(
    func: tirx.PrimFunc, target: tvm.target.Target, knobs=None
) -> tuple[tirx.PrimFunc, list[str]]:
    """Schedule one kernel; returns (scheduled function, [problems]); never raises for a rule.

    Each root block is scheduled on its own; a block whose rule raises is retried with the
    generic parallel fallback on the schedule state before that rule, then left unscheduled.
    ``knobs`` (a tuner's tile choice, ``schedule_tiling.TileKnobs``) goes to every
    register-tiled block of the kernel; None: the heuristic tiles. Knobs that do not fit a
    block make its rule raise, so that block falls back and is reported like any other.
    """
    problems: list[str] = []
    if is_max_pool_grad(func):  # max-pool fwd/bwd: per-plane schedule (max_pool_grads.py)
        try:
            return schedule_max_pool_grad(func, lanes_for(target, 32)), problems
        except Exception as exc:  # noqa: BLE001 - fall back to the generic rules below
            problems.append(f"max-pool: {_first_line(exc)}")
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
            if info.injective:
                try:
                    _fuse_epilogue(sch, rv)
                    continue
                except Exception:  # noqa: BLE001 - not an epilogue of a tile: its own rule
                    sch = snapshot.copy()
                    rv = sch.get_sblock(name)
                    info = _block_facts(sch, rv)
            lanes = lanes_for(target, _dtype_bits(sch.get(rv)))
            _schedule_block(sch, info, lanes, knobs)
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
