"""Time only the family sweep: training rows for ``splitc calibrate --train-rows``.

``splitc calibrate --family-sweep N`` times N random one-block models (``family_sweep.py``)
as part of a calibration; this runs just that part, resumably, so a sweep of an hour can be
timed once (or in pieces: ``--start``) and reused by later calibrations and by
``tools/bench_cost_model.py --train-rows``:

    TVM_NUM_THREADS=1 python -m splitc.tools.sweep_family /tmp/fam 320 [--start 227] \\
        [--kinds conv,dense]

writes ``/tmp/fam/fam.jsonl`` (rows as calibration writes them, every block training-only)
and caches the exported blocks under ``/tmp/fam/family``; ``--blocks DIR`` times an earlier
sweep's exported blocks again instead (rows that were timed in a long-lived process). A block
that fails to build, or whose timing process dies, is reported and skipped; the others go on.
A block with a ``done`` row is not timed again. Needs torch (to export the blocks).

Each block is timed in a fresh Python process (``cost_models/fresh.py``, as ``splitc
calibrate`` times its workloads): a long-lived timing process drifts slow. In session 15,
four 8x8 depthwise blocks timed 5-12% faster (forward conv) in fresh processes than in
session 14's one-process sweep, step timed or not. ``--in-process`` times every block in
this process.
"""

from __future__ import annotations

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
@click.option("--in-process", is_flag=True,
              help="time every block in this process, not each in a fresh one")
@click.option("--blocks", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="time the first N blocks exported under this folder (an "
              "earlier sweep's family/) again, instead of drawing new ones")
def main(out: Path, n: int, start: int, kinds: str, target: str, in_process: bool,
         blocks: Path | None) -> None:
    from splitc import InputError
    from splitc.cost_models.calibrate import CalibrateConfig
    from splitc.cost_models.dataset import done_keys, load_rows
    from splitc.cost_models.family_sweep import FAMILY_KINDS, family_models
    from splitc.cost_models.fresh import measure_into, time_fresh
    from splitc.cost_models.kernels import resolve
    from splitc.cost_models.rpc import Runner
    from splitc.cost_models.sampling import Probe

    want = [k for k in kinds.split(",") if k]
    if bad := [k for k in want if k not in FAMILY_KINDS]:
        raise InputError(f"sweep_family: unknown kind {bad[0]!r}; use {', '.join(FAMILY_KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = CalibrateConfig(target=target, output=out / "fam.json")
    ds = cfg.dataset_path
    if blocks:  # an earlier sweep's blocks (their names end in their kind)
        paths = [p for p in sorted(blocks.glob("*.onnx"))[:n]
                 if not want or p.stem.rsplit("_", 1)[1] in want]
    else:
        paths = family_models(out / "family", n, only=want)
    paths = [p for p in paths if int(p.stem.split("_")[1]) >= start]
    rows = load_rows(ds, target, "local")
    finished = {r["model"] for r in rows if r["type"] == "done"}
    if skipped := [m for m in paths if m.stem in finished]:
        click.echo(f"{len(skipped)} blocks already measured", err=True)
    paths = [m for m in paths if m.stem not in finished]
    t0 = time.time()

    def say(msg: str) -> None:
        click.echo(f"[{time.time() - t0:7.1f}s] {msg}", err=True)

    runner = Runner(resolve(target), None, None) if in_process else None
    probe = Probe(runner, resolve(target)) if runner else None
    # kernels of a block a killed sweep left unfinished (a fresh process reads its own)
    done = done_keys(rows) if runner else None
    best: dict[str, float] = {}  # the probe's best readings, carried from process to process
    failed = 0
    for i, m in enumerate(paths):
        say(f"block {i + 1}/{len(paths)}: {m.name}")
        try:
            if runner:
                measure_into(cfg, (m, "family"), runner, probe, done, say)
            else:
                best = time_fresh(cfg, (m, "family"), best, say)
        except Exception as e:  # noqa: BLE001 - one block failing must not stop the sweep
            failed += 1
            say(f"FAILED {m.name}: {type(e).__name__}: {e}")
    if runner:
        runner.close()
    click.echo(f"{len(paths) - failed} blocks timed into {ds}" +
               (f", {failed} failed" if failed else "") +
               (" in this process" if in_process else ", each in a fresh process"))


if __name__ == "__main__":
    main()
