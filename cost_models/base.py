"""Cost-model interface: what an operator looks like to a cost model, and what it costs.

Plain data only (no TVM): ``passes/annotate_costs.py`` builds :class:`OpFeatures` from Relax
bindings, a :class:`CostModel` turns them into :class:`OpCost` per side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["ZERO_COST", "CostModel", "OpCost", "OpFeatures"]


@dataclass(frozen=True)
class OpFeatures:
    """Hardware-independent facts about one operator (one Relax op binding).

    ``flops`` counts multiply and add separately (a multiply-accumulate is 2 FLOPs).
    Byte counts are for the forward pass; ``param_bytes`` are the trainable weights the op
    owns (reads, directly or through weight-only preprocessing such as a transpose, and whose
    optimizer update it is charged). A weight read by several ops (GPT-2's tied embedding) is
    owned by its first reader, so each weight's update is counted once per step.
    """

    op: str  # Relax op name, e.g. "relax.nn.conv2d"
    flops: int
    bytes_read: int
    bytes_written: int
    param_bytes: int
    in_shapes: tuple[tuple[int, ...], ...] = ()
    out_shapes: tuple[tuple[int, ...], ...] = ()
    dtype: str = "float32"
    # Whether the backward pass of this op needs a gradient w.r.t. its inputs: ops that read
    # only model inputs (no trainable ancestor and no parameters) still need weight grads.
    has_params: bool = False
    # Whether some activation input of this op needs a gradient (it depends on a trainable
    # parameter): False for the first layer (reads only model inputs) and for mask arithmetic
    # on inputs, whose backward then computes weight gradients only, or nothing at all.
    input_grad: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> OpFeatures:
        d = dict(d)
        d["in_shapes"] = tuple(tuple(s) for s in d.get("in_shapes", ()))
        d["out_shapes"] = tuple(tuple(s) for s in d.get("out_shapes", ()))
        return cls(**d)


@dataclass(frozen=True)
class OpCost:
    """Seconds one op takes on one side per training step, split by phase. Costs add up."""

    forward: float = 0.0
    backward: float = 0.0
    update: float = 0.0

    def __post_init__(self) -> None:
        for f in ("forward", "backward", "update"):
            v = getattr(self, f)
            if not (v >= 0.0) or v == float("inf"):
                raise ValueError(f"OpCost.{f} must be finite and >= 0, got {v!r}")

    def __add__(self, other: OpCost) -> OpCost:
        return OpCost(
            self.forward + other.forward,
            self.backward + other.backward,
            self.update + other.update,
        )

    @property
    def training(self) -> float:
        """Forward + backward + optimizer update: the per-step training time of the op."""
        return self.forward + self.backward + self.update

    @property
    def inference(self) -> float:
        return self.forward

    def for_objective(self, objective: str) -> float:
        if objective == "training":
            return self.training
        if objective == "inference":
            return self.forward
        raise ValueError(f"unknown objective {objective!r} (training|inference)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> OpCost:
        return cls(**d)


ZERO_COST = OpCost()


@runtime_checkable
class CostModel(Protocol):
    """Maps an operator to its per-step cost on one target.

    Implementations: ``cost_models.roofline.RooflineModel`` (analytic prior) and the learned
    model. ``name`` goes into the plan so a reader knows where the numbers came from.
    A model that has no rule for an op must raise ``UnsupportedError`` naming the op,
    never return a silent zero.
    """

    name: str

    def op_cost(self, features: OpFeatures) -> OpCost: ...
