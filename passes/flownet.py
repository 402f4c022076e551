"""The s-t flow network of a partition Problem (float capacities), IR-free.

Built by ``passes/partition.py`` (whose docstring draws the construction) and handed to
``passes/maxflow.py`` after int64 scaling. Node ids: ``s = 0``, ``t = 1``, op i is ``2 + i``,
auxiliary nodes (one per multi-reader tensor, two per synced tied weight) after the ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from splitc.passes import baselines as bl
from splitc.passes.opgraph import needs_grad

__all__ = ["Network", "build_network"]

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
        side[2 : 2 + self.n_ops] = dev
        aux = np.zeros(self.n, dtype=bool)
        aux[2 + self.n_ops :] = True
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
        d += sum(
            (F(g.tensors[o].nbytes) / down for o in g.outputs if g.tensors[o].producer == op.name),
            F(0),
        )
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
    if pb.same:  # same-side groups: a chain of INF arcs both ways
        ga = 2 + np.array([x for gr in pb.same for x in gr[:-1]], dtype=i64)
        gb = 2 + np.array([x for gr in pb.same for x in gr[1:]], dtype=i64)
        arcs(np.concatenate([ga, gb]), np.concatenate([gb, ga]), _INF)
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
    return Network(
        np.concatenate(T),
        np.concatenate(H),
        np.concatenate(C).astype(float),
        nodes,
        n_ops,
        constant,
        merges,
    )
