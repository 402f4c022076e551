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

import numpy as np
from splitc import InputError, PlanError
from splitc.cost_models.link import Link
from splitc.passes import baselines as bl
from splitc.passes.blockwise import find_blocks
from splitc.passes.flownet import Network, build_network
from splitc.passes.maxflow import ENGINES, inf_path, min_cut, reduce_network, scale
from splitc.passes.opgraph import OpGraph
from splitc.passes.plan import Plan

__all__ = ["ALGORITHMS", "ENGINES", "Network", "build_network", "compare", "solve"]

ALGORITHMS = (
    "mincut",
    "blockwise",
    "layerwise",
    "device-only",
    "server-only",
    "exhaustive",
)


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
        quiet = bl.no_crossing(pb)
        if quiet is not None:
            cands.append((pb.cost(quiet), quiet))
    clamp = net.value(ref)
    if not np.isfinite(clamp):
        raise PlanError(
            "Partition: internal error: the reference placement has no finite cut; "
            "please report this bug"
        )
    if clamp <= 0:
        return pb.best_exact(cands)
    caps, k, inf = scale(net.caps, clamp)
    if inf_path(net.tails, net.heads, caps, net.n, 0, 1, inf) is not None:
        raise PlanError(
            "Partition: internal error: pins consistent but the network has an "
            "infinite s-t path; please report this bug"
        )
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
        stats.update(
            value=value,
            scale=k,
            inf=inf,
            network=(net.n, len(net.tails)),
            solved=size,
            net=net,
            caps=caps,
            side=side,
        )
    dev = side[2 : 2 + net.n_ops].copy()
    if not pb.valid(dev):
        raise PlanError(
            "Partition: internal error: the min cut is not a valid placement "
            f"(engine {engine}); please report this bug"
        )
    return pb.best_exact([(pb.cost(dev), dev), *cands])


def _blockwise(pb: bl.Problem, engine: str, reduce: bool, notes: list, stats=None):
    made = pb.e_p >= 0
    found = find_blocks(pb.graph, edges=(pb.e_p[made], pb.e_c[made]))
    blocks = list(found.blocks)
    forced = pb.forced_dev | pb.forced_srv
    while True:
        try:
            pbb = pb.with_groups(tuple(blocks))
            break
        except PlanError:  # a block straddles contradictory pins: keep only pin-free blocks
            keep = [b for b in blocks if not any(forced[pb.index[o]] for o in b)]
            blocks = keep if len(keep) < len(blocks) else []
    size = found.n_ops - sum(len(b) - 1 for b in blocks)
    notes.append(
        f"blockwise: {len(blocks)} repeated blocks ({found.signatures} signatures) "
        f"contracted, {found.n_ops} ops -> {size} vertices"
    )
    return _mincut(pbb, engine, reduce, stats)


def solve(
    graph: OpGraph,
    link: Link,
    *,
    objective: str = "training",
    algorithm: str = "mincut",
    pins: dict[str, str] | None = None,
    engine: str = "ortools",
    reduce: bool = True,
    tied_policy: str = "sync",
    allow_raw_upload: bool = False,
    device_profile: str = "",
    server_profile: str = "",
) -> Plan:
    """Place every op of ``graph`` on the device or the server; see the module docstring."""
    if algorithm not in ALGORITHMS:
        raise InputError(
            f"Partition: unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    if engine not in ENGINES:
        raise InputError(f"Partition: unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    raw = allow_raw_upload or algorithm == "server-only"
    pb = bl.Problem(
        graph,
        link,
        objective,
        None if algorithm == "server-only" else pins,
        tied_policy,
        raw,
    )
    notes: list[str] = []
    stats: dict = {}
    if algorithm == "mincut":
        dev = _mincut(pb, engine, reduce, stats)
    elif algorithm == "blockwise":
        dev = _blockwise(pb, engine, reduce, notes, stats)
    elif algorithm == "layerwise":
        dev = bl.layerwise(pb)
        if dev is None:
            raise PlanError(
                "Partition: no single cut of the topological order respects the "
                "pins; use algorithm 'mincut'"
            )
    elif algorithm == "device-only":
        dev = bl.device_only(pb)
        if not dev.all():
            notes.append(f"device-only: {int((~dev).sum())} ops forced to the server by pins")
    elif algorithm == "server-only":
        dev = bl.server_only(pb)
        notes.append("server-only: raw data leaves the device" + ("; pins ignored" if pins else ""))
    else:
        dev = bl.exhaustive(pb)
    if algorithm != "server-only" and not pb.valid(dev):
        raise PlanError(f"Partition: internal error: {algorithm} returned an invalid placement")
    if "network" in stats:
        (n, e), (rn, re_) = stats["network"], stats["solved"]
        notes.append(
            f"{algorithm} ({engine}): flow network {n} nodes / {e} arcs, solved on {rn} / {re_}"
            f" after {'exact reductions' if reduce else 'no reductions'}; capacities x "
            f"{stats['scale']:.4g} to int64"
        )
    if pb.tied:
        names = ", ".join(p for p, _, _ in pb.tied)
        notes.append(
            f"tied weights {names}: "
            + (
                "readers pinned to one side"
                if tied_policy == "pin"
                else "synced per step (bytes up + down) when their readers are split"
                if objective == "training"
                else "no sync in inference (weights do not change)"
            )
        )
    return Plan.build(
        graph,
        pb.placement(dev),
        link,
        objective,
        algorithm,
        device_profile,
        server_profile,
        tied_policy=tied_policy,
        pins=dict(pins or {}),
        notes=tuple(notes),
        solve_seconds=time.perf_counter() - t0,
    )


def compare(
    graph: OpGraph,
    link: Link,
    *,
    objective: str = "training",
    pins=None,
    algorithms=None,
    **kw,
) -> dict[str, Plan]:
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
            msg = (
                f"blockwise optimum {'equals' if gap <= 1e-9 else 'is above'} the op-level "
                f"min cut (gap {gap:.2%}), solve speed-up {speed:.2f}x"
            )
            notes.append(msg)
            out["blockwise"] = dataclasses.replace(b, notes=b.notes + (msg,))
        if "exhaustive" in out:
            same = out["exhaustive"].total == out["mincut"].total
            notes.append(f"exhaustive optimum {'equals' if same else 'differs from'} the min cut")
        out["mincut"] = dataclasses.replace(out["mincut"], notes=tuple(notes))
    return out
