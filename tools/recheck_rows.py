"""Re-time a sample of a calibration dataset's workloads now and compare, kernel by kernel.

A dataset is only as good as the conditions it was timed in. Timings drift between runs on a
shared machine (another tenant's load, a host migration, a slow phase that the probe did not
catch), and a drifted set of training rows teaches the regressor a wrong rate for a whole
kernel family. This tool says whether rows still hold:

    TVM_NUM_THREADS=1 taskset -c 1 python -m splitc.tools.recheck_rows DATA.jsonl \\
        --models DIR [--sample 12] [--seed 0] [--prefix famC0_] [--json]

picks ``--sample`` workloads of ``DATA.jsonl`` (at random, ``--seed``; only those whose model
name starts with ``--prefix``) whose ONNX file is ``DIR/<model>.onnx`` (a sweep's
``OUT/family``, a bench's ``OUT`` or ``OUT/synthetic``), times them again as calibration
does (``measure_workload``: rounds until a quiet one, on this machine's target), writes
nothing to the dataset, and prints per kernel family and per size how the new times compare
with the stored ones: median ratio new/old and the share within +-10 %.

Read it as: a family whose median ratio is far from the others' (and from 1.0) was timed in
other conditions than the rest; re-time that part of the data. Time it on a quiet core: a
busy neighbour core slows memory-bound kernels (2x seen for 20 ms kernels here while a fit
ran on the other core).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import click
from splitc.cost_models.dataset import row_key

__all__ = ["compare", "main"]

_SIZES = ((2e-6, "< 2 us"), (10e-6, "2-10 us"), (float("inf"), ">= 10 us"))


def _key(r: dict) -> tuple:
    return row_key(r["workload"], r["function"], r["role"], r["symbol"])


def _size(seconds: float) -> str:
    return next(name for top, name in _SIZES if seconds < top)


def _summary(ratios: list[float]) -> dict:
    return {"kernels": len(ratios), "median_ratio": statistics.median(ratios),
            "within_10pct": sum(abs(x - 1) <= 0.1 for x in ratios) / len(ratios)}


def compare(old: list[dict], new: list[dict]) -> dict:
    """New kernel rows against the old rows of the same kernels (same workload, function,
    role and symbol); kernels in only one of the two are left out. Returns the overall
    summary, one per family (``features["family"]``), one per size of the old time and
    per workload, and every pair as ``(workload, symbol, role, old s, new s)``."""
    before = {_key(r): r for r in old if r["type"] == "kernel"}
    pairs = [(before[_key(r)], r) for r in new if r["type"] == "kernel" and _key(r) in before
             and before[_key(r)]["seconds"] > 0]  # a 0 s row (none seen) has no ratio
    if not pairs:
        return {"all": None, "family": {}, "size": {}, "workload": {}, "pairs": []}
    ratios = [n["seconds"] / o["seconds"] for o, n in pairs]
    groups: dict[str, dict[str, list[float]]] = {"family": {}, "size": {}, "workload": {}}
    for (o, _), x in zip(pairs, ratios):
        for by, name in (("family", o["features"].get("family", "?")),
                         ("size", _size(o["seconds"])), ("workload", o["workload"])):
            groups[by].setdefault(name, []).append(x)
    out = {"all": _summary(ratios)}
    out.update({by: {k: _summary(v) for k, v in sorted(g.items())} for by, g in groups.items()})
    out["pairs"] = [(o["workload"], o["symbol"], o["role"], o["seconds"], n["seconds"])
                    for o, n in pairs]
    return out


def _table(title: str, rows: dict) -> list[str]:
    lines = [f"{title:28s} kernels  median new/old  within +-10%"]
    lines += [f"  {k[:26]:26s} {v['kernels']:7d}  {v['median_ratio']:14.3f}  "
              f"{v['within_10pct'] * 100:11.1f}%" for k, v in rows.items()]
    return lines


@click.command()
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--models", "models_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="folder holding <model>.onnx for the dataset's workloads")
@click.option("--sample", type=click.IntRange(min=1), default=12, show_default=True,
              help="how many workloads to time again")
@click.option("--seed", default=0, show_default=True)
@click.option("--prefix", default="", help="only workloads whose model starts with this")
@click.option("--target", default="host", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the comparison as JSON")
def main(dataset: Path, models_dir: Path, sample: int, seed: int, prefix: str, target: str,
         as_json: bool) -> None:
    from splitc import InputError
    from splitc.cost_models.calibrate import CalibrateConfig
    from splitc.cost_models.dataset import load_rows
    from splitc.cost_models.kernels import resolve
    from splitc.cost_models.measure import measure_workload
    from splitc.cost_models.rpc import Runner
    from splitc.cost_models.sampling import Probe
    from splitc.cost_models.workloads import model_module

    runner = Runner(resolve(target), None, None)
    old = [r for r in load_rows(dataset, target, runner.board) if r["type"] == "kernel"]
    models = {r["workload"]: r["model"] for r in old if r["model"].startswith(prefix)}
    have = sorted(w for w, m in models.items() if (models_dir / f"{m}.onnx").is_file())
    if not have:
        runner.close()
        raise InputError(f"recheck_rows: no workload of {str(dataset)!r} (target {target!r}, "
                         f"board {runner.board!r}, prefix {prefix!r}) has its model in "
                         f"{str(models_dir)!r} as <model>.onnx")
    picked = sorted(random.Random(seed).sample(have, min(sample, len(have))))
    t0 = time.time()

    def say(msg: str) -> None:
        click.echo(f"[{time.time() - t0:7.1f}s] {msg}", err=True)

    cfg = CalibrateConfig(target=target, output=models_dir / "recheck.json")  # never written
    probe = Probe(runner, resolve(target))
    new: list[dict] = []
    try:
        for i, w in enumerate(picked):
            say(f"workload {i + 1}/{len(picked)}: {w}")
            work = model_module(models_dir / f"{models[w]}.onnx", None, True, step=False)
            if work.key != w:  # another batch or another build of the model: not comparable
                say(f"skipped: the model now builds as {work.key}, not {w}")
                continue
            measure_workload(work, runner, cfg, set(), new.append, say, probe)
    finally:
        runner.close()
    res = compare(old, new)
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    if res["all"] is None:
        raise InputError("recheck_rows: none of the re-timed kernels is in the dataset")
    a = res["all"]
    click.echo(f"{a['kernels']} kernels of {len(res['workload'])} workloads timed again: "
               f"median new/old {a['median_ratio']:.3f}, {a['within_10pct'] * 100:.1f}% "
               "within +-10%")
    for title in ("family", "size", "workload"):
        click.echo("\n".join(_table(f"by {title}", res[title])))


if __name__ == "__main__":
    main()
