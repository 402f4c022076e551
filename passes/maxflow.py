"""Minimum s-t cut engines and exact reductions on integer flow networks (no TVM, no IR).

One small interface: arrays in (``tails``, ``heads``, int64 ``caps``, ``n`` nodes, ``s``,
``t``), ``(cut value, source-side mask)`` out. The source side returned is the *minimal* one
(nodes reachable from ``s`` in the residual network), the same for every engine.

- ``"ortools"``: OR-Tools ``SimpleMaxFlow`` (Apache-2.0, push-relabel on exact int64),
  0.7 ms at 1k ops and 0.26 s at 100k on DNN-shaped networks (shared/ARCHITECTURE.md).
- ``"networkx"``: ``preflow_push`` on the same integer capacities, the pure-Python fallback
  (about 200x slower). Never on floats: with float capacities networkx returned wrong or
  infeasible partitions in 16 of 41 measured cases.

Why integer "infinity" is safe: ``INF = (sum of all finite capacities) + 1``. When no path of
INF arcs joins ``s`` to ``t`` (``reduce_network`` checks this first), the cut
``S = {nodes reachable from s over INF arcs}`` crosses no INF arc and costs at most the finite
sum, so every minimum cut crosses no INF arc either. :func:`scale` keeps that sum below 2**62.

>>> import numpy as np
>>> # s=0 -> 2 (cap 3) -> t=1 (cap 5), s -> 3 (cap 4) -> t (cap 1): min cut 3 + 1
>>> value, src = min_cut(np.array([0, 2, 0, 3]), np.array([2, 1, 3, 1]),
...                      np.array([3, 5, 4, 1]), 4, 0, 1)
>>> int(value), src.nonzero()[0].tolist()
(4, [0, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from splitc import InputError

__all__ = ["ENGINES", "Reduced", "inf_path", "min_cut", "reduce_network", "scale"]

ENGINES = ("ortools", "networkx")
_I64 = np.int64


def _ortools(tails, heads, caps, n, s, t):
    from ortools.graph.python import max_flow

    mf = max_flow.SimpleMaxFlow()
    if len(tails):
        mf.add_arcs_with_capacity(tails.astype(_I64), heads.astype(_I64), caps.astype(_I64))
    mask = np.zeros(n, dtype=bool)
    mask[s] = True
    if not len(tails):
        return 0, mask
    status = mf.solve(int(s), int(t))
    if status != mf.OPTIMAL:
        raise RuntimeError(f"maxflow: OR-Tools SimpleMaxFlow returned status {status}")
    src = np.asarray(mf.get_source_side_min_cut(), dtype=_I64)
    mask[src[src < n]] = True
    return int(mf.optimal_flow()), mask


def _networkx(tails, heads, caps, n, s, t):
    import networkx as nx
    from networkx.algorithms.flow import preflow_push

    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for u, v, c in zip(tails.tolist(), heads.tolist(), caps.tolist()):
        if g.has_edge(u, v):  # DiGraph keeps one arc per pair: sum parallel arcs
            g[u][v]["capacity"] += c
        else:
            g.add_edge(u, v, capacity=c)
    value, (src, _) = nx.minimum_cut(g, s, t, flow_func=preflow_push)
    mask = np.zeros(n, dtype=bool)
    mask[list(src)] = True
    return int(value), mask


_IMPL = {"ortools": _ortools, "networkx": _networkx}


def min_cut(tails, heads, caps, n: int, s: int, t: int, engine: str = "ortools"):
    """Minimum s-t cut of an integer network: ``(value, source-side mask of length n)``."""
    if engine not in _IMPL:
        raise InputError(f"Partition: unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return _IMPL[engine](np.asarray(tails), np.asarray(heads), np.asarray(caps), n, s, t)


def scale(caps: np.ndarray, clamp: float):
    """Float capacities (``inf`` allowed) -> ``(int64 caps, scale, INF)``.

    Each finite capacity is first clamped to ``clamp``, the network value of a known feasible
    cut: an arc dearer than that cut is never in a minimum cut, and clamping stops one huge
    capacity from eating the integer range. ``clamp`` maps to ``2**62 // (E + 2)`` (E finite
    arcs, capped at 2**53 where float rounding already dominates), so the finite sum is below
    2**62 and ``INF = sum + 1`` fits int64 with room for OR-Tools' internal excess sums.
    Rounding costs at most 1.5 units per arc (0.5 from rounding, 1 from the float product),
    so the cut found is within ``3 * E / scale`` seconds of the true optimum: 3e-14 x clamp
    for E = 100 arcs, 2e-7 x clamp for E = 4e5 (100k ops).
    """
    caps = np.asarray(caps, dtype=float)
    finite = np.isfinite(caps)
    n_fin = int(finite.sum())
    top = min(2**53, 2**62 // (n_fin + 2))
    k = float(top) / clamp if clamp > 0 else 1.0
    out = np.empty(len(caps), dtype=_I64)
    out[finite] = np.rint(np.minimum(caps[finite], clamp) * k).astype(_I64)
    inf = int(out[finite].sum()) + 1
    out[~finite] = inf
    return out, k, inf


def inf_path(tails, heads, caps, n: int, s: int, t: int, inf: int) -> list[int] | None:
    """A path of INF arcs from ``s`` to ``t`` (the network is infeasible), or ``None``."""
    sel = caps >= inf
    if not _reach(n, tails[sel], heads[sel], s)[t]:
        return None
    adj: dict[int, list[int]] = {}
    for u, v in zip(tails[sel].tolist(), heads[sel].tolist()):
        adj.setdefault(u, []).append(v)
    parent = {s: -1}
    stack = [s]
    while stack:
        u = stack.pop()
        for v in adj.get(u, ()):
            if v not in parent:
                parent[v] = u
                if v == t:
                    path = [t]
                    while parent[path[-1]] != -1:
                        path.append(parent[path[-1]])
                    return path[::-1]
                stack.append(v)
    return None


@dataclass(frozen=True)
class Reduced:
    """A reduced network and how to map its cut back: ``side[v]`` is 1 (source), 0 (sink) or
    -1 (decided by the reduced node ``rep[v]``). ``offset`` is the constant pushed out."""

    tails: np.ndarray
    heads: np.ndarray
    caps: np.ndarray
    n: int
    s: int
    t: int
    rep: np.ndarray
    side: np.ndarray
    offset: int

    def expand(self, mask: np.ndarray) -> np.ndarray:
        out = self.side == 1
        free = self.side == -1
        out[free] = mask[self.rep[free]]
        return out


def _reach(n, tails, heads, start):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    g = csr_matrix((np.ones(len(tails), dtype=np.int8), (tails, heads)), shape=(n, n))
    order = breadth_first_order(g, start, directed=True, return_predecessors=False)
    m = np.zeros(n, dtype=bool)
    m[order] = True
    return m


def reduce_network(tails, heads, caps, n: int, s: int, t: int, inf: int) -> Reduced:
    """Exact reductions; a minimum cut of the result expands to a minimum cut of the input.

    1. Merge into ``s`` every node reachable from ``s`` over INF arcs (pinned to the device
       and their producers), into ``t`` every node that reaches ``t`` over INF arcs, and
       contract each strongly connected component of INF arcs (nodes that must share a side).
    2. Sum parallel arcs, drop self-loops and zero arcs.
    3. Push ``m = min(cap(s,v), cap(v,t))`` through every node: both sides of ``v`` pay
       ``m``, so it is a constant (``offset``).
    4. Nodes that cannot reach ``t`` go to the source side, nodes ``s`` cannot reach to the
       sink side: every arc out of the first set stays inside it, so adding it to any source
       side never adds a cut arc; the second set has no arc in from the source side.
    The caller must have checked :func:`inf_path` first (no INF path from s to t).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    tails, heads, caps = (np.asarray(a, dtype=_I64) for a in (tails, heads, caps))
    big = caps >= inf
    to_s = _reach(n, tails[big], heads[big], s)
    to_t = _reach(n, heads[big], tails[big], t)
    g = csr_matrix((np.ones(int(big.sum()), dtype=np.int8), (tails[big], heads[big])), shape=(n, n))
    _, comp = connected_components(g, directed=True, connection="strong")
    # Relabel: 0 = s, 1 = t, then one node per remaining INF component.
    comp = comp.astype(_I64)
    comp[to_s] = -2
    comp[to_t] = -1
    _, label = np.unique(comp, return_inverse=True)
    label = label.astype(_I64)  # -2 -> 0 (s), -1 -> 1 (t) since both are the smallest keys
    if not to_s.any() or not to_t.any():
        raise AssertionError("reduce_network: s or t lost")
    m = int(label.max()) + 1
    u, v = label[tails], label[heads]
    keep = u != v
    u, v, c = u[keep], v[keep], caps[keep]
    key = u * m + v
    uniq, inv = np.unique(key, return_inverse=True)
    fin = np.where(c >= inf, 0, c)
    csum = np.zeros(len(uniq), dtype=_I64)
    np.add.at(csum, inv, fin)
    anyinf = np.zeros(len(uniq), dtype=bool)
    np.logical_or.at(anyinf, inv, c >= inf)
    csum[anyinf] = inf
    u, v = uniq // m, uniq % m
    # Push min(cap(s,x), cap(x,t)) through every node x.
    cs = np.zeros(m, dtype=_I64)
    ct = np.zeros(m, dtype=_I64)
    from_s, into_t = (u == 0) & (v != 1), (v == 1) & (u != 0)
    cs[v[from_s]] = csum[from_s]
    ct[u[into_t]] = csum[into_t]
    push = np.minimum(cs, ct)
    push[cs >= inf] = 0
    push[ct >= inf] = 0
    offset = int(push.sum())
    csum[from_s] -= push[v[from_s]]
    csum[into_t] -= push[u[into_t]]
    nz = csum > 0
    u, v, csum = u[nz], v[nz], csum[nz]
    # Keep only nodes on some s -> t path.
    fwd = _reach(m, u, v, 0)
    bwd = _reach(m, v, u, 1)
    live = fwd & bwd
    live[0] = live[1] = True
    new_id = np.cumsum(live) - 1
    sel = live[u] & live[v]
    side_small = np.full(m, -1, dtype=np.int8)
    side_small[~bwd] = 1  # cannot reach t: source side
    side_small[~fwd & bwd] = 0
    side_small[0], side_small[1] = 1, 0
    side = side_small[label]
    rep = new_id[label]
    return Reduced(
        new_id[u[sel]],
        new_id[v[sel]],
        csum[sel],
        int(live.sum()),
        0,
        1,
        rep,
        side,
        offset,
    )
