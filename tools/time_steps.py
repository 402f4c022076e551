"""Whole training steps timed in several fresh processes: the step's noise across processes.

Calibration times a model's step once, in the calibrating process, and its recheck pass
again in the same process; the two agree closely (within 0.4% for mlp in session 14). Another
process does not always agree: the same compiled step of mlp read 534–538 us in seven fresh
processes and 631 us inside the bench's calibration (session 14, each with a quiet round). A
cost model's step error can only be read against that spread:

    TVM_NUM_THREADS=1 python -m splitc.tools.time_steps A.onnx [B.onnx ...] \\
        [--processes 5] [--bench-results COSTBENCH/results.json] [--json]

times each model's step (``measure_workload``, kernels not timed, rounds until a quiet
one, built as ``splitc compile`` builds it) in ``--processes`` fresh Python processes,
taking the models in turn within each pass, and prints each model's times, their median
and spread (largest / smallest - 1). With ``--bench-results`` (``tools/bench_cost_model.py``'s
``results.json``), it also prints the bench's predicted steps (kernel sums and the planner's
op sums) against these medians and against the bench's own one-process measurement.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

__all__ = ["main", "summarize", "time_fresh"]


def summarize(runs: dict[str, list[float]], bench: dict | None = None) -> dict:
    """Per model: the step times (s), their median and spread; with ``bench`` (the bench's
    ``results["steps"]``, keyed by a prefix of the model's name), each prediction's error
    against the median and against the bench's measurement."""
    out = {}
    for model, ts in runs.items():
        med = statistics.median(ts)
        row = {"runs": ts, "median": med, "spread": max(ts) / min(ts) - 1}
        name = next((n for n in (bench or {}) if model.startswith(n)), None)
        if name is not None:
            b = bench[name]
            row["bench"] = {"name": name, "measured": b["measured"]}
            for k in ("kernel_sum", "op_sum"):
                if b.get(k):
                    row["bench"][k] = b[k]
                    row["bench"][f"{k}_vs_median"] = b[k] / med - 1
                    row["bench"][f"{k}_vs_measured"] = b[k] / b["measured"] - 1
        out[model] = row
    return out


def time_fresh(models, processes: int, target: str = "host",
               say=lambda msg: None) -> dict[str, list[float]]:
    """Each model's step timed in ``processes`` fresh Python processes, the models in turn
    within each pass: {workload's model name: [seconds, ...]}."""
    from splitc import InputError

    runs: dict[str, list[float]] = {}
    for i in range(processes):
        for m in models:
            p = subprocess.run([sys.executable, "-m", "splitc.tools.time_steps", "--one",
                                "--target", target, str(m)], check=False, capture_output=True,
                               text=True)
            if p.returncode != 0:
                raise InputError(f"time_steps: timing {str(m)!r} failed:\n{p.stderr[-2000:]}")
            row = json.loads(p.stdout.splitlines()[-1])
            runs.setdefault(row["model"], []).append(row["seconds"])
            quiet = "" if row["quiet"] else " (no quiet round)"
            say(f"pass {i + 1}/{processes}: {row['model']} {row['seconds'] * 1e3:.3f} ms{quiet}")
    return runs


def _one(path: Path, target: str) -> dict:
    """Time ``path``'s step in this process; returns the step row."""
    from splitc.cost_models.calibrate import CalibrateConfig
    from splitc.cost_models.kernels import resolve
    from splitc.cost_models.measure import measure_workload
    from splitc.cost_models.rpc import Runner
    from splitc.cost_models.sampling import Probe
    from splitc.cost_models.workloads import model_module

    runner = Runner(resolve(target), None, None)
    rows: list[dict] = []
    try:
        w = model_module(path)
        cfg = CalibrateConfig(target=target, output=path.with_suffix(".steps.json"),
                              recheck=False)  # the output is never written
        measure_workload(w, runner, cfg, set(), rows.append, lambda m: None,
                         Probe(runner, resolve(target)), kernels=False)
    finally:
        runner.close()
    return next(r for r in rows if r["type"] == "step")


@click.command()
@click.argument("models", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--processes", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--bench-results", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tools/bench_cost_model.py's results.json: its predictions vs these")
@click.option("--target", default="host", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--one", is_flag=True, hidden=True, help="(internal) time one model here")
def main(models: tuple[Path, ...], processes: int, bench_results: Path | None, target: str,
         as_json: bool, one: bool) -> None:
    if one:
        click.echo(json.dumps(_one(models[0], target)))
        return
    bench = json.loads(bench_results.read_text()).get("steps") if bench_results else None
    t0 = time.time()
    runs = time_fresh(models, processes, target,
                      lambda m: click.echo(f"[{time.time() - t0:7.1f}s] {m}", err=True))
    res = summarize(runs, bench)
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    for model, r in res.items():
        line = (f"{model[:24]:24s} median {r['median'] * 1e3:9.3f} ms, spread "
                f"{r['spread'] * 100:5.1f}% ({', '.join(f'{t * 1e3:.3f}' for t in r['runs'])})")
        if "bench" in r and "kernel_sum" in r["bench"]:
            b = r["bench"]
            line += (f" | bench measured {b['measured'] * 1e3:.3f}; kernel-sum pred "
                     f"{b['kernel_sum_vs_median'] * 100:+.1f}% vs median, "
                     f"{b['kernel_sum_vs_measured'] * 100:+.1f}% vs bench")
        click.echo(line)


if __name__ == "__main__":
    main()
