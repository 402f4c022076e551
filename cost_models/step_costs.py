"""Op costs priced from the compiled training step (``splitc plan --op-costs step``).

``LearnedModel.op_cost`` prices each op alone: ``features.op_kernels`` guesses the kernels an
op becomes, and two factors fitted on whole steps (``step_fit.py: _op_fit``) correct their
sum. But TVM fuses an op's epilogue into the kernel before it, the gradient pass adds
transposes and reductions, and the VM's calls cost more than the small kernels themselves;
the guesses miss that per op, even where the sum is fitted right.

``step_op_costs`` prices what TVM runs instead: it schedules the model's whole training step
as calibration does (``workloads.py: model_module``, ``kernels.py: kernel_groups``; nothing
is built or run), prices every kernel with the learned model (a measured twin, a
batch-scaled twin or the schedule-aware regressor: ``LearnedModel.kernel_times``), and gives
each op its share by the rule that gives the bench its "measured" op costs
(``attribute.py``, per binding: each call's time over the bindings it fused, by their
roofline time; the step beyond its kernels evenly over the calls). The op costs add up to the
predicted step (``op_costs_from_kernels``); the loss's share is ``LOSS``.

Why (session 18, offline on session 17's bench rows, ``/tmp/s18/dec.py``; each test model
held out of the fit): the plan chosen with op-level costs missed the plan chosen with the
measured ones by 2.65 % for tiny_transformer at 1000 Mbps (19 device ops of 32; its op
costs summed to +27 % of the step), within 2 % elsewhere (26 of 27); with the held-out
kernel predictions attributed this way, all 27 plans were the measured plans (0.00 %). The
bench confirmed it (``tools/BENCHMARK_LOG.md``, session 18: 27/27 at 0.00 %), and put 130 of
224 ops within +-10 % of their measured cost (op-level: 26).

Limits: only for a profile calibrated on a CPU (llvm) target, the kernels the profile was
fitted on (``passes/build.py`` schedules others for GPUs); a profile calibrated with
``--target host`` is scheduled for the planning machine's CPU, which is the calibrated one
unless the profile was copied elsewhere. The step is scheduled with the default schedules,
also for a profile calibrated with ``--tuning-records``. It takes the time of scheduling the
step (0.5-1.4 s more per plan for the bench's test models; the op-level costs take
milliseconds). Like calibration, it needs the compiler: ``passes`` is imported inside the
functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from splitc import InputError
from splitc.cost_models.attribute import LOSS, attribute, row_sites
from splitc.cost_models.base import OpCost, OpFeatures
from splitc.cost_models.features import KernelFeatures

if TYPE_CHECKING:
    from splitc.cost_models.learned import LearnedModel

__all__ = ["LOSS", "kernel_id", "kernel_rows", "op_costs_from_kernels", "step_op_costs",
           "step_target"]


def kernel_id(row: dict) -> str:
    """A kernel row's name within its workload: ``function|role|symbol``."""
    return f"{row['function']}|{row['role']}|{row['symbol']}"


def kernel_rows(w, target, tuning_records=None, say=lambda m: None) -> list[dict]:
    """The kernel rows calibration would time for workload ``w``, untimed: ``function``,
    ``role``, ``symbol``, ``calls``, ``features`` and ``sites`` (``kernels.py: describe``)."""
    from splitc.cost_models.kernels import describe, kernel_groups

    _, _, prims, groups, sites = kernel_groups(w, target, tuning_records, say)
    return [describe(key, cs, prims, target, sites) for key, cs in groups.items()]


def op_costs_from_kernels(ops: list[tuple[str, OpFeatures]], rows: list[dict],
                          alone: list[float], step_seconds: float, prof
                          ) -> dict[str, OpCost]:
    """Per op (and ``LOSS``), its share of a step of ``step_seconds`` whose kernel ``rows``
    (with ``sites``) take ``alone`` seconds per call each, timed alone: ``attribute`` per
    binding, so the costs add up to ``max(step_seconds, sum of calls x alone)``."""
    if len(rows) != len(alone):
        raise ValueError(f"op_costs_from_kernels: {len(rows)} kernel rows, {len(alone)} times")
    timed = [dict(r, seconds=float(t)) for r, t in zip(rows, alone)]
    return attribute(ops, timed, step_seconds, prof, sites=row_sites(rows) or None)


def step_target(model: LearnedModel) -> str | None:
    """The target the profile's kernels were timed on (``learned.dataset.target``), when it
    is a CPU (llvm) target with schedule features (``kernel_regressor``); else None."""
    from splitc.cost_models.kernels import resolve

    text = (model.profile.learned.get("dataset") or {}).get("target")
    if not text or model.kernel_regressor is None:
        return None
    try:
        target = resolve(str(text))
    except Exception:  # noqa: BLE001 - a target this TVM does not know: op-level costs
        return None
    return str(text) if target.kind.name == "llvm" else None


def step_op_costs(path: Path, model: LearnedModel, ops: list[tuple[str, OpFeatures]],
                  batch: int | None = None, input_shapes: dict | None = None,
                  loss: str = "cross-entropy", optimizer: str = "sgd",
                  say: Callable[[str], None] = lambda m: None) -> dict[str, OpCost]:
    """Per op of ``ops`` (the planner's, by name) and ``LOSS``: its cost in the compiled
    training step of the ONNX model at ``path``, priced by ``model`` (see the module
    docstring). Raises ``InputError`` when the profile was not calibrated on a CPU target."""
    from splitc.cost_models.kernels import resolve
    from splitc.cost_models.workloads import model_module

    text = step_target(model)
    if text is None:
        raise InputError(f"op costs from the compiled step: profile {model.profile.name!r} "
                         "was not calibrated on a CPU (llvm) target with schedule features; "
                         "use --op-costs ops")
    w = model_module(Path(path), batch, step=False, input_shapes=input_shapes, loss=loss,
                     optimizer=optimizer)
    rows = kernel_rows(w, resolve(text), say=say)
    ks = [KernelFeatures.from_json(r["features"]) for r in rows]
    calls = [r["calls"] for r in rows]
    alone = model.kernel_times(ks, alone=True)
    step = float(sum(c * t for c, t in zip(calls, model.in_step(ks, alone))))
    say(f"priced {len(rows)} kernels ({sum(calls)} calls) of the compiled step: "
        f"{step * 1e3:.3f} ms")
    return op_costs_from_kernels(ops, rows, list(alone), step, model.profile)
