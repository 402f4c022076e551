"""The baseline placements every solver is judged by.

The shared :class:`Problem` (pins, forced sides, float pricing) lives in
``passes/problem.py`` and is re-exported here. Baselines (IR-free, no TVM):

- ``device_only``: every op on the device (except ops pins force onto the server); in
  training the model outputs still cross to the loss on the server.
- ``server_only``: every op on the server; the raw input is uploaded (allowed only here).
- ``layerwise``: the best single cut of the topological order (first k ops on the device,
  Neurosurgeon-style), all n+1 cuts priced in O(n + tensors) with difference arrays.
- ``exhaustive``: every valid placement (down-closed device sets that respect the pins);
  refused above :data:`EXHAUSTIVE_LIMIT` free ops.
"""

from __future__ import annotations

import numpy as np
from splitc import InputError, PlanError
from splitc.passes.problem import TIED_POLICIES, Problem

__all__ = [
    "EXHAUSTIVE_LIMIT",
    "TIED_POLICIES",
    "Problem",
    "device_only",
    "exhaustive",
    "layerwise",
    "no_crossing",
    "server_only",
]

EXHAUSTIVE_LIMIT = 20  # 2**20 placements at ~50 us each in Python: under a minute


def device_only(pb: Problem) -> np.ndarray:
    """Every op on the device, except ops that pins force onto the server."""
    return ~pb.forced_srv


def server_only(pb: Problem) -> np.ndarray:
    """Every op on the server: the raw input is uploaded (raw data leaves the device)."""
    return np.zeros(len(pb.graph.ops), dtype=bool)


def layerwise(pb: Problem) -> np.ndarray | None:
    """Best prefix ``ops[:k]`` on the device over valid k, or ``None`` when no k is valid.

    Cost(k) = sum of range contributions: device compute of op i for k > i, server compute
    for k <= i, a tensor made at p and last read at m crosses for p < k <= m (always, from
    p < k, when it is a training output), a tied weight read at a..b is split for a < k <= b.
    """
    n = len(pb.graph.ops)
    acc = np.zeros(n + 2)  # difference array over k = 0..n
    cnt = np.zeros(n + 2)  # how many things cross (inference: fixed latency when > 0)

    def add(lo, hi, v, count=True):  # add v for k in [lo, hi]
        if lo <= hi:
            acc[lo] += v
            acc[hi + 1] -= v
            if count:
                cnt[lo] += 1
                cnt[hi + 1] -= 1

    for i in range(n):
        add(i + 1, n, pb.cd[i], False)
        add(0, i, pb.cs[i] + pb.out_down[i], pb.makes_result[i])
    last = np.full(len(pb.t_p), -1, dtype=np.int64)
    np.maximum.at(last, pb.e_t, pb.e_c)
    hi = np.where(pb.t_out, n, last)
    lo = pb.t_p + 1
    ok_t = lo <= hi
    np.add.at(acc, lo[ok_t], pb.t_comm[ok_t])
    np.add.at(acc, hi[ok_t] + 1, -pb.t_comm[ok_t])
    np.add.at(cnt, lo[ok_t], 1)
    np.add.at(cnt, hi[ok_t] + 1, -1)
    if pb.objective == "training":
        for _, rd, c in pb.tied:
            add(rd[0] + 1, rd[-1], c)
    cost = np.cumsum(acc)[: n + 1] + pb.constant
    if pb.objective == "inference":
        cost = cost + np.where(np.cumsum(cnt)[: n + 1] > 0, 2 * pb.link.latency, 0.0)
    ks = np.arange(n + 1)
    dev_idx = np.nonzero(pb.forced_dev)[0]
    srv_idx = np.nonzero(pb.forced_srv)[0]
    ok = ks >= (dev_idx.max() + 1 if len(dev_idx) else 0)
    ok &= ks <= (srv_idx.min() if len(srv_idx) else n)
    for gr in pb.same:  # same-side groups: the cut may not fall inside one
        ok &= (ks <= min(gr)) | (ks > max(gr))
    if not ok.any():
        return None
    order = np.argsort(np.where(ok, cost, np.inf), kind="stable")
    cands = [(float(cost[k]), np.arange(n) < k) for k in order[:8] if ok[k]]
    return pb.best_exact(cands)


def exhaustive(pb: Problem) -> np.ndarray:
    """The exact optimum over every valid placement (raises above the size limit)."""
    n = len(pb.graph.ops)
    if pb.free > EXHAUSTIVE_LIMIT:
        raise InputError(
            f"Partition: exhaustive search over {pb.free} free ops is too large "
            f"(limit {EXHAUSTIVE_LIMIT}); use algorithm 'mincut' (exact)"
        )
    prods: list[set[int]] = [set() for _ in range(n)]
    for c, p in zip(pb.e_c.tolist(), pb.e_p.tolist()):
        if p >= 0:
            prods[c].add(p)
    cands: list[tuple[float, np.ndarray]] = []
    dev = np.zeros(n, dtype=bool)

    def rec(i):
        if i == n:
            if all(len({bool(dev[j]) for j in gr}) == 1 for gr in pb.same):
                cands.append((pb.cost(dev), dev.copy()))
            return
        can_dev = not pb.forced_srv[i] and all(dev[p] for p in prods[i])
        if can_dev:
            dev[i] = True
            rec(i + 1)
            dev[i] = False
        if not pb.forced_dev[i]:
            rec(i + 1)

    rec(0)
    if not cands:
        raise PlanError("Partition: no valid placement; check the pins")
    return pb.best_exact(cands)


def no_crossing(pb: Problem) -> np.ndarray | None:
    """Inference: the cheapest placement where nothing crosses (no latency), or None."""
    n = len(pb.graph.ops)
    root = list(range(n))

    def find(x):
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for c, p in zip(pb.e_c.tolist(), pb.e_p.tolist()):
        if p >= 0:
            root[find(c)] = find(p)
    for gr in pb.same:
        for a in gr[1:]:
            root[find(a)] = find(gr[0])
    comp = np.array([find(i) for i in range(n)])
    dev_only = pb.forced_dev | pb.makes_result  # and readers of model inputs (raw upload)
    dev_only[pb.e_c[pb.e_p < 0]] = True
    for i in np.nonzero(pb.forced_srv)[0]:
        if dev_only[comp == comp[i]].any():
            return None
    dev = np.ones(n, dtype=bool)
    for r in set(comp.tolist()):
        m = comp == r
        if not dev_only[m].any() and (pb.forced_srv[m].any() or pb.cs[m].sum() < pb.cd[m].sum()):
            dev[m] = False
    return dev
