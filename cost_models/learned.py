"""Learned cost model: a regressor fitted on measured kernel times, with the roofline as prior.

What is learned: ``log10(seconds)`` of one kernel launch from its :class:`KernelFeatures`
(``cost_models/features.py: vector``), and, for kernels that exist (calibrated or compiled),
from its schedule too (``tir_features.py``: loop structure and MetaSchedule's per-store
features of the scheduled TIR). Linear and tree regressors on both feature sets are compared
on held-out models (``fit.py``; the comparison is stored in the profile); the profile keeps
the best plain one (``regressor``: op costs for the planner, which prices ops before anything
is scheduled) and the best overall (``kernel_regressor``: kernels with schedule features):

- ``linear``, ``trees`` and ``family_trees`` (the default candidate): ``regressors.py``
  (fitting, JSON form, prediction in numpy; the offset to the roofline prior).

Op costs: ``op_kernels`` turns an op into idealised kernels; ``op_scale`` (per role) and
``op_overhead`` (per op kernel), fitted by ``step_fit.py: _op_fit`` against measured whole steps,
correct their sum towards the step TVM really runs.

Kernels are timed alone (hot caches, no VM around them); inside the compiled step they run
slower. So a kernel's time in a step is ``step_scale x predicted + call_overhead``, both fitted
on whole training steps measured through the Relax VM, with ``step_scale_large`` for kernels
that move ``large_bytes`` or more (``step_fit.py: step_model``).

Look-up: a kernel measured in calibration (same fused ops, shapes, dtype and FLOPs,
``lookup.kernel_key``; the same loop nest, ``structure_key``, first) is priced at the median
of its measured times (``lookup.py: twins``), not predicted.

Fallback: a kernel whose family was never measured (e.g. ``conv_t`` on a profile calibrated
on MLPs only) is priced by the roofline prior (``RooflineModel`` of the same profile) and
counted; ``LearnedModel.name`` says how many fell back, so the plan's ``cost_model``
provenance shows it (``learned:NAME(trees; roofline fallback 3/120 kernels)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from splitc import InputError
from splitc.cost_models.base import OpCost, OpFeatures
from splitc.cost_models.features import (
    FEATURE_NAMES,
    KernelFeatures,
    op_kernels,
    sched_vector,
    vector,
)
from splitc.cost_models.lookup import measured_time, scaled_time
from splitc.cost_models.profiles import DeviceProfile
from splitc.cost_models.regressors import (
    Regressor,
    fit_regressor,
    mape,
    within,
)
from splitc.cost_models.roofline import OPTIMIZERS, RooflineModel
from splitc.cost_models.tir_features import SCHED_FEATURE_NAMES

__all__ = [
    "LEARNED_VERSION",
    "LearnedModel",
    "Regressor",
    "cost_model_for",
    "fit_regressor",
    "mape",
    "within",
]

# 2: schedule-aware ``kernel_regressor`` beside the plain ``regressor``; 3: trees stored in
# preorder (``regressors._fit_trees``), measured kernels' times (``twins``)
LEARNED_VERSION = 3


@dataclass
class LearnedModel:
    """``CostModel`` backed by a calibrated profile's ``learned`` section."""

    profile: DeviceProfile
    optimizer: str = "sgd"
    fallbacks: int = field(default=0, init=False)
    kernels: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        data = self.profile.learned
        if not data:
            raise InputError(f"LearnedModel: profile {self.profile.name!r} has no 'learned' "
                             "section; run splitc calibrate or use the roofline model")
        if data.get("version") != LEARNED_VERSION:
            raise InputError(f"LearnedModel: profile {self.profile.name!r} has learned version "
                             f"{data.get('version')!r}, expected {LEARNED_VERSION}; recalibrate")
        if list(data.get("features", [])) != list(FEATURE_NAMES):
            raise InputError(f"LearnedModel: profile {self.profile.name!r} was fitted on other "
                             "features; recalibrate with this splitc version")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"LearnedModel: unknown optimizer {self.optimizer!r}; use one of "
                             f"{', '.join(OPTIMIZERS)}")
        sched = list(data.get("sched_features", []))
        if sched and sched != list(SCHED_FEATURE_NAMES):
            raise InputError(f"LearnedModel: profile {self.profile.name!r} was fitted on other "
                             "schedule features; recalibrate with this splitc version")
        self.regressor = Regressor.from_json(data["regressor"])
        # schedule-aware: for kernels that carry schedule features (None: plain features only)
        self.kernel_regressor = Regressor.from_json(data["kernel_regressor"]) if sched else None
        self.families = frozenset(data["families"])
        self.call_overhead = float(data.get("call_overhead", 0.0))
        self.step_scale = float(data.get("step_scale", 1.0))
        # kernels moving large_bytes or more: step_scale_large (step_fit.py: step_model; absent
        # from older profiles: one scale)
        self.large_bytes = data.get("large_bytes")
        self.step_scale_large = float(data.get("step_scale_large", self.step_scale))
        # op kernels -> the measured step, per "role/*" (step_fit.py: _op_fit)
        self.op_scale = {k: float(v) for k, v in data.get("op_scale", {}).items()}
        self.op_overhead = float(data.get("op_overhead", 0.0))
        # kernels measured in calibration: their median time, by lookup.structure_key,
        # kernel_key and (elementwise ones) loose_key
        self.twins = {k: float(v) for k, v in data.get("twins", {}).items()}
        # kernels measured at another batch size (lookup.py; absent from older profiles)
        self.scaled_twins = data.get("scaled_twins", {})
        self.prior = RooflineModel(self.profile, self.optimizer)

    @property
    def name(self) -> str:
        s = f"learned:{self.profile.name}({self.regressor.kind}"
        sched = (self.profile.provenance or {}).get("schedules")
        if sched:
            s += f"; {sched} schedules"
        if self.fallbacks:
            s += f"; roofline fallback {self.fallbacks}/{self.kernels} kernels"
        return s + ")"

    def kernel_time(self, k: KernelFeatures) -> float:
        """Seconds for one kernel call, VM call overhead included."""
        return float(self.kernel_times([k])[0])

    def kernel_times(self, ks: list[KernelFeatures], op_level: bool = False,
                     alone: bool = False) -> np.ndarray:
        """Seconds per call of each kernel inside the step. ``op_level``: ``ks`` are op kernels
        (``op_kernels``), corrected by the profile's ``op_scale`` and ``op_overhead`` towards
        the step TVM really runs; never looked up (``twins`` are fused kernels). ``alone``:
        each kernel as timed alone (no step scale, no call overhead)."""
        if not ks:
            return np.zeros(0)
        self.kernels += len(ks)
        p = self.profile
        X = np.array([vector(k, p.peak("float32"), p.mem_bandwidth) for k in ks])
        t = 10.0 ** self.regressor.predict(X)
        has = [i for i, k in enumerate(ks) if k.sched is not None]
        if self.kernel_regressor is not None and has:
            Xs = np.array([sched_vector(ks[i], p.peak("float32"), p.mem_bandwidth) for i in has])
            t[has] = 10.0 ** self.kernel_regressor.predict(Xs)
        for i, k in enumerate(ks):
            if not op_level and (meas := measured_time(self.twins, k)) is not None:
                t[i] = meas  # measured: fit.py's twins says why
            elif not op_level and (meas := scaled_time(self.scaled_twins, k)) is not None:
                t[i] = meas  # measured at another batch, scaled (lookup.py)
            elif k.family not in self.families:
                self.fallbacks += 1
                t[i] = self.prior.compute_time(int(k.flops), k.bytes_read + k.bytes_written,
                                               k.dtype) + p.kernel_overhead
            elif op_level:
                t[i] *= self.op_scale.get(f"{k.role}/*", 1.0)
        if op_level:  # op_scale and op_overhead were fitted against whole steps
            return t + self.op_overhead
        return t if alone else self.in_step(ks, t)

    def in_step(self, ks: list[KernelFeatures], alone: np.ndarray) -> np.ndarray:
        """Seconds per call inside the step of kernels ``ks`` that take ``alone`` timed
        alone: the step scale of each (``step_scales``) plus the VM's call overhead."""
        return (step_scales(ks, self.step_scale, self.step_scale_large, self.large_bytes)
                * alone + self.call_overhead)

    def op_cost(self, f: OpFeatures) -> OpCost:
        byte_mult, flop_per = OPTIMIZERS[self.optimizer]
        ks = op_kernels(f, byte_mult, flop_per)
        cost = {role: float(self.kernel_times(ks[role], op_level=True).sum()) for role in ks}
        return OpCost(cost["forward"], cost["backward"], cost["update"])


def step_scales(ks: list[KernelFeatures], scale: float, scale_large: float,
                large_bytes: int | None) -> np.ndarray:
    """Per kernel, its factor from alone to inside the step (``step_fit.py: step_model``):
    ``scale_large`` for kernels moving ``large_bytes`` or more (read + written), else
    ``scale``."""
    if large_bytes is None:
        return np.full(len(ks), float(scale))
    nbytes = np.array([k.bytes_read + k.bytes_written for k in ks])
    return np.where(nbytes >= large_bytes, scale_large, scale)


def cost_model_for(profile: DeviceProfile, optimizer: str = "sgd"):
    """The learned model when ``profile`` carries one (a calibrated profile), else the
    roofline prior. Both implement ``CostModel``."""
    if getattr(profile, "learned", None):
        return LearnedModel(profile, optimizer)
    return RooflineModel(profile, optimizer)
