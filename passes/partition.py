"""Partition: the IR-free solver that picks which ops run on the device (no TVM import).

Runs after AnnotateCosts (which builds the costed :class:`OpGraph`) and before SplitModule
(which reads only the returned ``Plan.placement``). ``evaluate`` in ``passes/plan.py``
defines what a placement costs; the flow network below reproduces it exactly, and every
answer is re-costed by it and checked for feasibility before it is returned.

The s-t construction (source s = device, sink t = server; an arc is paid when its tail is
on the device side and its head on the server side)::

          c_srv(v)          c_dev(v)                  comm(t)        inf
    s ─────────────▶ v ─────────────▶ t        u ─────────────▶ a_t ─────▶ w1, w2, ...
                                               u ◀──────────── wi   (inf: no server->device)

- ``comm(t) = bytes/uplink (+ bytes/downlink if t needs a gradient)`` in training, bytes/uplink
  in inference; the auxiliary node ``a_t`` charges it once however many server readers.
- a model output made on the device crosses to the loss (training): ``comm`` joins c_dev(u);
  in inference a result made on the server comes down: bytes/downlink joins c_srv(u).
- ops reading a model input, and device pins: ``s -> v`` inf; server pins: ``v -> t`` inf.
- a weight read by several ops (tied embedding), policy "sync" (training): two nodes
  ``readers -> U -> t`` and ``s -> V -> readers`` with ``U -> t`` and ``s -> V`` of capacity
  ``c = bytes/up + bytes/down``: the cut pays c when all readers share a side and 2c when
  they are split, so the constant c is subtracted. Policy "pin": readers share a side (inf).
- labels, the loss, and 2 x latency are constants (evaluate adds them); in inference the
  latency is paid only if something crosses, so the best placement with nothing crossing
  (all-device, or server-only islands) is compared explicitly.

"Infinite" capacities are integers larger than the sum of all finite ones (maxflow.py):
with no INF path from s to t (checked first, a contradiction in the pins raises PlanError),
the minimum cut never crosses one.

>>> from splitc.cost_models.base import OpCost
>>> from splitc.cost_models.link import Link
>>> from splitc.passes.opgraph import OpGraph, OpNode, Param, Tensor
>>> # x -> conv (slow on the device) -> fc -> y: 1 MB into conv, 1 kB out of it
>>> ops = (OpNode("conv", "conv2d", ("x",), ("h",), ("w",), device=OpCost(0.02),
...               server=OpCost(0.001)),
...        OpNode("fc", "matmul", ("h",), ("y",), ("v",), device=OpCost(0.5),
...               server=OpCost(0.001)))
>>> ts = {"x": Tensor("x", (250000,), "float32", None, ("conv",)),
...       "h": Tensor("h", (250,), "float32", "conv", ("fc",)),
...       "y": Tensor("y", (10,), "float32", "fc", (), True)}
>>> ps = {"w": Param("w", (9,), "float32", ("conv",)), "v": Param("v", (2,), "float32", ("fc",))}
>>> g = OpGraph("toy", ops, ts, ps, ("x",), ("y",))
>>> plan = solve(g, Link.parse("8Mbps"))  # 1 MB/s: the 1 kB activation goes up and down
>>> sorted(plan.placement.device), [c.name for c in plan.cut], float(plan.total)
(['conv'], ['h'], 0.023)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from splitc import InputError, PlanError
from splitc.cost_models.link import Link
from splitc.passes import baselines as bl
from splitc.passes.blockwise import find_blocks
from splitc.passes.maxflow import ENGINES, inf_path, min_cut, reduce_network, scale
from splitc.passes.opgraph import OpGraph, needs_grad
from splitc.passes.plan import Plan

__all__ = ["ALGORITHMS", "ENGINES", "Network", "build_network", "solve", "compare"]

ALGORITHMS = ("mincut", "blockwise", "layerwise", "device-only", "server-only", "exhaustive")
_INF = float("inf")


@dataclass(frozen=True)
class Network:
    """A float flow network; op i is node ``2 + i``, ``s = 0``, ``t = 1``, aux nodes after.

    ``value(dev) + constant`` equals ``evaluate(...).total`` for every valid placement
    (training; in inference without the fixed latency).
    """

    tails: np.ndarray
    heads: np.ndarray
    caps: np.ndarray  # seconds; inf for "infinite"
    n: int
    n_ops: int
    constant: float
    merges: tuple[tuple[int, int], ...] = ()  # (u, w) from _chain_merges: u dev => w dev

    def sides(self, dev) -> np.ndarray:
        """Node mask (True = source side) of ops ``dev``, aux nodes placed at their best."""
        side = np.zeros(self.n, dtype=bool)
        side[0] = True
        side[2: 2 + self.n_ops] = dev
        aux = np.zeros(self.n, dtype=bool)
        aux[2 + self.n_ops:] = True
        t, h, c = self.tails, self.heads, self.caps
        # aux nodes touch only s, t and ops, so each can be placed on its own
        cost_src = np.zeros(self.n)
        cost_snk = np.zeros(self.n)
        out = aux[t] & ~side[h]
        np.add.at(cost_src, t[out], c[out])
        inn = aux[h] & side[t]
        np.add.at(cost_snk, h[inn], c[inn])
        side[aux] = cost_src[aux] <= cost_snk[aux]
        return side

    def value(self, dev) -> float:
        side = self.sides(dev)
        cut = side[self.tails] & ~side[self.heads]
        return float(self.caps[cut].sum())


def _chain_merges(pb: bl.Problem) -> list[tuple[int, int]]:
    """Pairs (u, w): some optimum never cuts between op u and its only consumer op w.

    If u has one consumer w, is not forced to the device and shares no weight or group,
    moving u from the device to the server whenever u is on the device and w on the server
    changes the cost by at most ``delta = c_srv(u) - c_dev(u) - (outputs of u that stop
    crossing) + (inputs of u that may start crossing) [+ results of u coming down]``, a
    constant. If ``delta <= 0`` there is an optimum with ``u dev => w dev``. All merges move
    ops towards the server, so applying the fix-up repeatedly to an optimum terminates (the
    device set shrinks) without raising the cost: all merges hold in one optimum at once.
    Typical hit: elementwise and normalisation ops before a consumer when the server is faster.
    """
    n = len(pb.graph.ops)
    made = pb.e_p >= 0
    pu, pw = pb.e_p[made], pb.e_c[made]
    pairs = np.unique(pu * n + pw)
    n_readers = np.bincount(pairs // n, minlength=n)
    reader = np.full(n, -1, dtype=np.int64)
    reader[pairs // n] = pairs % n  # the only reader where n_readers == 1
    sent = (pb.t_out | (pb.t_ncons > 0)) & (pb.t_p >= 0)
    save = np.bincount(pb.t_p[sent], weights=pb.t_comm[sent], minlength=n)
    new = np.bincount(pb.e_c, weights=pb.t_comm[pb.e_t], minlength=n)
    delta = pb.cs + pb.out_down - pb.cd - save + new
    mag = pb.cs + pb.out_down + pb.cd + save + new
    shared = np.zeros(n, dtype=bool)
    for gr in [*(rd for _, rd, _ in pb.tied), *pb.same]:
        shared[list(gr)] = True
    ok = (n_readers == 1) & ~pb.forced_dev & ~shared & (delta <= 1e-9 * mag)
    unsure = np.nonzero(ok & (delta > -1e-9 * mag))[0]  # float sign not certain: be exact
    for u in unsure.tolist():
        ok[u] = _exact_delta(pb, u) <= 0
    us = np.nonzero(ok)[0]
    return list(zip(us.tolist(), reader[us].tolist()))


def _exact_delta(pb: bl.Problem, u: int) -> Fraction:
    g, F = pb.graph, Fraction
    obj, up, down = pb.objective, F(pb.link.uplink), F(pb.link.downlink)
    grads = needs_grad(g) if obj == "training" else frozenset()

    def comm(j):
        name = pb.t_names[j]
        nb = F(g.tensors[name].nbytes)
        return nb / up + (nb / down if name in grads else 0)

    op = g.ops[u]
    d = F(op.server.for_objective(obj)) - F(op.device.for_objective(obj))
    if obj == "inference":
        d += sum((F(g.tensors[o].nbytes) / down for o in g.outputs
                  if g.tensors[o].producer == op.name), F(0))
    sent = np.nonzero((pb.t_p == u) & (pb.t_out | (pb.t_ncons > 0)))[0]
    d -= sum((comm(j) for j in sent.tolist()), F(0))
    return d + sum((comm(j) for j in pb.e_t[pb.e_c == u].tolist()), F(0))


def build_network(pb: bl.Problem, reduce: bool = True) -> Network:
    """The flow network of ``pb`` (module docstring); ``reduce`` adds the exact shortcuts:
    single-reader tensors without an aux node, and :func:`_chain_merges`."""
    n_ops, i64 = len(pb.graph.ops), np.int64
    T: list = []
    H: list = []
    C: list = []

    def arcs(t, h, c):
        t = np.asarray(t, dtype=i64)
        T.append(t)
        H.append(np.broadcast_to(np.asarray(h, dtype=i64), t.shape))
        C.append(np.broadcast_to(np.asarray(c, dtype=float), t.shape))

    cd, cs = pb.cd.copy(), pb.cs + pb.out_down
    constant = pb.constant
    made = pb.e_p >= 0
    arcs(2 + pb.e_c[made], 2 + pb.e_p[made], _INF)  # nothing on the server feeds the device
    # training output: it crosses to the loss whenever it is made on the device
    out = pb.t_out
    np.add.at(cd, pb.t_p[out & (pb.t_p >= 0)], pb.t_comm[out & (pb.t_p >= 0)])
    constant += float(pb.t_comm[out & (pb.t_p < 0)].sum())
    # readers of model inputs are pinned to the device unless raw upload is allowed
    sent = ~out & (pb.t_ncons > 0) & ((pb.t_p >= 0) | pb.allow_raw_upload)
    tail = np.where(pb.t_p < 0, 0, 2 + pb.t_p)
    single = sent & (pb.t_ncons == 1) if reduce else np.zeros_like(sent)
    first = np.full(len(pb.t_p), -1, dtype=i64)
    first[pb.e_t[::-1]] = pb.e_c[::-1]  # a consumer of each tensor
    arcs(tail[single], 2 + first[single], pb.t_comm[single])
    multi = np.nonzero(sent & ~single)[0]
    aux = np.full(len(pb.t_p), -1, dtype=i64)
    aux[multi] = 2 + n_ops + np.arange(len(multi))
    arcs(tail[multi], aux[multi], pb.t_comm[multi])
    e = aux[pb.e_t] >= 0
    arcs(aux[pb.e_t[e]], 2 + pb.e_c[e], _INF)
    nodes = 2 + n_ops + len(multi)
    ops = 2 + np.arange(n_ops)
    arcs(np.zeros(n_ops), ops, np.where(pb.forced_dev, _INF, cs))
    arcs(ops, np.ones(n_ops), np.where(pb.forced_srv, _INF, cd))
    for gr in pb.same:
        g2 = 2 + np.asarray(gr)
        arcs(np.concatenate([g2[:-1], g2[1:]]), np.concatenate([g2[1:], g2[:-1]]), _INF)
    if pb.objective == "training" and pb.tied_policy == "sync":
        for _, readers, c in pb.tied:
            U, V = nodes, nodes + 1
            nodes += 2
            r = 2 + np.asarray(readers)
            arcs([U, 0], [1, V], c)
            arcs(r, U, _INF)
            arcs(np.full(len(r), V), r, _INF)
            constant -= c
    merges = tuple(_chain_merges(pb)) if reduce else ()
    if merges:
        m = np.array(merges, dtype=i64)
        arcs(2 + m[:, 0], 2 + m[:, 1], _INF)
    return Network(np.concatenate(T), np.concatenate(H), np.concatenate(C).astype(float),
                   nodes, n_ops, constant, merges)


def _mincut(pb: bl.Problem, engine: str, reduce: bool, stats: dict | None = None):
    """Device mask of a minimum cut of ``pb`` (exact up to the int64 scaling, maxflow.scale)."""
    net = build_network(pb, reduce)
    ref = bl.device_only(pb)
    # The fix-up of _chain_merges (u to the server while u dev and w srv; descending u is one
    # pass since it only moves ops earlier than u) keeps ref valid and no dearer.
    for u, w in sorted(net.merges, reverse=True):
        if ref[u] and not ref[w]:
            ref[u] = False
    cands = [(pb.cost(ref), ref)]
    if pb.objective == "inference" and pb.link.latency > 0:
        quiet = _no_crossing(pb)
        if quiet is not None:
            cands.append((pb.cost(quiet), quiet))
    clamp = net.value(ref)
    if not np.isfinite(clamp):
        raise PlanError("Partition: internal error: the reference placement has no finite cut; "
                        "please report this bug")
    if clamp <= 0:
        return pb.best_exact(cands)
    caps, k, inf = scale(net.caps, clamp)
    if inf_path(net.tails, net.heads, caps, net.n, 0, 1, inf) is not None:
        raise PlanError("Partition: internal error: pins consistent but the network has an "
                        "infinite s-t path; please report this bug")
    if reduce:
        red = reduce_network(net.tails, net.heads, caps, net.n, 0, 1, inf)
        value, mask = min_cut(red.tails, red.heads, red.caps, red.n, 0, 1, engine)
        side = red.expand(mask)
        value += red.offset
        size = (red.n, len(red.tails))
    else:
        value, side = min_cut(net.tails, net.heads, caps, net.n, 0, 1, engine)
        size = (net.n, len(net.tails))
    if stats is not None:
        stats.update(value=value, scale=k, inf=inf, network=(net.n, len(net.tails)),
                     solved=size, net=net, caps=caps, side=side)
    dev = side[2: 2 + net.n_ops].copy()
    if not pb.valid(dev):
        raise PlanError("Partition: internal error: the min cut is not a valid placement "
                        f"(engine {engine}); please report this bug")
    return pb.best_exact([(pb.cost(dev), dev), *cands])


def _no_crossing(pb: bl.Problem):
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


def _blockwise(pb: bl.Problem, engine: str, reduce: bool, notes: list):
    found = find_blocks(pb.graph)
    blocks = list(found.blocks)
    kw = dict(objective=pb.objective, pins=pb.pins, tied_policy=pb.tied_policy,
              allow_raw_upload=pb.allow_raw_upload)
    forced = pb.forced_dev | pb.forced_srv
    while True:
        try:
            pbb = bl.Problem(pb.graph, pb.link, groups=tuple(blocks), **kw)
            break
        except PlanError:  # a block straddles contradictory pins: keep only pin-free blocks
            keep = [b for b in blocks if not any(forced[pb.index[o]] for o in b)]
            blocks = keep if len(keep) < len(blocks) else []
    size = found.n_ops - sum(len(b) - 1 for b in blocks)
    notes.append(f"blockwise: {len(blocks)} repeated blocks ({found.signatures} signatures) "
                 f"contracted, {found.n_ops} ops -> {size} vertices")
    return _mincut(pbb, engine, reduce)


def solve(graph: OpGraph, link: Link, *, objective: str = "training", algorithm: str = "mincut",
          pins: dict[str, str] | None = None, engine: str = "ortools", reduce: bool = True,
          tied_policy: str = "sync", allow_raw_upload: bool = False,
          device_profile: str = "", server_profile: str = "") -> Plan:
    """Place every op of ``graph`` on the device or the server; see the module docstring."""
    if algorithm not in ALGORITHMS:
        raise InputError(f"Partition: unknown algorithm {algorithm!r}; use one of "
                         f"{', '.join(ALGORITHMS)}")
    if engine not in ENGINES:
        raise InputError(f"Partition: unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    raw = allow_raw_upload or algorithm == "server-only"
    pb = bl.Problem(graph, link, objective, None if algorithm == "server-only" else pins,
                    tied_policy, raw)
    notes: list[str] = []
    if algorithm == "mincut":
        dev = _mincut(pb, engine, reduce)
    elif algorithm == "blockwise":
        dev = _blockwise(pb, engine, reduce, notes)
    elif algorithm == "layerwise":
        dev = bl.layerwise(pb)
        if dev is None:
            raise PlanError("Partition: no single cut of the topological order respects the "
                            "pins; use algorithm 'mincut'")
    elif algorithm == "device-only":
        dev = bl.device_only(pb)
        if not dev.all():
            notes.append(f"device-only: {int((~dev).sum())} ops forced to the server by pins")
    elif algorithm == "server-only":
        dev = bl.server_only(pb)
        notes.append("server-only: raw data leaves the device" +
                     ("; pins ignored" if pins else ""))
    else:
        dev = bl.exhaustive(pb)
    if algorithm != "server-only" and not pb.valid(dev):
        raise PlanError(f"Partition: internal error: {algorithm} returned an invalid placement")
    if pb.tied:
        names = ", ".join(p for p, _, _ in pb.tied)
        notes.append(f"tied weights {names}: " + (
            "readers pinned to one side" if tied_policy == "pin" else
            "synced per step (bytes up + down) when their readers are split"))
    return Plan.build(graph, pb.placement(dev), link, objective, algorithm, device_profile,
                      server_profile, tied_policy=tied_policy, pins=dict(pins or {}),
                      notes=tuple(notes), solve_seconds=time.perf_counter() - t0)


def compare(graph: OpGraph, link: Link, *, objective: str = "training", pins=None,
            algorithms=None, **kw) -> dict[str, Plan]:
    """Every algorithm side by side; exhaustive only up to the size limit (noted otherwise)."""
    algos = list(algorithms or ALGORITHMS)
    out: dict[str, Plan] = {}
    skipped: list[str] = []
    for a in algos:
        try:
            out[a] = solve(graph, link, objective=objective, algorithm=a, pins=pins, **kw)
        except (InputError, PlanError) as e:
            if a not in ("exhaustive", "layerwise") or "internal" in str(e):
                raise
            skipped.append(f"{a} skipped: {str(e).removeprefix('Partition: ')}")
    if "mincut" in out:
        notes = list(out["mincut"].notes) + skipped
        if "blockwise" in out:
            b, m = out["blockwise"], out["mincut"]
            gap = float((b.total - m.total) / m.total) if m.total else 0.0
            speed = m.solve_seconds / b.solve_seconds if b.solve_seconds else float("nan")
            msg = (f"blockwise optimum {'equals' if gap <= 1e-9 else 'is above'} the op-level "
                   f"min cut (gap {gap:.2%}), solve speed-up {speed:.2f}x")
            notes.append(msg)
            out["blockwise"] = dataclasses.replace(b, notes=b.notes + (msg,))
        out["mincut"] = dataclasses.replace(out["mincut"], notes=tuple(notes))
    return out
