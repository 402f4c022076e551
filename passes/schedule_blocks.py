"""Plain facts about one root block of a TIR schedule, and the generic parallel fallback.

:class:`_Block` lists a block's loops (one per iter var, in iter order), iter kinds
(``S`` spatial, ``R`` reduction), extents, reads and writes; the small expression helpers
(``_uses``, ``_coef``) answer "does this index use that iter, with which stride". The tiling
rules (``schedule_axes.py``, ``schedule_layouts.py``, ``schedule_tiling.py``) and the
per-kernel driver (``schedule_rules.py``) read these facts; nothing here is public.
"""

from __future__ import annotations

import tvm
from tvm import sym, tirx

__all__: list[str] = []  # internal to passes/schedule_*.py

_GET_REALIZE = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")

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
