"""The partition problem as plain data: what a placement may do, and its float price.

:class:`Problem` resolves what a placement may do (pins, model-input readers, tied weights)
once for all algorithms and prices placements in floats, mirroring ``passes/plan.py``'s
``evaluate`` line by line; every answer is re-costed exactly by ``evaluate`` before it is
returned. IR-free, no TVM. The baseline algorithms live in ``passes/baselines.py`` (which
re-exports :class:`Problem`).
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from splitc import InputError, PlanError
from splitc.cost_models.link import Link
from splitc.passes.opgraph import OpGraph, needs_grad
from splitc.passes.plan import OBJECTIVES, Placement, evaluate

__all__ = ["TIED_POLICIES", "Problem"]

TIED_POLICIES = ("sync", "pin")
# Float prices of near-best placements are re-costed exactly; 1e-9 relative is far above the
# ~1e-13 relative error of summing a few hundred float64 terms.
_NEAR = 1e-9


def _reach_many(n, tails, heads, starts) -> np.ndarray:
    """Mask of nodes reachable from any of ``starts`` (scipy BFS from a virtual root)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    m = np.zeros(n, dtype=bool)
    if not len(starts):
        return m
    t = np.concatenate([tails, np.full(len(starts), n)])
    h = np.concatenate([heads, np.asarray(starts, dtype=np.int64)])
    g = csr_matrix((np.ones(len(t), dtype=np.int8), (t, h)), shape=(n + 1, n + 1))
    m[breadth_first_order(g, n, directed=True, return_predecessors=False)[1:]] = True
    return m


def _resolve_pins(graph: OpGraph, pins: dict | None) -> dict[str, tuple[str, str]]:
    """Op -> (side, pattern). Exact names win over globs; a pattern must match some op."""
    names = [op.name for op in graph.ops]
    out: dict[str, tuple[str, str]] = {}
    for pat, side in (pins or {}).items():
        if side not in ("device", "server"):
            raise InputError(f"Partition: pin {pat!r}={side!r}; the side must be device or server")
        hits = [pat] if pat in names else fnmatch.filter(names, pat)
        if not hits:
            raise InputError(
                f"Partition: pin {pat!r} matches no op; use an op name or a glob "
                f"such as {names[0]!r} or 'conv*' (see the graph's op list)"
            )
        for h in hits:
            if h in out and out[h][0] != side:
                raise PlanError(
                    f"Partition: op {h!r} is pinned to {out[h][0]} by {out[h][1]!r} "
                    f"and to {side} by {pat!r}; remove one of the two pins"
                )
            out[h] = (side, pat)
    return out


@dataclass
class Problem:
    """Everything the solvers share: per-op costs, tensors, pins and forced sides."""

    graph: OpGraph
    link: Link
    objective: str = "training"
    pins: dict | None = None
    tied_policy: str = "sync"
    allow_raw_upload: bool = False
    groups: tuple[tuple[str, ...], ...] = ()  # extra "same side" groups (blockwise)
    index: dict = field(init=False)

    def __post_init__(self) -> None:
        g, obj = self.graph, self.objective
        if obj not in OBJECTIVES:
            raise InputError(f"Partition: unknown objective {obj!r}; use training or inference")
        if self.tied_policy not in TIED_POLICIES:
            raise InputError(
                f"Partition: unknown tied_policy {self.tied_policy!r}; use sync or pin"
            )
        self.index = {op.name: i for i, op in enumerate(g.ops)}
        n = len(g.ops)
        self.cd = np.array([op.device.for_objective(obj) for op in g.ops], dtype=float)
        self.cs = np.array([op.server.for_objective(obj) for op in g.ops], dtype=float)
        grads = needs_grad(g) if obj == "training" else frozenset()
        up, down = self.link.uplink, self.link.downlink
        # Tensors as arrays: producer index (-1: model input), comm time, training output;
        # distinct consumers in CSR form: entry e reads tensor e_t[e] in op e_c[e].
        names, prod, comm, outs, e_t, e_c = [], [], [], [], [], []
        idx = self.index
        for j, t in enumerate(g.tensors.values()):
            nb = t.nbytes
            names.append(t.name)
            prod.append(-1 if t.producer is None else idx[t.producer])
            comm.append(nb / up + (nb / down if t.name in grads else 0.0))
            outs.append(t.is_output and obj == "training")
            for c in dict.fromkeys(t.consumers):
                e_t.append(j)
                e_c.append(idx[c])
        self.t_names = names
        self.t_p = np.array(prod, dtype=np.int64)
        self.t_comm = np.array(comm, dtype=float)
        self.t_out = np.array(outs, dtype=bool)
        self.e_t = np.array(e_t, dtype=np.int64)
        self.e_c = np.array(e_c, dtype=np.int64)
        self.t_ncons = np.bincount(self.e_t, minlength=len(names))
        self.e_p = self.t_p[self.e_t]  # producer of the tensor each entry reads
        self.out_down = np.zeros(n)  # inference: result bytes down when made on the server
        self.makes_result = np.zeros(n, dtype=bool)
        if obj == "inference":
            for name in g.outputs:
                t = g.tensors[name]
                if t.producer is not None:
                    self.out_down[self.index[t.producer]] += t.nbytes / down
                    self.makes_result[self.index[t.producer]] = True
        self.tied = []  # (param, reader indices) for weights read by two or more ops
        for p in g.params.values():
            unknown = [r for r in p.readers if r not in self.index]
            if unknown:
                raise InputError(
                    f"Partition: param {p.name!r} lists reader {unknown[0]!r} "
                    "that is no op; re-run AnnotateCosts"
                )
            readers = tuple(sorted({self.index[r] for r in p.readers}))
            if len(readers) > 1:
                self.tied.append((p.name, readers, p.nbytes / up + p.nbytes / down))
        self.constant = 0.0  # training constants evaluate() adds: loss, labels, latency
        if obj == "training":
            self.constant = (
                g.loss_server.training
                + 2 * self.link.latency
                + sum(t.nbytes for t in g.labels) / up
            )
        self._forced()

    def with_groups(self, groups: tuple[tuple[str, ...], ...]) -> Problem:
        """The same problem with extra same-side groups (reuses the arrays; pins re-checked)."""
        out = copy.copy(self)
        out.groups = tuple(groups)
        out._forced()
        return out

    # -- pins and forced sides ----------------------------------------------------------
    def _forced(self) -> None:
        g, idx, n = self.graph, self.index, len(self.graph.ops)
        reason: dict[int, tuple[str, str]] = {}
        for name, (side, pat) in _resolve_pins(g, self.pins).items():
            reason[idx[name]] = (side, f"pinned to {side} by {pat!r}")
        if not self.allow_raw_upload:
            for name in g.inputs:
                for c in g.tensors[name].consumers:
                    i = idx[c]
                    if reason.get(i, ("device",))[0] == "server":
                        raise PlanError(
                            f"Partition: op {c!r} is {reason[i][1]} but reads model "
                            f"input {name!r} and raw data never leaves the device; "
                            "unpin it or pass allow_raw_upload=True"
                        )
                    reason.setdefault(i, ("device", f"reads model input {name!r}"))
        self.reason = reason
        groups = [list(gr) for gr in self.groups]
        if self.tied_policy == "pin":
            groups += [[g.ops[r].name for r in rd] for _, rd, _ in self.tied]
        self.same = [[idx[x] for x in gr] for gr in groups if len(gr) > 1]
        ga = np.array([x for gr in self.same for x in gr[:-1]], dtype=np.int64)
        gb = np.array([x for gr in self.same for x in gr[1:]], dtype=np.int64)
        e = self.e_p >= 0
        # "x on the device => y on the device": consumer -> producer, and same-side groups;
        # the reverse for the server.
        dev_t = np.concatenate([self.e_c[e], ga, gb])
        dev_h = np.concatenate([self.e_p[e], gb, ga])
        dev_start = [i for i, r in reason.items() if r[0] == "device"]
        srv_start = [i for i, r in reason.items() if r[0] == "server"]
        self.forced_dev = _reach_many(n, dev_t, dev_h, dev_start)
        self.forced_srv = _reach_many(n, dev_h, dev_t, srv_start)
        if (self.forced_dev & self.forced_srv).any():
            self._contradiction(n, dev_t, dev_h, dev_start, srv_start)

    def _contradiction(self, n, dev_t, dev_h, dev_start, srv_start):
        g, reason = self.graph, self.reason
        dev_next: list[list[int]] = [[] for _ in range(n)]
        srv_next: list[list[int]] = [[] for _ in range(n)]
        for a, b in zip(dev_t.tolist(), dev_h.tolist()):
            dev_next[a].append(b)
            srv_next[b].append(a)
        dev_par = self._closure(dev_start, dev_next)
        srv_par = self._closure(srv_start, srv_next)
        x = min(set(dev_par) & set(srv_par))
        d, p = self._root(x, dev_par), self._root(x, srv_par)
        chain = self._chain(x, srv_par)[::-1] + self._chain(x, dev_par)[1:]
        names = " -> ".join(g.ops[i].name for i in chain)
        raise PlanError(
            f"Partition: contradictory pins: {g.ops[p].name!r} ({reason[p][1]}) must run on "
            f"the server and {g.ops[d].name!r} ({reason[d][1]}) on the device, but the first "
            f"feeds the second ({names}) and nothing on the server may feed the device; "
            "change one of these pins"
        )

    @staticmethod
    def _closure(start, nxt):
        par = {i: -1 for i in start}
        stack = list(start)
        while stack:
            u = stack.pop()
            for v in nxt[u]:
                if v not in par:
                    par[v] = u
                    stack.append(v)
        return par

    @staticmethod
    def _chain(x, par):
        out = [x]
        while par[out[-1]] != -1:
            out.append(par[out[-1]])
        return out

    def _root(self, x, par):
        return self._chain(x, par)[-1]

    @property
    def free(self) -> int:
        return int((~(self.forced_dev | self.forced_srv)).sum())

    # -- pricing ------------------------------------------------------------------------
    def _any(self, entry_mask) -> np.ndarray:
        """Per tensor: does any of its consumer entries satisfy ``entry_mask``?"""
        return np.bincount(self.e_t[entry_mask], minlength=len(self.t_p)) > 0

    def _crossing(self, dev):
        """(tensors that cross, whether a server tensor feeds the device) for ``dev``."""
        on_dev = np.ones(len(self.t_p), dtype=bool)
        made = self.t_p >= 0
        on_dev[made] = dev[self.t_p[made]]
        ping = bool((~on_dev & self._any(dev[self.e_c])).any())
        return on_dev & (self.t_out | self._any(~dev[self.e_c])), ping

    def cost(self, dev) -> float:
        """Float price of a placement (``dev[i]``: op i on the device), inf when infeasible.

        Mirrors ``evaluate`` term by term; used to rank candidates before the exact re-cost.
        """
        dev = np.asarray(dev, dtype=bool)
        cross, ping = self._crossing(dev)
        if ping:
            return float("inf")
        tot = float(self.cd[dev].sum() + self.cs[~dev].sum() + self.t_comm[cross].sum())
        tot += self.constant
        if self.objective == "training":
            tot += sum(c for _, rd, c in self.tied if len({bool(dev[r]) for r in rd}) == 2)
        else:
            tot += float(self.out_down[~dev].sum())
            if cross.any() or self.makes_result[~dev].any():
                tot += 2 * self.link.latency
        return tot

    def valid(self, dev) -> bool:
        dev = np.asarray(dev, dtype=bool)
        if (self.forced_dev & ~dev).any() or (self.forced_srv & dev).any():
            return False
        if any(len({bool(dev[i]) for i in gr}) > 1 for gr in self.same):
            return False
        return not self._crossing(dev)[1]

    def placement(self, dev) -> Placement:
        return Placement.of(op.name for op, d in zip(self.graph.ops, dev) if d)

    def exact(self, dev) -> Fraction:
        return evaluate(self.graph, self.placement(dev), self.link, self.objective).total

    def best_exact(self, candidates):
        """The exactly cheapest of ``(float cost, dev mask)`` candidates near the float best."""
        lo = min(c for c, _ in candidates)
        near: dict[bytes, np.ndarray] = {}
        for c, d in candidates:
            if c <= lo + _NEAR * max(abs(lo), 1e-300):
                near.setdefault(np.packbits(d).tobytes() + bytes([len(d) % 8]), d)
        if len(near) == 1:  # the caller re-costs the winner exactly (Plan.build)
            return next(iter(near.values()))
        return min(near.values(), key=self.exact)
