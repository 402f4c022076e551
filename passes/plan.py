"""Placement, delay breakdown and Plan: the decision the solver hands to the split.

``evaluate`` is the single definition of what a placement costs. Every solver result is
re-costed through it, and it uses exact rational arithmetic (``fractions.Fraction`` of the
float costs) so that ``total == device + uplink + server + downlink + fixed == cut value``
holds exactly, not to a tolerance.

Training objective, per step (shared/ARCHITECTURE.md):
- device   = sum of fwd+bwd+update of device ops
- server   = sum of fwd+bwd+update of server ops + the loss
- uplink   = bytes of each crossing tensor (once, however many server readers) / uplink
             + label bytes / uplink + bytes of each weight read on both sides / uplink
- downlink = bytes of each crossing tensor that needs a gradient / downlink
             + bytes of each weight read on both sides / downlink (weight sync)
- fixed    = one message up and one down: 2 x link latency
Inference: forward only; the result of a server-side output op comes down; fixed latency only
when something crosses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from fractions import Fraction

from splitc import PlanError
from splitc.cost_models.link import Link
from splitc.passes.opgraph import OpGraph, needs_grad

__all__ = [
    "OBJECTIVES",
    "PLAN_SCHEMA_VERSION",
    "Breakdown",
    "CutTensor",
    "Placement",
    "Plan",
    "crossing_tensors",
    "evaluate",
    "split_params",
]

PLAN_SCHEMA_VERSION = 1
OBJECTIVES = ("training", "inference")


@dataclass(frozen=True)
class Placement:
    """Which ops run on the device; every other op runs on the server."""

    device: frozenset[str]

    def side(self, op: str) -> str:
        return "device" if op in self.device else "server"

    @classmethod
    def of(cls, names) -> Placement:
        return cls(frozenset(names))


@dataclass(frozen=True)
class Breakdown:
    """Predicted delay of one step, in seconds, as exact fractions that add up."""

    device: Fraction
    uplink: Fraction
    server: Fraction
    downlink: Fraction
    fixed: Fraction

    @property
    def total(self) -> Fraction:
        return self.device + self.uplink + self.server + self.downlink + self.fixed

    def to_json(self) -> dict:
        d = {k: float(getattr(self, k)) for k in ("device", "uplink", "server", "downlink", "fixed")}
        d["total"] = float(self.total)
        # Exact values as "p/q" strings so an independent checker can verify the sum exactly.
        d["exact"] = {k: str(getattr(self, k))
                      for k in ("device", "uplink", "server", "downlink", "fixed")}
        return d

    @classmethod
    def from_json(cls, d: dict) -> Breakdown:
        e = d.get("exact")
        if e:
            return cls(*(Fraction(e[k]) for k in ("device", "uplink", "server", "downlink", "fixed")))
        return cls(*(Fraction(d[k]) for k in ("device", "uplink", "server", "downlink", "fixed")))


@dataclass(frozen=True)
class CutTensor:
    """A tensor crossing the cut, in transport order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    grad: bool  # whether its gradient comes back down in training

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.nbytes, "grad": self.grad}

    @classmethod
    def from_json(cls, d: dict) -> CutTensor:
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d["bytes"], d["grad"])


def _check(graph: OpGraph, placement: Placement) -> None:
    names = {op.name for op in graph.ops}
    unknown = placement.device - names
    if unknown:
        raise PlanError(f"Plan: placement names unknown ops {sorted(unknown)[:5]}")


def crossing_tensors(graph: OpGraph, placement: Placement, objective: str = "training"):
    """Tensors made on the device (or model inputs) and read on the server, in graph order.

    In training a model output made on the device also crosses (the loss is on the server).
    Raises ``PlanError`` when a server-side tensor feeds a device op (no ping-pong).
    """
    out = []
    for t in graph.tensors.values():
        on_dev = t.producer is None or t.producer in placement.device
        readers_srv = [c for c in t.consumers if c not in placement.device]
        if not on_dev:
            bad = [c for c in t.consumers if c in placement.device]
            if bad:
                raise PlanError(
                    f"Plan: tensor {t.name!r} made on the server feeds device op {bad[0]!r}; "
                    "a placement must never send data back to the device")
            continue
        if readers_srv or (objective == "training" and t.is_output):
            out.append(t)
    return out


def split_params(graph: OpGraph, placement: Placement) -> list[str]:
    """Parameters read by ops on both sides (tied weights), in graph order."""
    out = []
    for p in graph.params.values():
        sides = {placement.side(r) for r in p.readers}
        if len(sides) == 2:
            out.append(p.name)
    return out


def evaluate(graph: OpGraph, placement: Placement, link: Link, objective: str = "training"
             ) -> Breakdown:
    """Exact per-step delay of ``placement``: the one cost function every solver answers to."""
    if objective not in OBJECTIVES:
        raise PlanError(f"Plan: unknown objective {objective!r}; use training or inference")
    _check(graph, placement)
    F = Fraction
    dev = srv = up = down = F(0)
    for op in graph.ops:
        if op.name in placement.device:
            dev += F(op.device.for_objective(objective))
        else:
            srv += F(op.server.for_objective(objective))
    upr, downr = F(link.uplink), F(link.downlink)
    cross = crossing_tensors(graph, placement, objective)
    if objective == "training":
        grads = needs_grad(graph)
        srv += F(graph.loss_server.training)
        for t in cross:
            up += F(t.nbytes) / upr
            if t.name in grads:
                down += F(t.nbytes) / downr
        for t in graph.labels:
            up += F(t.nbytes) / upr
        for p in split_params(graph, placement):
            nb = graph.params[p].nbytes
            up += F(nb) / upr
            down += F(nb) / downr
        fixed = 2 * F(link.latency)
    else:
        for t in cross:
            up += F(t.nbytes) / upr
        results_down = False
        for name in graph.outputs:
            t = graph.tensors[name]
            if t.producer is not None and t.producer not in placement.device:
                down += F(t.nbytes) / downr
                results_down = True
        fixed = 2 * F(link.latency) if (cross or results_down) else F(0)
    return Breakdown(dev, up, srv, down, fixed)


@dataclass(frozen=True)
class Plan:
    """A solved placement with its transport order and predicted delay."""

    model: str
    model_hash: str
    objective: str
    algorithm: str
    placement: Placement
    cut: tuple[CutTensor, ...]
    breakdown: Breakdown
    link: Link
    device_profile: str
    server_profile: str
    tied_weights: tuple[str, ...] = ()
    tied_policy: str = "sync"  # "sync": charged per step; "pin": readers pinned together
    pins: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    solve_seconds: float = 0.0

    @classmethod
    def build(cls, graph: OpGraph, placement: Placement, link: Link, objective: str,
              algorithm: str, device_profile: str, server_profile: str, **kw) -> Plan:
        """Re-cost ``placement`` exactly and fill in the cut in transport order."""
        bd = evaluate(graph, placement, link, objective)
        grads = needs_grad(graph) if objective == "training" else frozenset()
        cut = tuple(CutTensor(t.name, t.shape, t.dtype, t.nbytes, t.name in grads)
                    for t in crossing_tensors(graph, placement, objective))
        return cls(graph.name, graph.model_hash, objective, algorithm, placement, cut, bd,
                   link, device_profile, server_profile,
                   tied_weights=tuple(split_params(graph, placement)), **kw)

    @property
    def total(self) -> Fraction:
        return self.breakdown.total

    @property
    def plan_id(self) -> str:
        """Hash of model + placement + objective + profiles: both halves must carry the same."""
        h = hashlib.sha256()
        h.update(json.dumps([self.model_hash, sorted(self.placement.device), self.objective,
                             self.device_profile, self.server_profile]).encode())
        return h.hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "schema": PLAN_SCHEMA_VERSION, "plan_id": self.plan_id, "model": self.model,
            "model_hash": self.model_hash, "objective": self.objective,
            "algorithm": self.algorithm, "device_ops": sorted(self.placement.device),
            "cut": [c.to_json() for c in self.cut], "breakdown": self.breakdown.to_json(),
            "link": self.link.to_json(), "device_profile": self.device_profile,
            "server_profile": self.server_profile, "tied_weights": list(self.tied_weights),
            "tied_policy": self.tied_policy, "pins": self.pins, "notes": list(self.notes),
            "solve_seconds": self.solve_seconds,
        }

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        if d.get("schema") != PLAN_SCHEMA_VERSION:
            raise PlanError(f"Plan: schema {d.get('schema')!r}, expected {PLAN_SCHEMA_VERSION}")
        return cls(
            d["model"], d["model_hash"], d["objective"], d["algorithm"],
            Placement.of(d["device_ops"]), tuple(CutTensor.from_json(c) for c in d["cut"]),
            Breakdown.from_json(d["breakdown"]), Link.from_json(d["link"]),
            d["device_profile"], d["server_profile"], tuple(d.get("tied_weights", ())),
            d.get("tied_policy", "sync"), d.get("pins", {}), tuple(d.get("notes", ())),
            d.get("solve_seconds", 0.0),
        )
