"""MetaSchedule strategy of ``splitc tune`` and ``apply_records`` for the build.

``run_metaschedule`` is ``tune(cfg)`` with ``strategy="metaschedule"`` (``passes/tune.py``
decides the kernels and targets); ``apply_records`` is what ``passes/build.py: build_side``
calls for a directory that holds MetaSchedule records.

The database is MetaSchedule's own JSON pair in ``output`` (``database_workload.json``,
``database_tuning_record.json``). Resume: each task's records already in the database count
towards its budget; a task at its per-task budget is skipped and a half whose tasks hold
``trials`` records in all is not tuned again, so re-running the same command does nothing
and a larger ``--trials`` continues where the last run stopped (the evolutionary search
seeds its population from the database's best records).

Cost, measured on the shared 2-core dev box (random search: xgboost was not installed then; one
LocalBuilder worker), records in a fresh DB, ``ops=("conv2d", "matmul")``, 8 trials per kernel:
demo CNN (tools/models/demo_cnn.onnx, batch 32; the plan keeps every op on the device): 8
kernels, 56 trials in 301 s (~5.4 s a trial: design space + compile + run); training step
3.4 -> 3.3 ms (median of 6, 1.03x over passes/schedules.py's defaults). Tiny CNN
(tests/helpers/models.py, batch 2): 4 conv kernels, 32 trials in 242 s; step 0.3 ms either
way. Losses of tuned and default builds are bit-identical on both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import tvm
from splitc import InputError

if TYPE_CHECKING:
    from splitc.passes.tune import TuneConfig, TuneResult

__all__ = ["apply_records", "has_metaschedule_records", "run_metaschedule"]


def _runner(cfg: TuneConfig):
    from tvm.s_tir import meta_schedule as ms

    if cfg.rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=120)
    host, _, port = cfg.rpc_tracker.rpartition(":")  # checked by tune._check_rpc
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


def run_metaschedule(cfg: TuneConfig, halves, out: Path, t0: float) -> TuneResult:
    """Tune each half's kernels with MetaSchedule into the JSON database in ``out``."""
    from splitc.passes.tune import TaskResult, TuneResult, _say
    from tvm.s_tir import meta_schedule as ms

    say = _say(cfg)
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
