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

    If u has one consumer w, is not forced to the device and shares no weight, moving u from
    the device to the server whenever u is on the device and w on the server changes the cost
    by at most ``delta = c_srv(u) - c_dev(u) - (outputs of u that stop crossing) + (inputs of
    u that may start crossing) [+ results of u coming down, inference]``, a constant. If
    ``delta <= 0`` there is an optimum with ``u dev => w dev``. All merges move ops towards
    the server, so applying the fix-up repeatedly to an optimum terminates (the device set
    shrinks) without raising the cost: every merge holds in one optimum at once.
    """
    tied = {r for _, rd, _ in pb.tied for r in rd} | {r for gr in pb.same for r in gr}
    outs: dict[int, list] = {}
    ins: dict[int, list] = {}
    for rec in pb.tensors:
        _, p, cons, _, _ = rec
        if p >= 0:
            outs.setdefault(p, []).append(rec)
        for c in cons:
            ins.setdefault(c, []).append(rec)
    pairs = []
    for u in range(len(pb.graph.ops)):
        if pb.forced_dev[u] or u in tied or u not in outs:
            continue
        readers = {c for rec in outs[u] for c in rec[2]}
        if len(readers) != 1:
            continue
        save = [rec[4] for rec in outs[u] if rec[3] or rec[2]]
        new = [rec[4] for rec in ins.get(u, ())]
        terms = [pb.cs[u] + pb.out_down[u], -pb.cd[u], *(-x for x in save), *new]
        delta = sum(terms)
        if delta > -1e-9 * sum(abs(x) for x in terms):
            if delta > 1e-9 * sum(abs(x) for x in terms) or _exact_delta(pb, u, outs, ins) > 0:
                continue
        pairs.append((u, readers.pop()))
    return pairs


def _exact_delta(pb: bl.Problem, u: int, outs, ins) -> Fraction:
    g, F = pb.graph, Fraction
    obj, up, down = pb.objective, F(pb.link.uplink), F(pb.link.downlink)
    grads = needs_grad(g) if obj == "training" else frozenset()

    def comm(name):
        nb = F(g.tensors[name].nbytes)
        return nb / up + (nb / down if name in grads else 0)

    op = g.ops[u]
    d = F(op.server.for_objective(obj)) - F(op.device.for_objective(obj))
    d += sum((F(g.tensors[o].nbytes) / down for o in g.outputs
              if g.tensors[o].producer == op.name), F(0)) if obj == "inference" else 0
    d -= sum((comm(rec[0]) for rec in outs[u] if rec[3] or rec[2]), F(0))
    return d + sum((comm(rec[0]) for rec in ins.get(u, ())), F(0))


def build_network(pb: bl.Problem, reduce: bool = True) -> Network:
    """The flow network of ``pb`` (module docstring); ``reduce`` adds the exact shortcuts:
    single-reader tensors without an aux node, and :func:`_chain_merges`."""
    n_ops = len(pb.graph.ops)
    T: list[int] = []
    H: list[int] = []
    C: list[float] = []
    nxt = [2 + n_ops]

    def arc(u, v, c):
        T.append(u)
        H.append(v)
        C.append(c)

    def aux():
        nxt[0] += 1
        return nxt[0] - 1

    cd, cs = pb.cd.copy(), pb.cs + pb.out_down
    constant = pb.constant
    for _, p, cons, out, comm in pb.tensors:
        for c in cons:
            if p >= 0:
                arc(2 + c, 2 + p, _INF)
        if out:  # training output: it crosses to the loss whenever it is made on the device
            if p >= 0:
                cd[p] += comm
            else:
                constant += comm
            continue
        if not cons or (p < 0 and not pb.allow_raw_upload):
            continue  # readers of model inputs are pinned to the device
        tail = 0 if p < 0 else 2 + p
        if reduce and len(cons) == 1:
            arc(tail, 2 + cons[0], comm)
        else:
            a = aux()
            arc(tail, a, comm)
            for c in cons:
                arc(a, 2 + c, _INF)
    for i in range(n_ops):
        arc(0, 2 + i, _INF if pb.forced_dev[i] else cs[i])
        arc(2 + i, 1, _INF if pb.forced_srv[i] else cd[i])
    for gr in pb.same:
        for a, b in zip(gr, gr[1:]):
            arc(2 + a, 2 + b, _INF)
            arc(2 + b, 2 + a, _INF)
    if pb.objective == "training" and pb.tied_policy == "sync":
        for _, readers, c in pb.tied:
            U, V = aux(), aux()
            arc(U, 1, c)
            arc(0, V, c)
            for r in readers:
                arc(2 + r, U, _INF)
                arc(V, 2 + r, _INF)
            constant -= c
    if reduce:
        for u, w in _chain_merges(pb):
            arc(2 + u, 2 + w, _INF)
    return Network(np.array(T, dtype=np.int64), np.array(H, dtype=np.int64),
                   np.array(C, dtype=float), nxt[0], n_ops, constant)


def _mincut(pb: bl.Problem, engine: str, reduce: bool, stats: dict | None = None):
    """Device mask of a minimum cut of ``pb`` (exact up to the int64 scaling, maxflow.scale)."""
    net = build_network(pb, reduce)
    ref = bl.device_only(pb)
    cands = [(pb.cost(ref), ref)]
    if pb.objective == "inference" and pb.link.latency > 0:
        quiet = _no_crossing(pb)
        if quiet is not None:
            cands.append((pb.cost(quiet), quiet))
    clamp = net.value(ref)
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

    for _, p, cons, _, _ in pb.tensors:
        for c in cons:
            if p >= 0:
                root[find(c)] = find(p)
    for gr in pb.same:
        for a in gr[1:]:
            root[find(a)] = find(gr[0])
    comp = np.array([find(i) for i in range(n)])
    dev_only = pb.forced_dev | pb.makes_result  # and readers of model inputs (raw upload)
    for _, p, cons, _, _ in pb.tensors:
        if p < 0:
            dev_only[list(cons)] = True
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
