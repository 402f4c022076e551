"""Tune: tuning the kernels of each half, and applying the records at build.

``tune(TuneConfig) -> TuneResult`` is what ``splitc tune`` calls; ``apply_records`` (MetaSchedule
records) and ``tune_knobs.knob_lookup`` (knob records) are what
``passes/build.py: build_side(..., tuning_records=DB)`` uses. Two strategies:

- ``knobs`` (default for llvm targets): ``passes/tune_knobs.py`` times the alternatives of the
  default schedules' tile choices on the heaviest kernels and keeps a faster one only when an
  interleaved re-timing confirms it, so a tuned build is never slower than the default one
  beyond noise. Cheap: one in-process kernel build per trial.
- ``metaschedule``: TVM's MetaSchedule search (below), for GPU targets and for kernels the
  default rules do not tile. Its records replace the default schedule of every kernel they
  hold, measured better or not.

Where the kernels come from (decided here, so tuned records always match the build):

- ``split.tar``: ``compile_split`` stores the split IRModule (``device_*`` and ``server_*``
  Relax functions, no weights) as TVMScript in ``ir/split.py``; each side's
  kernels are ``build.lower_side(side_module(ir, side), target)``, the very module that
  ``build_side`` schedules. The target per side is plan.json's ``targets`` unless
  ``TuneConfig.target`` overrides it.
- ``MODEL.onnx``: planned with ``TuneConfig.plan`` (default profiles, ``batch_size``,
  ``input_shapes``), split with the training options, then lowered the same way. A later
  ``splitc compile`` with a different cut shares most kernels (records are keyed by the
  kernel's structure, not its name); kernels next to a different cut get default schedules.

The MetaSchedule strategy and ``apply_records`` live in ``passes/tune_metaschedule.py``.

Runs after SplitModule; ``apply_records`` runs inside build_side before the default schedules,
which leave kernels marked ``tirx.is_scheduled`` alone.
"""

from __future__ import annotations

import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from splitc import InputError, PackageError
from splitc.passes.tune_metaschedule import (
    apply_records,
    has_metaschedule_records,
    run_metaschedule,
)

__all__ = [
    "SPLIT_IR",
    "STRATEGIES",
    "TaskResult",
    "TuneConfig",
    "TuneResult",
    "apply_records",
    "has_metaschedule_records",
    "tune",
]

SPLIT_IR = "ir/split.py"  # path of the split IRModule inside split.tar
_SIDES = ("device", "server")


@dataclass(frozen=True)
class TuneConfig:
    source: Path  # MODEL.onnx or split.tar
    output: Path = Path("tuning")  # database directory
    target: str | None = None  # None: plan.json's per-side targets (split.tar) or "llvm"
    trials: int = 1000  # MetaSchedule's global trial budget, per half
    trials_per_task: int | None = None  # None: MetaSchedule's default (= trials)
    rpc_tracker: str | None = None  # "HOST:PORT" of a TVM RPC tracker; None: local runner
    rpc_key: str | None = None
    batch_size: int | None = None
    input_shapes: dict = field(default_factory=dict)
    resume: bool = True  # False: refuse an output directory that already holds records
    progress: Callable[[str], None] | None = None
    sides: tuple[str, ...] = _SIDES
    ops: tuple[str, ...] = ()  # only tasks whose name contains one of these (e.g. "conv2d")
    plan: object = None  # PlanConfig for an ONNX source (default: default profiles)
    loss: str = "cross-entropy"  # ONNX source: the training step to split
    optimizer: str = "sgd"
    lr: float = 0.01
    seed: int = 0
    strategy: str = "knobs"  # "knobs" (llvm only) or "metaschedule"
    max_kernels: int = 12  # knobs: tune the heaviest N kernels of each half


STRATEGIES = ("knobs", "metaschedule")


@dataclass(frozen=True)
class TaskResult:
    side: str
    task: str
    weight: int  # how many calls of the kernel the half makes
    trials: int  # records in the database after this run
    skipped: bool  # already at its budget: not tuned in this run


@dataclass(frozen=True)
class TuneResult:
    database: Path
    tasks: tuple[TaskResult, ...]
    seconds: float
    trials_run: int  # trials measured in this run (both halves)


def _say(cfg: TuneConfig) -> Callable[[str], None]:
    return cfg.progress or (lambda msg: None)


def _load_split_ir(path: Path) -> tuple[tvm.IRModule, dict]:
    import json

    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            if SPLIT_IR not in names:
                raise PackageError(
                    f"Tune: {path} has no {SPLIT_IR} (built by an older splitc); "
                    "recompile it with splitc compile or tune the ONNX model"
                )
            ir = tar.extractfile(SPLIT_IR).read().decode()
            plan = json.loads(tar.extractfile("plan.json").read())
    except tarfile.TarError as e:
        raise PackageError(f"Tune: cannot read {path} ({e}); pass a split.tar or MODEL.onnx")
    return tvm.script.from_source(_parsable(ir)), plan


_NONFINITE = re.compile(r'R\.const\("(-?inf|nan)", ')


def _parsable(script: str) -> str:
    """TVM 0.27 prints non-finite constants as ``R.const("-inf", "float32")`` (a max-pool or
    masking ``where``) but its parser rejects a string value: write them as ``float("-inf")``."""
    return _NONFINITE.sub(r'R.const(float("\1"), ', script)


def _split_onnx(cfg: TuneConfig) -> tvm.IRModule:
    from splitc.passes.pipeline import PlanConfig, plan_model
    from splitc.passes.split_module import split_module

    pcfg = cfg.plan or PlanConfig(
        model=cfg.source,
        batch_size=cfg.batch_size,
        input_shapes=dict(cfg.input_shapes),
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        baselines=False,
    )
    res = plan_model(pcfg, progress=_say(cfg))
    smod, _ = split_module(res.module, res.plan, loss=cfg.loss, optimizer=cfg.optimizer, lr=cfg.lr)
    return smod


def _sides(cfg: TuneConfig) -> list[tuple[str, tvm.IRModule, tvm.target.Target]]:
    """(side, lowered kernels, target) for every side to tune."""
    from splitc.passes.build import lower_side, resolve_target, side_module

    src = Path(cfg.source)
    if not src.exists():
        raise InputError(f"Tune: {src} does not exist; pass MODEL.onnx or split.tar")
    bad = [s for s in cfg.sides if s not in _SIDES]
    if bad or not cfg.sides:
        raise InputError(f"Tune: unknown side(s) {bad}; use device and/or server")
    if cfg.trials <= 0:
        raise InputError(f"Tune: --trials must be positive, got {cfg.trials}")
    if tarfile.is_tarfile(src):
        smod, plan = _load_split_ir(src)
        targets = {s: cfg.target or plan["targets"][s] for s in _SIDES}
    else:
        smod = _split_onnx(cfg)
        targets = {s: cfg.target or "llvm" for s in _SIDES}
    out = []
    for side in cfg.sides:
        t = targets[side]
        tgt = (
            t
            if isinstance(t, tvm.target.Target)
            else (tvm.target.Target(t) if isinstance(t, dict) else resolve_target(t))
        )
        out.append((side, lower_side(side_module(smod, side), tgt), tgt))
    return out


def _check_rpc(cfg: TuneConfig) -> tuple[str, str] | None:
    if cfg.rpc_tracker is None:
        return None
    host, _, port = cfg.rpc_tracker.rpartition(":")
    if not host or not port.isdigit() or not cfg.rpc_key:
        raise InputError(
            f"Tune: --rpc-tracker {cfg.rpc_tracker!r} needs HOST:PORT and --rpc-key; "
            "e.g. --rpc-tracker 10.0.0.2:9190 --rpc-key orin"
        )
    return host, port


def _tune_knobs(cfg: TuneConfig, halves, out: Path, t0: float) -> TuneResult:
    from splitc.cost_models.rpc import Runner
    from splitc.passes.tune_knobs import load_knobs, tune_side_knobs

    say = _say(cfg)
    if not cfg.resume and load_knobs(out):
        raise InputError(f"Tune: {out} already holds knob records; pass another -o or resume")
    results: list[TaskResult] = []
    run_total = 0
    for side, low, tgt in halves:
        runner = Runner(tgt.kind.name, cfg.rpc_tracker, cfg.rpc_key)
        try:
            recs = tune_side_knobs(
                side, low, tgt, runner, out, max_kernels=cfg.max_kernels, trials=cfg.trials,
                say=say,
            )
        finally:
            runner.close()
        for r in recs:
            results.append(TaskResult(side, r.kernel, 1, r.candidates, False))
            run_total += r.candidates
    return TuneResult(out, tuple(results), time.perf_counter() - t0, run_total)


def tune(cfg: TuneConfig) -> TuneResult:
    """Tune the kernels of each half into ``cfg.output`` (module docstring)."""
    t0 = time.perf_counter()
    if cfg.strategy not in STRATEGIES:
        raise InputError(
            f"Tune: unknown strategy {cfg.strategy!r}; use one of {', '.join(STRATEGIES)}"
        )
    _check_rpc(cfg)
    halves = _sides(cfg)
    out = Path(cfg.output)
    if cfg.strategy == "knobs":
        return _tune_knobs(cfg, halves, out, t0)
    return run_metaschedule(cfg, halves, out, t0)
