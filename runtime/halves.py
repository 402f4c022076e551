"""What the runtime needs from a compiled half: the contract between compiler and agents.

``runtime/tvm_halves.py`` implements these over the TVM runtime (the functions in split.tar);
tests implement them in numpy. The agents (``device_agent.py``, ``server_agent.py``) only see
these protocols, so transport and fault handling are tested without compiling anything.

Transport order: ``cut`` lists the tensors that cross, in the order of ``plan.json["cut"]``;
gradients come back only for the entries with ``grad=True``, in the same relative order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["CutSpec", "DeviceHalf", "ServerHalf"]


@dataclass(frozen=True)
class CutSpec:
    """One tensor of the transport spec."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    grad: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @classmethod
    def from_json(cls, d: dict) -> CutSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"], bool(d["grad"]))


@runtime_checkable
class DeviceHalf(Protocol):
    plan_id: str
    cut: tuple[CutSpec, ...]

    def forward(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the device forward on one batch; keep residuals; return the cut tensors."""

    def backward(self, grads: list[np.ndarray]) -> None:
        """Given the gradients of the grad=True cut tensors, compute the device parameter
        gradients from the kept residuals and apply the optimizer update."""

    def infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Forward for inference (no residuals kept)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters, optimizer state and step counter, as plain arrays (for checkpoints)."""

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


@runtime_checkable
class ServerHalf(Protocol):
    plan_id: str
    cut: tuple[CutSpec, ...]

    def step(self, cut: list[np.ndarray], labels: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Forward + loss + backward + update on the server; return the loss and the
        gradients of the grad=True cut tensors."""

    def infer(self, cut: list[np.ndarray]) -> list[np.ndarray]: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...
