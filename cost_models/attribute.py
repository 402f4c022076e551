"""Measured kernel time attributed back to the planner's ops: per-op "measured" costs.

``attribute(ops, kernels, step_seconds, prof) -> {op name: OpCost}``. The kernels TVM runs
are fused (``fused_conv2d_add_relu``) and the gradient pass adds its own (transposes,
reductions), so a kernel does not belong to one op. Each kernel's measured time (``calls x
seconds`` of calibration rows) goes to the bucket of its role and family (``forward/conv``,
``backward/ewise``, ...) and each bucket is spread over the ops' own kernels of that bucket
(``features.op_kernels``) in proportion to their roofline time; a bucket no op kernel falls in
(the loss's ``forward/loss`` when the loss is not among ``ops``) is spread over the role, else
over every op kernel. What the whole step measured beyond its kernels (VM calls and
allocations, ``step_seconds - sum(kernels)``) is spread evenly over the op kernels.

Exact in sum, by construction: the costs add up to ``max(step_seconds, sum of kernels)``
(a test checks it). Not exact per op: attribution goes by (role, family), not by which Relax
bindings each fused kernel came from; TVM's fusion passes do not carry that provenance (on
tiny_cnn, 26 of 43 fused calls keep a Var object of the legalized module, the others are new).

Used by ``tools/bench_cost_model.py`` for decision quality: the plan chosen with predicted
costs against the plan chosen with these measured ones.
"""

from __future__ import annotations

from collections import defaultdict

from splitc.cost_models.base import OpCost, OpFeatures
from splitc.cost_models.features import op_kernels
from splitc.cost_models.profiles import DeviceProfile
from splitc.cost_models.roofline import RooflineModel

__all__ = ["attribute"]

_ROLE = {"forward": 0, "backward": 1, "update": 2}


def attribute(ops: list[tuple[str, OpFeatures]], kernels: list[dict],
              step_seconds: float | None, prof: DeviceProfile) -> dict[str, OpCost]:
    """Per-op measured cost (forward, backward, update) from calibration kernel rows
    (``role``, ``features.family``, ``calls``, ``seconds``) of one workload."""
    roof = RooflineModel(prof)
    virt = []  # (op name, role, family, roofline weight) per op kernel
    for name, f in ops:
        for role, ks in op_kernels(f).items():
            for k in ks:
                w = roof.compute_time(int(k.flops), k.bytes_read + k.bytes_written) + \
                    prof.kernel_overhead
                virt.append((name, role, k.family, w))
    out = {name: [0.0, 0.0, 0.0] for name, _ in ops}
    if not virt:
        return {name: OpCost(*c) for name, c in out.items()}
    total: dict = defaultdict(float)
    for r in kernels:
        total[(r["role"], r["features"]["family"])] += r["calls"] * r["seconds"]
    for (role, fam), t in total.items():
        group = [v for v in virt if v[1] == role and v[2] == fam] or \
            [v for v in virt if v[1] == role] or virt
        s = sum(v[3] for v in group)
        for v in group:
            out[v[0]][_ROLE[v[1]]] += t * v[3] / s
    rest = max((step_seconds or 0.0) - sum(total.values()), 0.0) / len(virt)
    for v in virt:
        out[v[0]][_ROLE[v[1]]] += rest
    return {name: OpCost(*c) for name, c in out.items()}
