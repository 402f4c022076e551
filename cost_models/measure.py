"""Measuring one workload: its fused kernels and whole training step, timed, as dataset rows.

``measure_workload`` is step 3 of calibration (``calibrate.py`` says how the pieces fit): it
schedules a workload's kernels as ``splitc compile`` would, builds them into one library and
the step for the Relax VM, times both in rounds (``sampling.py: time_rounds``), traces each
kernel call back to the bindings and planner ops it covers (``kernels.py: kernel_groups``,
from ``passes/provenance.py``'s map) and emits kernel, ``ops``, ``step`` and ``done`` rows with
their provenance. A workload whose ``done`` row is in the dataset is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from splitc import InputError, __version__
from splitc.cost_models.dataset import DATASET_VERSION, now, row_key
from splitc.cost_models.kernels import describe, kernel_groups
from splitc.cost_models.kernels import resolve as _target
from splitc.cost_models.kernels import vm_builtins as _vm_builtins
from splitc.cost_models.kernels import vm_specs as _vm_specs
from splitc.cost_models.sampling import Probe, time_rounds
from splitc.cost_models.workloads import Workload

if TYPE_CHECKING:
    from splitc.cost_models.calibrate import CalibrateConfig

__all__ = ["measure_workload", "schedules_label"]


# timing budget per kernel over all rounds: 30 x 1 ms timings for the many microsecond
# kernels, >= 2 a round of the few slow ones (sampling.py: time_rounds)
_BUDGET_S = 0.06


def schedules_label(cfg: CalibrateConfig) -> str:
    """What the timed kernels ran: the default schedules or a tuning directory's records."""
    return "default" if cfg.tuning_records is None else f"tuned ({cfg.tuning_records})"


def _tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def measure_workload(w: Workload, runner, cfg: CalibrateConfig, done: set,
                     emit: Callable[[dict], None], say: Callable[[str], None],
                     probe: Probe | None = None, kernels: bool = True) -> None:
    """Compile ``w`` as the build does, time its kernels (skipping keys in ``done``; none
    when not ``kernels``) and its whole step in rounds (``sampling.py: time_rounds``;
    ``probe``, shared by every workload of a calibration, decides when a round was quiet),
    and ``emit`` one row per kernel and one ``step`` row."""
    import tvm

    target = _target(cfg.target)
    if target.kind.name != "llvm":
        raise InputError(f"Calibrate: target {cfg.target!r} is not a CPU (llvm) target; GPU "
                         "calibration is not implemented yet")
    if row_key(w.key, "done", "", "") in done:
        say(f"{w.key}: already measured")
        return
    t0 = time.perf_counter()
    sched, calls, prims, groups, sites = kernel_groups(w, target, cfg.tuning_records, say)
    # threads: the TVM runtime's pool here (1 on this 2-vCPU box, or TVM_NUM_THREADS);
    # unknown on a board behind RPC. stat: which statistic of the timings "seconds" is.
    prov = {"train_only": w.train_only, "target": str(cfg.target),
            "mcpu": str(target.attrs.get("mcpu", "")), "board": runner.board,
            "tvm": _tvm_version(), "splitc": __version__,
            "repeats": cfg.repeats, "number": cfg.number, "min_repeat_ms": cfg.min_repeat_ms,
            "stat": "min", "threads": runner.threads, "schema": DATASET_VERSION,
            "rounds": cfg.rounds, "max_rounds": cfg.max_rounds,
            "schedules": schedules_label(cfg),
            # timed in a process of its own (calibrate's default) or in one shared with other
            # workloads (--in-process): kernels move by a few % between the two (session 17)
            "process": "fresh" if cfg.fresh_processes else "shared"}
    todo = [(k, cs) for k, cs in groups.items()
            if kernels and row_key(w.key, *k[:3]) not in done]
    # training-only workloads are not tested on: their noise floor is not needed (half the
    # timing time of a calibration with 40 synthetic models)
    recheck = cfg.recheck and not w.train_only
    step = bool(w.step) and row_key(w.key, "step", "", "") not in done
    say(f"{w.key}: {len(groups)} kernels ({len(calls)} calls), {len(todo)} to measure")
    lib = vm = None
    if todo:
        syms = sorted({k[2] for k, _ in todo})
        lib = tvm.tirx.build(tvm.IRModule({s: prims[s].with_attr("global_symbol", s)
                                           for s in syms}), target=target)
        lib = runner.load(lib, f"k{abs(hash(w.key)) % 10**8}")
        say(f"{w.key}: scheduled and built in {time.perf_counter() - t0:.1f} s")
    specs = {}
    if step:
        # compiled before timing: the kernels and the step are sampled in the same rounds
        ex = tvm.compile(sched, target=target)
        vm_work = _vm_builtins(ex)
        vm = runner.vm(runner.load(ex, f"s{abs(hash(w.key)) % 10**8}"))
        specs = {f: _vm_specs(sched[f]) for f in w.step}
        say(f"{w.key}: step compiled ({time.perf_counter() - t0:.1f} s so far)")
    tcalls = [(k[2], list(k[3])) for k, _ in todo]
    if not tcalls and not specs:
        emit({"type": "done", "workload": w.key, "model": w.model, "date": now(), **prov})
        return

    def timed(label: str):
        t1 = time.perf_counter()
        ks, fs, info = time_rounds(runner, lib, tcalls, vm, specs, cfg.repeats, cfg.number,
                                   cfg.min_repeat_ms, _BUDGET_S, cfg.rounds, cfg.max_rounds,
                                   probe, lambda m: say(f"{w.key}: {label} {m}"))
        say(f"{w.key}: {label} {len(tcalls)} kernels and {len(specs)} VM functions in "
            f"{info['rounds']} rounds, {time.perf_counter() - t1:.1f} s")
        return ks, fs, info

    ts, fs, info = timed("timing")
    # again, after the whole first measurement: the noise floor of any fit
    ts2, fs2, _ = timed("re-timing") if recheck else ([None] * len(todo), None, None)
    rows = []
    for ((key, cs), t, t2) in zip(todo, ts, ts2):
        rows.append({"type": "kernel", "workload": w.key, "model": w.model,
                     **describe(key, cs, prims, target, sites),
                     "seconds": t.seconds, "median": t.median, "spread": t.spread,
                     "samples": t.repeats, "rounds_used": info["rounds"],
                     "quiet": info["quiet"], **_probe_s(info), "date": now(), **prov})
        if t2 is not None:
            rows[-1].update(seconds=min(t.seconds, t2.seconds), seconds_first=t.seconds,
                            seconds_again=t2.seconds, median_again=t2.median)
    for r in rows:
        emit(r)
    if w.ops and row_key(w.key, "ops", "", "") not in done:
        emit({"type": "ops", "workload": w.key, "model": w.model,
              "ops": [f.to_json() for f in w.ops], "date": now(), **prov})
    if step:
        n_calls = sum(1 for c in calls if c.function != "server_infer")
        first = sum(t.seconds for t in fs.values())
        row = {"type": "step", "workload": w.key, "model": w.model, "seconds": first,
               "median": sum(t.median for t in fs.values()),
               "functions": {k: t.seconds for k, t in fs.items()},
               "spread": max(t.spread for t in fs.values()), "n_calls": n_calls,
               # VM work around the kernels, every function but inference (kernels.py)
               "vm_builtins": sum(n for f, n in vm_work.items() if "infer" not in f),
               "rounds_used": info["rounds"], "quiet": info["quiet"],
               "probe": info["probe"], **_probe_s(info), "date": now(), **prov}
        if recheck:
            again = sum(t.seconds for t in fs2.values())
            row.update(seconds=min(first, again), seconds_first=first, seconds_again=again)
        emit(row)
        say(f"{w.key}: step {row['seconds'] * 1e3:.3f} ms")
    emit({"type": "done", "workload": w.key, "model": w.model, "date": now(), **prov})


def _probe_s(info: dict) -> dict:
    """The probe's fastest readings in seconds (``sampling.Probe``: a 64^3 matmul and a 1M
    add), where a probe ran: the host's speed when the row was timed. Session 18 re-timed 3
    test models in-process a day after session 17: kernels read 1.057-1.083x in the median,
    steps 1.06-1.08x, on the same host; rows of different days can be compared by it."""
    return {"probe_s": info["probe_s"]} if "probe_s" in info else {}
