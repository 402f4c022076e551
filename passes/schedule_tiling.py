"""The register-tiling rule behind ``passes/schedule_rules.py``, and its knobs.

``_register_tile`` tiles a conv or matmul into register accumulators (parallel outer loops,
unrolled rows, vector lanes); its axes come from ``schedule_axes.py`` (lane, rows, rfactor),
its operand layouts from ``schedule_layouts.py`` (packed transposes, stride-2 phases), its
block facts from ``schedule_blocks.py``. Loop order and K panels follow the lane operand's
size (L2). The names of those three modules that tests and ``passes/tune_knobs.py`` use
(``_block_facts``, ``_find_vector_axis``, ...) stay importable from here.

Public: :class:`TileKnobs` (one tile shape) and :func:`tile_candidates` (shapes worth timing
for a block, the heuristic first) for the knob tuner (``passes/tune_knobs.py``);
``schedule_prim_func(func, target, knobs=...)`` passes a choice through to
``_register_tile``. Everything else is driven per kernel by ``passes/schedule_rules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from splitc.passes.schedule_axes import (
    _MAX_ROWS,
    _find_rfactor_axis,
    _find_vector_axis,
    _row_axes,
)
from splitc.passes.schedule_blocks import _Block, _block_facts, _int, _largest_divisor, _uses
from splitc.passes.schedule_layouts import _pack_transposed, _unstride
from tvm import tirx

__all__ = ["TileKnobs", "tile_candidates"]  # the rest: passes/schedule_rules.py only

# Register budget for the accumulator tile: AVX-512 has 32 zmm registers; 16 accumulators
# leave room for the broadcast weights and the input vector (rt=8 rows x 2 vectors).
_MAX_ACC_VECTORS = 16
# Row tiles go innermost above this lane-operand size (2x Zen4's 1 MiB L2: at 1.5 MB the
# lanes-innermost order still wins); K panels of 256 (a 256 x 32 panel of B is 32 KiB, L1d).
_LANE_OPERAND_BYTES = 1 << 21
_K_BLOCK = 256
# Rows innermost parallelises over lane tiles only: keep it to kernels with at least this
# many (a 1x1 weight gradient 512 <- 128 channels at 28x28 has 8 of 32 lanes: 28.0 -> 13.5 ms
# rows innermost, 1 thread; fewer tasks than cores idle part of a many-core board).
_MIN_TASKS = 8


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
