"""Timing each workload of a calibration in a fresh Python process.

A long-lived timing process drifts slow. Session 15 timed four 8x8 depthwise blocks, each in
its own process, at 0.88-0.95 of what a one-process sweep of 160 blocks had read for their
forward convs, with or without their step timed; session 14 timed mlp's whole step at 631 us
late in the bench's calibration process and at 534-538 us in fresh processes. Session 16,
each test model in its own process: the calibration's steps came within -5.1..+0.8% of their
fresh-process medians (-1.8..+17.7% in one process). The drift is not uniform: session 10's
family blocks, timed again in fresh processes, read 0.998 of their old times in the median.
Session 17 found that TVM had bound those timings to core 0, where other work may have run
beside them (``splitc/__init__.py: _keep_cpu_set``); with nothing beside it, only mlp's step
still drifted in one process (611 us as the fifth model, 531 us fresh), the other eight
steps within -4.7..+2.2% of their fresh medians.

``time_fresh(cfg, workload, probe_best, say)`` runs ``python -m splitc.cost_models.fresh``,
which builds the workload (``calibrate.build_workload``), times it with ``measure_workload``
into the dataset file (rows appended as they finish, as in one process) and opens its own
runner: locally, or a new session from the RPC tracker, which the board's ``rpc_server``
serves in a new process too. The probe's fastest readings (``sampling.Probe.best``) go in
and come back, so "quiet" means the same thing in every process. Progress lines are handed
to ``say``; the result is the last line of the child's stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import splitc
from splitc import BuildError, SplitcError

__all__ = ["measure_into", "time_fresh"]

_RESULT = "splitc-fresh-result "
# the CalibrateConfig fields that timing one workload reads (measure.py)
_FIELDS = ("target", "rpc_tracker", "rpc_key", "repeats", "rounds", "max_rounds", "number",
           "min_repeat_ms", "recheck", "tuning_records")


def time_fresh(cfg, workload: tuple[str, object], probe_best: dict[str, float],
               say: Callable[[str], None]) -> dict[str, float]:
    """Time ``workload`` (``(model path or "sweep", batch | "synthetic" | "family" | None)``)
    in a fresh process; returns the probe's best readings after it. Raises ``BuildError`` with
    the in-process message when the workload fails to build (a ``SplitcError`` as it was
    raised), and says so when the process dies."""
    from splitc.cost_models.calibrate import failed_message

    job = {"cfg": {k: (str(v) if k == "tuning_records" and v is not None else v)
                   for k, v in ((f, getattr(cfg, f)) for f in _FIELDS)},
           "dataset": str(cfg.dataset_path), "workload": [str(workload[0]), workload[1]],
           "probe_best": probe_best}
    p = subprocess.Popen([sys.executable, "-m", "splitc.cost_models.fresh"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdin.write(json.dumps(job))
    p.stdin.close()
    result = None
    for line in p.stdout:
        if line.startswith(_RESULT):
            result = json.loads(line[len(_RESULT):])
        else:
            say(line.rstrip("\n"))
    rc = p.wait()
    if result is None:  # killed (a signal, out of memory): its finished rows are on disk
        raise BuildError(f"Calibrate: the process timing {workload[0]} exited with {rc}; the "
                         f"rows it finished are in {cfg.dataset_path}: run again to resume")
    if err := result["error"]:
        if err["class"]:
            raise getattr(splitc, err["class"], SplitcError)(err["message"])
        raise BuildError(failed_message(workload[0], err["message"], workload[1]))
    return result["probe_best"]


def measure_into(cfg, workload: tuple[str, object], runner, probe, done: set,
                 say: Callable[[str], None]) -> None:
    """Time ``workload`` here, with ``runner`` and ``probe``, appending its rows to the dataset
    as they finish (the child's work, and ``sweep_family --in-process``'s)."""
    from splitc.cost_models.calibrate import build_workload
    from splitc.cost_models.measure import measure_workload

    with cfg.dataset_path.open("a") as fh:
        def emit(row: dict) -> None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()  # a killed process keeps every finished row

        measure_workload(build_workload(*workload), runner, cfg, done, emit, say, probe)


def main() -> None:
    """The child: a job (JSON) on stdin, progress lines and then the result on stdout."""
    from pathlib import Path

    from splitc.cost_models.calibrate import CalibrateConfig
    from splitc.cost_models.dataset import done_keys, load_rows
    from splitc.cost_models.kernels import resolve
    from splitc.cost_models.rpc import Runner
    from splitc.cost_models.sampling import Probe

    job = json.loads(sys.stdin.read())
    c = job["cfg"]
    cfg = CalibrateConfig(**{**c, "tuning_records": c["tuning_records"] and
                             Path(c["tuning_records"])}, dataset=Path(job["dataset"]))

    def say(msg: str) -> None:
        print(msg, flush=True)

    error, best, runner = None, job["probe_best"], None
    try:
        runner = Runner(resolve(cfg.target), cfg.rpc_tracker, cfg.rpc_key)
        probe = (Probe(runner, resolve(cfg.target), best)
                 if cfg.max_rounds > cfg.rounds else None)
        done = done_keys(load_rows(cfg.dataset_path, cfg.target, runner.board))
        measure_into(cfg, tuple(job["workload"]), runner, probe, done, say)
        best = probe.best if probe else best
    except SplitcError as e:  # no board from the tracker, ...: the parent raises it again
        error = {"message": str(e), "class": type(e).__name__}
    except Exception as e:  # noqa: BLE001 - TVM's legalizer raises AssertionError...
        error = {"message": str(e) or type(e).__name__, "class": None}
    finally:
        if runner is not None:
            runner.close()
    print(_RESULT + json.dumps({"error": error, "probe_best": best}), flush=True)


if __name__ == "__main__":
    main()
