"""Analytic roofline cost model: the prior every plan starts from.

Per op on one target (``DeviceProfile``: peak FLOP/s per dtype P, bandwidth B, overhead o):

- forward  = max(flops / P, bytes / B) + o, with bytes = bytes_read + bytes_written.
- backward = k x (forward - o) + k x o, where k counts the gradients the op must produce:
  +1 if an activation input needs a gradient (``input_grad``), +1 if it has trainable
  weights (``has_params``). So conv / matmul in the middle of a net cost 2x forward
  (grad-input and grad-weight are each one product of the forward's size), the first conv
  1x (grad-weight only), elementwise ops and norms without weights 1x (one pass over the
  same bytes), mask arithmetic on inputs 0 (no gradient at all).
- update   = optimizer traffic on the trainable weights it owns (``param_bytes``):
  SGD reads param + grad and writes param (3 x param_bytes, 2 FLOPs per weight);
  momentum reads param, grad, velocity and writes param, velocity (5x, 4 FLOPs);
  Adam reads param, grad, m, v and writes param, m, v (7x, ~12 FLOPs). Plus one overhead
  (a fused update kernel per op); 0 when the op owns no weights.

Known approximation: ``input_grad`` is one flag, so an op with two activation inputs that
both need gradients (attention's Q.K^T and P.V) is charged 1x, not 2x, for them; those
matmuls are 4% of ViT-B/16's and 0.7% of BERT-base's (32 tokens) forward FLOPs.

Roofline assumes perfect overlap of compute and memory within a kernel and none across
kernels; the learned model (issue 5) corrects both. ``RooflineModel`` implements the
``CostModel`` protocol (``name`` + ``op_cost(features)``), so the learned model slots in
behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitc import InputError
from splitc.cost_models.base import OpCost, OpFeatures
from splitc.cost_models.profiles import DeviceProfile

__all__ = ["OPTIMIZERS", "RooflineModel"]

# optimizer -> (bytes moved per weight byte, FLOPs per weight element)
OPTIMIZERS = {"sgd": (3, 2), "momentum": (5, 4), "adam": (7, 12)}


@dataclass(frozen=True)
class RooflineModel:
    profile: DeviceProfile
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"RooflineModel: unknown optimizer {self.optimizer!r}; use one of "
                             f"{', '.join(OPTIMIZERS)}")

    @property
    def name(self) -> str:
        status = self.profile.provenance.get("status", "?")
        return f"roofline:{self.profile.name}({status})"

    def compute_time(self, flops: int, nbytes: int, dtype: str = "float32") -> float:
        """Roofline time without overhead: max(flops / peak, bytes / bandwidth)."""
        return max(flops / self.profile.peak(dtype), nbytes / self.profile.mem_bandwidth)

    def op_cost(self, f: OpFeatures) -> OpCost:
        o = self.profile.kernel_overhead
        core = self.compute_time(f.flops, f.bytes_read + f.bytes_written, f.dtype)
        k = int(f.input_grad) + int(f.has_params)
        update = 0.0
        if f.param_bytes:
            byte_mult, flop_per = OPTIMIZERS[self.optimizer]
            elems = f.param_bytes // 4 if f.dtype == "float32" else f.param_bytes // 2
            update = self.compute_time(flop_per * elems, byte_mult * f.param_bytes, f.dtype) + o
        return OpCost(forward=core + o, backward=k * (core + o), update=update)
