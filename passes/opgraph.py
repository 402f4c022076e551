"""OpGraph: the IR-free operator DAG that the partition solver sees.

Built by ``passes/annotate_costs.py`` from the dataflow block of a Relax ``main`` function;
read by ``passes/partition.py`` (which never imports TVM) and mapped back to the IR by
``passes/split_module.py`` through the names below.

Naming contract (shared by AnnotateCosts and SplitModule, see ``passes/naming.py``):
- an op is named after the Relax var its binding defines (``lv3``); an op producing a tuple
  (``batch_norm``) owns the tensors its ``TupleGetItem`` bindings define;
- a tensor is named after the var that holds it; model inputs keep their parameter names;
- weight-only bindings (every input a parameter or constant, e.g. ``permute_dims(fc_weight)``)
  are not ops: they are listed in ``OpNode.weight_prep`` of each op that reads them, and the
  parameters they reach are in ``OpNode.params``.

Shape-only and constant bindings cost nothing and never become tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from splitc.cost_models.base import OpCost, OpFeatures

__all__ = [
    "GRAPH_SCHEMA_VERSION",
    "OpGraph",
    "OpNode",
    "Param",
    "Tensor",
    "dtype_bytes",
    "needs_grad",
]

GRAPH_SCHEMA_VERSION = 1

_DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


def dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"OpGraph: unknown dtype {dtype!r}") from None


@dataclass(frozen=True)
class Tensor:
    """An activation that flows between ops (the only thing that can cross the cut)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    producer: str | None  # op name; None for a model input
    consumers: tuple[str, ...] = ()
    is_output: bool = False  # a model output (feeds the loss in training)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_bytes(self.dtype)

    def to_json(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype,
            "bytes": self.nbytes, "producer": self.producer,
            "consumers": list(self.consumers), "is_output": self.is_output,
        }

    @classmethod
    def from_json(cls, d: dict) -> Tensor:
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d["producer"],
                   tuple(d["consumers"]), d.get("is_output", False))


@dataclass(frozen=True)
class Param:
    """A trainable weight (a function parameter of ``main`` after the ONNX import)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    readers: tuple[str, ...] = ()  # ops that read it (directly or through weight prep)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_bytes(self.dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.nbytes, "readers": list(self.readers)}

    @classmethod
    def from_json(cls, d: dict) -> Param:
        return cls(d["name"], tuple(d["shape"]), d["dtype"], tuple(d["readers"]))


@dataclass(frozen=True)
class OpNode:
    """One operator with its per-side costs (seconds per step, split by phase)."""

    name: str
    op: str
    inputs: tuple[str, ...]  # activation tensors read (names in OpGraph.tensors)
    outputs: tuple[str, ...]  # activation tensors written
    params: tuple[str, ...] = ()
    weight_prep: tuple[str, ...] = ()  # weight-only bindings folded into this op
    features: OpFeatures | None = None
    device: OpCost = field(default_factory=OpCost)
    server: OpCost = field(default_factory=OpCost)

    def to_json(self) -> dict:
        return {
            "name": self.name, "op": self.op, "inputs": list(self.inputs),
            "outputs": list(self.outputs), "params": list(self.params),
            "weight_prep": list(self.weight_prep),
            "features": self.features.to_json() if self.features else None,
            "device": self.device.to_json(), "server": self.server.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict) -> OpNode:
        return cls(
            d["name"], d["op"], tuple(d["inputs"]), tuple(d["outputs"]), tuple(d["params"]),
            tuple(d.get("weight_prep", ())),
            OpFeatures.from_json(d["features"]) if d.get("features") else None,
            OpCost.from_json(d["device"]), OpCost.from_json(d["server"]),
        )


@dataclass(frozen=True)
class OpGraph:
    """The annotated operator DAG. ``ops`` is in topological (program) order.

    ``loss_server`` is the server-side cost of the loss in training (always on the server);
    ``labels`` are the label tensors sent up each training step.
    """

    name: str
    ops: tuple[OpNode, ...]
    tensors: dict[str, Tensor]
    params: dict[str, Param]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    labels: tuple[Tensor, ...] = ()
    loss_server: OpCost = field(default_factory=OpCost)
    model_hash: str = ""
    cost_model: str = ""  # provenance: which cost models produced the costs
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- queries ---------------------------------------------------------------------------
    @property
    def op_index(self) -> dict[str, int]:
        return {op.name: i for i, op in enumerate(self.ops)}

    def op(self, name: str) -> OpNode:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def edges(self) -> Iterable[tuple[str, str, str]]:
        """Data edges ``(producer op, consumer op, tensor)`` between ops."""
        for t in self.tensors.values():
            if t.producer is None:
                continue
            for c in t.consumers:
                yield t.producer, c, t.name

    def validate(self) -> None:
        """Check the DAG is well formed: names unique, references resolve, order topological."""
        seen: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            if op.name in seen:
                raise ValueError(f"OpGraph: duplicate op name {op.name!r}")
            seen[op.name] = i
        produced_at: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for t in op.inputs:
                if t not in self.tensors:
                    raise ValueError(f"OpGraph: op {op.name!r} reads unknown tensor {t!r}")
                p = self.tensors[t].producer
                if p is not None and (p not in seen or seen[p] >= i):
                    raise ValueError(f"OpGraph: ops not in topological order at {op.name!r}")
            for t in op.outputs:
                if t not in self.tensors or self.tensors[t].producer != op.name:
                    raise ValueError(f"OpGraph: op {op.name!r} output {t!r} not attributed")
                produced_at[t] = i
            for p in op.params:
                if p not in self.params:
                    raise ValueError(f"OpGraph: op {op.name!r} reads unknown param {p!r}")
        for t in self.tensors.values():
            if t.producer is None and t.name not in self.inputs:
                raise ValueError(f"OpGraph: tensor {t.name!r} has no producer and is no input")
            for c in t.consumers:
                if c not in seen:
                    raise ValueError(f"OpGraph: tensor {t.name!r} consumer {c!r} unknown")

    # -- serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": GRAPH_SCHEMA_VERSION,
            "name": self.name, "model_hash": self.model_hash, "cost_model": self.cost_model,
            "inputs": list(self.inputs), "outputs": list(self.outputs),
            "labels": [t.to_json() for t in self.labels],
            "loss_server": self.loss_server.to_json(),
            "ops": [o.to_json() for o in self.ops],
            "tensors": [t.to_json() for t in self.tensors.values()],
            "params": [p.to_json() for p in self.params.values()],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> OpGraph:
        if d.get("schema") != GRAPH_SCHEMA_VERSION:
            raise ValueError(f"OpGraph: schema {d.get('schema')!r}, expected {GRAPH_SCHEMA_VERSION}")
        return cls(
            name=d["name"],
            ops=tuple(OpNode.from_json(o) for o in d["ops"]),
            tensors={t["name"]: Tensor.from_json(t) for t in d["tensors"]},
            params={p["name"]: Param.from_json(p) for p in d["params"]},
            inputs=tuple(d["inputs"]), outputs=tuple(d["outputs"]),
            labels=tuple(Tensor.from_json(t) for t in d.get("labels", [])),
            loss_server=OpCost.from_json(d.get("loss_server", {})),
            model_hash=d.get("model_hash", ""), cost_model=d.get("cost_model", ""),
            meta=d.get("meta", {}),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def needs_grad(graph: OpGraph) -> frozenset[str]:
    """Tensors whose gradient must flow back in training.

    A tensor needs a gradient iff it is floating point and depends on a trainable parameter;
    its gradient then crosses the cut downwards when the tensor does. Model inputs, integer
    tensors and masks computed from inputs alone never carry gradients (no bytes down).
    """
    tainted: set[str] = set()
    out: set[str] = set()
    for op in graph.ops:
        if op.params or any(t in tainted for t in op.inputs):
            tainted.update(op.outputs)
    for name in tainted:
        if graph.tensors[name].dtype.startswith(("float", "bfloat")):
            out.add(name)
    return frozenset(out)
