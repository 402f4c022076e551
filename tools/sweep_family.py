"""Time only the family sweep: training rows for ``splitc calibrate --train-rows``.

``splitc calibrate --family-sweep N`` times N random one-block models (``family_sweep.py``)
as part of a calibration; this runs just that part, resumably, so a sweep of an hour can be
timed once (or in pieces: ``--start``) and reused by later calibrations and by
``tools/bench_cost_model.py --train-rows``:

    TVM_NUM_THREADS=1 python -m splitc.tools.sweep_family /tmp/fam 320 [--start 227] \\
        [--kinds conv,dense]

writes ``/tmp/fam/fam.jsonl`` (rows as calibration writes them, every block training-only)
and caches the exported blocks under ``/tmp/fam/family``. A block that fails to build is
reported and skipped; the others go on. Needs torch (to export the blocks).

Each block is timed in a fresh Python process (``--blocks-per-process 1``, the default): a
long-lived timing process drifts slow. In session 15, four 8x8 depthwise blocks timed 5-12%
faster (forward conv) in fresh processes than in session 14's one-process sweep, step timed
or not; the test models' steps are timed early in their process, and the trees learn the rate
they are fitted on. ``--blocks-per-process 0`` times every block in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("n", type=click.IntRange(min=1))
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True,
              help="skip the first START blocks (time a sweep in pieces)")
@click.option("--kinds", default="", help="only these block kinds, comma-separated "
              "(conv, dense, dwconv, attention, pool)")
@click.option("--target", default="host", show_default=True)
@click.option("--blocks-per-process", type=click.IntRange(min=0), default=1, show_default=True,
              help="time this many blocks in each fresh process (0: all in this one)")
@click.option("--only", multiple=True, hidden=True, help="(internal) time these blocks here")
@click.option("--probe-best", default="{}", hidden=True,
              help="(internal) the probe's best readings so far, JSON")
def main(out: Path, n: int, start: int, kinds: str, target: str, blocks_per_process: int,
         only: tuple[str, ...], probe_best: str) -> None:
    from splitc import InputError
    from splitc.cost_models.calibrate import CalibrateConfig
    from splitc.cost_models.dataset import done_keys, load_rows
    from splitc.cost_models.family_sweep import FAMILY_KINDS, family_models
    from splitc.cost_models.kernels import resolve
    from splitc.cost_models.measure import measure_workload
    from splitc.cost_models.rpc import Runner
    from splitc.cost_models.sampling import Probe
    from splitc.cost_models.workloads import model_module

    want = [k for k in kinds.split(",") if k]
    if bad := [k for k in want if k not in FAMILY_KINDS]:
        raise InputError(f"sweep_family: unknown kind {bad[0]!r}; use {', '.join(FAMILY_KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    ds = out / "fam.jsonl"
    if only:  # a child of _fresh: the blocks are exported already
        paths = [out / "family" / name for name in only]
    else:
        paths = [p for p in family_models(out / "family", n, only=want)
                 if int(p.stem.split("_")[1]) >= start]
    if blocks_per_process and not only:
        _fresh(out, n, target, paths, blocks_per_process, load_rows(ds, target))
        return
    cfg = CalibrateConfig(target=target, output=out / "fam.json")
    runner = Runner(resolve(target), None, None)
    done = done_keys(load_rows(ds, target, runner.board))
    t0 = time.time()

    def say(msg: str) -> None:
        click.echo(f"[{time.time() - t0:7.1f}s] {msg}", err=True)

    probe = Probe(runner, resolve(target), json.loads(probe_best))
    failed = 0
    with ds.open("a") as fh:
        def emit(row: dict) -> None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()  # a killed sweep keeps every finished row

        for i, m in enumerate(paths):
            if not only:  # a child of _fresh: the parent numbered its blocks
                say(f"block {i + 1}/{len(paths)}: {m.name}")
            try:
                w = model_module(m, None, True, step=False)
                measure_workload(w, runner, cfg, done, emit, say, probe)
            except Exception as e:  # noqa: BLE001 - one block failing must not stop the sweep
                failed += 1
                say(f"FAILED {m.name}: {type(e).__name__}: {e}")
    runner.close()
    if only:  # a child of _fresh: its count and the probe's best, for the parent
        click.echo(json.dumps({"failed": failed, "probe_best": probe.best}))
        return
    click.echo(f"{len(paths) - failed} blocks timed into {ds}" +
               (f", {failed} failed" if failed else ""))


def _fresh(out: Path, n: int, target: str, paths: list[Path], per: int,
           rows: list[dict]) -> None:
    """Time ``paths`` in fresh processes of ``per`` blocks each (this tool with ``--only``),
    but not the blocks with a ``done`` row in ``rows`` (the dataset so far); a process that
    dies counts its blocks as failed, and the sweep goes on."""
    t0 = time.time()
    done = {r["model"] for r in rows if r["type"] == "done"}
    if skipped := [m for m in paths if m.stem in done]:
        click.echo(f"{len(skipped)} blocks already measured", err=True)
    paths = [m for m in paths if m.stem not in done]
    failed, best = 0, {}  # the probe's best readings, carried from process to process
    for i in range(0, len(paths), per):
        chunk = paths[i:i + per]
        for j, m in enumerate(chunk):
            click.echo(f"[{time.time() - t0:7.1f}s] block {i + j + 1}/{len(paths)}: {m.name}",
                       err=True)
        cmd = [sys.executable, "-m", "splitc.tools.sweep_family", str(out), str(n),
               "--target", target, "--probe-best", json.dumps(best),
               *(a for m in chunk for a in ("--only", m.name))]
        p = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True)
        if p.returncode == 0:
            res = json.loads(p.stdout.splitlines()[-1])
            failed, best = failed + res["failed"], res["probe_best"]
        else:  # e.g. killed by a signal: its finished rows are in the file already
            failed += len(chunk)
            click.echo(f"FAILED {', '.join(m.name for m in chunk)}: the timing process "
                       f"exited with {p.returncode}", err=True)
    click.echo(f"{len(paths) - failed} blocks timed into {out / 'fam.jsonl'}" +
               (f", {failed} failed" if failed else "") +
               f" ({per} a process)")


if __name__ == "__main__":
    main()
