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

The database is MetaSchedule's own JSON pair in ``output`` (``database_workload.json``,
``database_tuning_record.json``). Resume: each task's records already in the database count
towards its budget; a task at its per-task budget is skipped and a half whose tasks hold
``trials`` records in all is not tuned again, so re-running the same command does nothing
and a larger ``--trials`` continues where the last run stopped (the evolutionary search
seeds its population from the database's best records).

Cost, measured on the shared 2-core dev box (random search: xgboost is not installed; one
LocalBuilder worker), records in a fresh DB, ``ops=("conv2d", "matmul")``, 8 trials per kernel:
demo CNN (tools/models/demo_cnn.onnx, batch 32; the plan keeps every op on the device): 8
kernels, 56 trials in 301 s (~5.4 s a trial: design space + compile + run); training step
3.4 -> 3.3 ms (median of 6, 1.03x over passes/schedules.py's defaults). Tiny CNN
(tests/helpers/models.py, batch 2): 4 conv kernels, 32 trials in 242 s; step 0.3 ms either
way. Losses of tuned and default builds are bit-identical on both.

Runs after SplitModule; ``apply_records`` runs inside build_side before the default schedules,
which leave kernels marked ``tirx.is_scheduled`` alone.
"""

from __future__ import annotations

import os
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from splitc import InputError, PackageError

__all__ = [
    "SPLIT_IR",
    "STRATEGIES",
    "TaskResult",
    "TuneConfig",
    "TuneResult",
    "apply_records",
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


def _runner(cfg: TuneConfig):
    from tvm.s_tir import meta_schedule as ms

    if cfg.rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=120)
    host, port = _check_rpc(cfg)
    return ms.runner.RPCRunner(
        ms.runner.RPCConfig(
            tracker_host=host,
            tracker_port=int(port),
            tracker_key=cfg.rpc_key,
            session_timeout_sec=120,
        )
    )


def _with_cores(target: tvm.target.Target) -> tvm.target.Target:
    """MetaSchedule's rules need ``num-cores`` on CPU targets (the build does not; records are
    looked up by kernel structure, so the attribute does not affect ``apply_records``)."""
    d = dict(target.export())
    if d.get("kind") != "llvm" or "num-cores" in d:
        return target
    d["num-cores"] = os.cpu_count() or 1
    host = d.pop("host", None)
    return tvm.target.Target(d, host=host) if host else tvm.target.Target(d)


def _cost_model(trials: int) -> str:
    """MetaSchedule's XGBoost model when xgboost is installed and there are enough trials to
    fit it (64, one search round); random search otherwise."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb" if trials >= 64 else "random"


def _hash(mod) -> int:
    from splitc.passes.compat import structural_hash

    return structural_hash(mod)


def _records_by_workload(db) -> dict[int, int]:
    counts: dict[int, int] = {}
    for rec in db.get_all_tuning_records():
        h = _hash(rec.workload.mod)
        counts[h] = counts.get(h, 0) + 1
    return counts


def _progress_callback(say, side: str, names: list[str], budget: dict[int, int]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            budget[task_id] = budget.get(task_id, 0) + len(candidates)
            ok = [
                sum(float(s) for s in r.run_secs) / len(r.run_secs)
                for r in runner_results
                if r.run_secs and r.error_msg is None
            ]
            best = f", best of batch {min(ok) * 1e6:.0f} us" if ok else ""
            say(f"{side}: {names[task_id]}: {len(candidates)} trials{best}")

    return _Progress()


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
    from tvm.s_tir import meta_schedule as ms

    say = _say(cfg)
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
    out.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(out))
    if not cfg.resume and len(db) > 0:
        raise InputError(
            f"Tune: {out} already holds {len(db)} tuning records; pass another -o or resume"
        )
    runner = _runner(cfg)
    results: list[TaskResult] = []
    run_total = 0
    for side, low, build_tgt in halves:
        tgt = _with_cores(build_tgt)
        extracted = ms.relax_integration.extract_tasks(low, tgt)
        extracted = [t for t in extracted if not cfg.ops or any(o in t.task_name for o in cfg.ops)]
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted, str(out / "logs" / side), seed=cfg.seed, num_threads=os.cpu_count() or 1
        )
        counts = _records_by_workload(db)
        have = [counts.get(_hash(c.mod), 0) for c in ctxs]
        per_task = cfg.trials_per_task or cfg.trials
        todo = [i for i, h in enumerate(have) if h < per_task]
        remaining = cfg.trials - sum(have)
        for i, c in enumerate(ctxs):
            if i not in todo or remaining <= 0:
                results.append(TaskResult(side, c.task_name, int(weights[i]), have[i], True))
        if not todo or remaining <= 0:
            say(f"{side}: {len(ctxs)} tasks already tuned ({sum(have)} records); skipping")
            continue
        # a resumed task gets what is left of its budget, the half what is left of the global
        left = min(per_task - min(have[i] for i in todo), remaining)
        names = [ctxs[i].task_name for i in todo]
        say(
            f"{side}: tuning {len(todo)} of {len(ctxs)} kernels, {remaining} trials, "
            f"{tgt.kind.name}"
        )
        done: dict[int, int] = {}
        with tgt:
            ms.tune_tasks(
                tasks=[ctxs[i] for i in todo],
                task_weights=[weights[i] for i in todo],
                work_dir=str(out),
                max_trials_global=remaining,
                max_trials_per_task=left,
                num_trials_per_iter=min(64, max(1, left)),
                # the first build in a fresh worker imports TVM: 30 s (the default) is not enough
                # on a loaded 2-core machine
                builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=300),
                runner=runner,
                database=db,
                measure_callbacks=[
                    *ms.measure_callback.MeasureCallback.create("default"),
                    _progress_callback(say, side, names, done),
                ],
                cost_model=_cost_model(remaining),
            )
        run_total += sum(done.values())
        counts = _records_by_workload(db)
        for i in todo:
            n = counts.get(_hash(ctxs[i].mod), 0)
            results.append(TaskResult(side, ctxs[i].task_name, int(weights[i]), n, False))
    return TuneResult(out, tuple(results), time.perf_counter() - t0, run_total)


def has_metaschedule_records(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / "database_workload.json").exists() and (d / "database_tuning_record.json").exists()


def apply_records(
    mod: tvm.IRModule, target: tvm.target.Target, records: str | os.PathLike
) -> tuple[tvm.IRModule, tuple[str, ...], tuple[str, ...]]:
    """Schedule the kernels of a lowered side module (``build.lower_side``) that the database
    holds; returns (module, tuned kernel names, kernel names left to the default rules)."""
    from splitc import BuildError
    from tvm.relax.transform import MetaScheduleApplyDatabase
    from tvm.s_tir import meta_schedule as ms

    d = Path(records)
    if not has_metaschedule_records(d):
        raise BuildError(
            f"Build: {d} is not a tuning database (no database_*.json or knobs.json); "
            "create it with splitc tune -o DIR"
        )
    db = ms.database.JSONDatabase(work_dir=str(d))
    with target, db:
        mod = MetaScheduleApplyDatabase()(mod)
    tuned, default = [], []
    for gv, f in list(mod.functions.items()):
        if not isinstance(f, tvm.tirx.PrimFunc):
            continue
        if f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False)):
            tuned.append(gv.name_hint)
            # schedules.py looks for "tir.is_scheduled" (pre-0.27 name); op_pattern 8 (opaque)
            # keeps tvm.compile's FuseOps from fusing the tuned kernel again
            mod[gv] = f.with_attr("tir.is_scheduled", True).with_attr("op_pattern", 8)
        else:
            default.append(gv.name_hint)
    return mod, tuple(sorted(tuned)), tuple(sorted(default))
