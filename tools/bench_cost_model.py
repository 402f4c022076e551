"""Benchmark of the learned cost model on this CPU: held-out accuracy, whole steps, decisions.

    TVM_NUM_THREADS=1 python -m splitc.tools.bench_cost_model --out /tmp/costbench \
        [--target host] [--synthetic 40] [--synthetic-large 12] [--big] [--family-sweep 300]
        [--train-rows EARLIER/bench.jsonl ...] [--roofline-from EARLIER/bench.json]
        [--step-processes 7] [--in-process]

1. Calibrates (resumably, dataset in OUT/bench.jsonl) on the op sweep, ``--synthetic`` random
   small and ``--synthetic-large`` realistic-size models and ``--family-sweep`` one-block
   models per kernel family (``cost_models/family_sweep.py``) (training data only; with
   ``--train-rows``, those already in an earlier dataset are reused, not timed) and the 7 test
   models below (+ ``BIG_MODELS`` with ``--big``), every kernel timed twice
   (``recheck``: the noise floor), built for ``--target`` as ``splitc compile`` builds it.
   Each workload is timed in a fresh process (``cost_models/fresh.py``); ``--in-process``
   times them all in this one, the way every reused training row so far was timed (session
   17: the 402 held-out kernels priced by look-up agreed with their twins within +-10 % for
   389 timed in-process, 376 timed in fresh processes in the same hour).
2. Held-out kernels: leave-one-model-out over the 7 test models (``cost_models/fit.py:
   heldout_report``): share of kernels within +-10 % and MAPE for the roofline prior, linear
   and per-family trees on plain and on schedule-aware features (a kernel measured in another
   model is priced at that time: ``lookup.py: twins``), and the same kernels timed again.
3. Whole step, two ways, each with the model held out of the fit: the sum of the predicted
   kernels of its compiled step (+ VM call overhead), and the sum of the per-op
   ``LearnedModel.op_cost`` the planner sees, vs the measured compiled step (VM); with
   ``--step-processes K`` also vs the median of the step timed in K fresh processes
   (``tools/time_steps.py``: mlp's step read 631 us in the bench, 534-538 us fresh).
4. Decisions: per-op "measured" costs are the measured kernel times attributed back to ops
   (``cost_models/attribute.py``: per role and family, in proportion to each op's roofline
   time; the step's time beyond its kernels spread evenly);
   device = those costs, server 10x faster; the mincut plan chosen with predicted costs is
   evaluated with the measured costs against the plan chosen with measured costs, at 10, 100
   and 1000 Mbps. Predicted costs: the planner's for this profile (``splitc plan --op-costs
   auto``: the held-out predicted kernels of the compiled step, attributed by the same rule,
   ``cost_models/step_costs.py``), and the op-level ones (``--op-costs ops``) beside them.

Timings on a shared machine are noisy: kernels and the whole step are the minimum of timings
of >= 1 ms taken in >= 3 rounds, pinned to one core, until a round ran on a quiet machine
(``cost_models/sampling.py: time_rounds``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click

# realistic-size test models (tools/bench_models.py), held out like the others; session 4
# tested on the 7 small ones only (tiny_cnn's whole step: 0.052 ms)
BIG_MODELS = ("small_resnet", "encoder")


def _models(out: Path, big: bool = False) -> dict[str, Path]:
    """Test models (tests/helpers/models.py) plus medium ones defined here, plus
    ``BIG_MODELS`` when ``big``."""
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))
    import models as M

    paths = {n: M.export_model(n) for n in ("tiny_cnn", "mbv2_block", "tiny_transformer")}

    def cnn():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(64, 10)), (8, 3, 32, 32)

    def mlp():
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                             nn.Linear(256, 10)), (32, 784)

    def wide_cnn():
        return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 64, 1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(64 * 16 * 16, 10)), (4, 8, 16, 16)

    def transformer():
        class T(nn.Module):  # pre-LN attention block + GELU MLP, d=128, 4 heads, seq 32
            def __init__(self, d=128, h=4):
                super().__init__()
                self.h = h
                self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
                self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
                self.head = nn.Linear(d, 10)

            def forward(self, x):
                b, s, d = x.shape
                q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
                q, k, v = (t.reshape(b, s, self.h, d // self.h).transpose(1, 2)
                           for t in (q, k, v))
                a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, dim=-1) @ v
                x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
                x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
                return self.head(x.mean(1))

        return T(), (4, 32, 128)

    def bench_model(name):
        from splitc.tools.bench_models import build_model

        return lambda: build_model(name)[:2]

    out.mkdir(parents=True, exist_ok=True)
    makers = [("cnn_small", cnn), ("mlp", mlp), ("wide_cnn", wide_cnn),
              ("transformer_small", transformer)]
    makers += [(n, bench_model(n)) for n in (BIG_MODELS if big else ())]
    for name, make in makers:
        p = out / f"{name}.onnx"
        if not p.exists():
            torch.manual_seed(0)
            model, shape = make()
            # batch norm exports its training form only in TRAINING mode; models without it
            # export in EVAL mode, so no Dropout op (no Relax gradient) appears
            has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
            model.train(has_bn)
            mode = torch.onnx.TrainingMode.TRAINING if has_bn else torch.onnx.TrainingMode.EVAL
            torch.onnx.export(model, (torch.randn(*shape),), str(p), input_names=["x"],
                              opset_version=17, dynamo=False, do_constant_folding=False,
                              training=mode)
        paths[name] = p
    return paths


def _set_accuracy(acc: dict, chosen: str) -> dict[str, tuple[int, float, float]]:
    """Kernels within +-10 % (chosen regressor, roofline) per kernel group of the held-out
    report and over the small (session 4) and the big test models: {group: (kernels,
    chosen, roofline)}."""
    n = acc.get("group_kernels", {})
    g_c, g_r = acc[chosen].get("groups", {}), acc["roofline"].get("groups", {})
    out = {g: (n[g], g_c[g], g_r[g]) for g in n if g in g_c and not g.startswith("model=")}
    models = [g for g in n if g.startswith("model=") and g in g_c]
    for label, sel in (("small test models (session 4's 7)",
                        [g for g in models if not g[6:].startswith(BIG_MODELS)]),
                       ("big test models", [g for g in models if g[6:].startswith(BIG_MODELS)]),
                       ("all test models", models)):
        k = sum(n[g] for g in sel)
        if k:
            out[label] = (k, sum(n[g] * g_c[g] for g in sel) / k,
                          sum(n[g] * g_r[g] for g in sel) / k)
    return out


def learned_train(prof) -> int:
    """Training-only workloads the profile was fitted on (op sweep, synthetic models, family
    blocks: timed now or reused with --train-rows)."""
    ds = prof.learned["dataset"]["models"]
    return len(set(ds) - set(prof.learned["accuracy"].get("models", [])))


def _with_costs(graph, dev: dict, server_speedup: float = 10.0):
    from splitc.cost_models.base import OpCost

    ops = []
    for op in graph.ops:
        c = dev.get(op.name, op.device)
        s = OpCost(c.forward / server_speedup, c.backward / server_speedup,
                   c.update / server_speedup)
        ops.append(dataclasses.replace(op, device=c, server=s))
    return dataclasses.replace(graph, ops=tuple(ops))


def _decisions(gm, gp, Link, solve, evaluate) -> dict:
    """Per link rate: the plan chosen on ``gp``'s costs against the plan chosen on ``gm``'s
    (measured), both evaluated with the measured costs."""
    dec = {}
    for rate in ("10Mbps", "100Mbps", "1000Mbps"):
        link = Link.parse(rate, None, "0")
        best = solve(gm, link, algorithm="mincut")
        pred = solve(gp, link, algorithm="mincut")
        t_best = float(evaluate(gm, best.placement, link).total)
        t_pred = float(evaluate(gm, pred.placement, link).total)
        dec[rate] = {"gap_pct": (t_pred / t_best - 1) * 100,
                     "device_ops_pred": len(pred.placement.device),
                     "device_ops_best": len(best.placement.device)}
    return dec


def _fresh_lines(fresh: dict) -> list[str]:
    """One line per test model of ``time_steps.summarize``'s output: the fresh-process
    median, its spread, and the predicted steps' errors against it."""
    nan, lines = float("nan"), []
    for r in fresh.values():
        b = r.get("bench")
        if b:
            lines.append(f"  {b['name']:18s} {r['median'] * 1e3:8.3f} (spread "
                         f"{r['spread'] * 100:4.1f}%) | "
                         f"{b.get('kernel_sum_vs_median', nan) * 100:+6.1f}% | "
                         f"{b.get('op_sum_vs_median', nan) * 100:+6.1f}%")
    return lines


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("/tmp/splitc-costbench"))
@click.option("--target", default="host", show_default=True)
@click.option("--repeats", default=30, show_default=True)
@click.option("--synthetic", default=40, show_default=True,
              help="random small models timed as training data only")
@click.option("--synthetic-large", default=0, show_default=True,
              help="random models of realistic size timed as training data only")
@click.option("--big/--no-big", default=False, show_default=True,
              help=f"also test on {', '.join(BIG_MODELS)} (realistic sizes)")
@click.option("--family-sweep", default=0, show_default=True,
              help="random one-block models per kernel family, training data only")
@click.option("--train-rows", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="an earlier dataset whose training-only rows are reused, not timed again")
@click.option("--roofline-from", default="local-cpu", show_default=True,
              help="roofline constants from this profile (e.g. an earlier run's OUT/bench.json) "
              "instead of measuring them now: two runs on the same rows then fit the same model")
@click.option("--step-processes", type=click.IntRange(min=0), default=0, show_default=True,
              help="also time each test model's step in this many fresh processes and score "
              "the predicted steps against their median (tools/time_steps.py)")
@click.option("--time-only", is_flag=True, help="time and save the rows, then stop: the same "
              "command without it fits and scores them (so the training rows can be swept on "
              "another core meanwhile)")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="worker processes for the fits (default: one per CPU this process may use)")
@click.option("--in-process", is_flag=True,
              help="time every workload in this process, as the reused --train-rows were "
              "timed (splitc calibrate --in-process), not each in a fresh one")
def main(out: Path, target: str, repeats: int, synthetic: int, synthetic_large: int,
         big: bool, family_sweep: int, train_rows: tuple[Path, ...], roofline_from: str,
         step_processes: int, in_process: bool, time_only: bool, jobs: int | None) -> None:
    import torch
    from splitc.cost_models.attribute import attribute, row_sites
    from splitc.cost_models.calibrate import CalibrateConfig, calibrate, fit_learned, load_rows
    from splitc.cost_models.dataset import load_train_rows
    from splitc.cost_models.fit import UNSCALED_SUFFIX
    from splitc.cost_models.learned import LearnedModel
    from splitc.cost_models.link import Link
    from splitc.cost_models.profiles import DeviceProfile, load_profile
    from splitc.cost_models.regressors import fit_jobs
    from splitc.cost_models.roofline import RooflineModel
    from splitc.cost_models.step_costs import kernel_id, op_costs_from_kernels
    from splitc.passes.annotate_costs import annotate_costs
    from splitc.passes.frontend import load_onnx
    from splitc.passes.partition import solve
    from splitc.passes.plan import evaluate

    torch.set_num_threads(1)
    t0 = time.time()
    paths = _models(out, big)
    log = lambda m: click.echo(f"[{time.time() - t0:7.1f}s] {m}", err=True)
    prof_path = calibrate(CalibrateConfig(target=target, output=out / "bench.json",
                                          models=tuple(paths.values()), repeats=repeats,
                                          synthetic=synthetic,
                                          synthetic_large=synthetic_large, recheck=True,
                                          family_sweep=family_sweep, train_rows=train_rows,
                                          base_profile=roofline_from,
                                          fresh_processes=not in_process, jobs=jobs,
                                          fit=not time_only, progress=log))
    if time_only:
        click.echo(f"timed into {prof_path} in {time.time() - t0:.0f}s; run again without "
                   "--time-only to fit and score")
        return
    click.echo(f"calibrated in {time.time() - t0:.0f}s (measure + fit)")
    prof = load_profile(str(prof_path))
    acc = prof.learned["accuracy"]
    click.echo(f"held-out kernels: {acc['kernels']} from {len(acc['models'])} models "
               f"(+ {learned_train(prof)} training-only workloads in every fit); "
               f"{acc.get('looked_up', 0)} measured in another model, priced by look-up; "
               f"{acc.get('scaled', 0)} measured there at another batch, scaled (the "
               f"{UNSCALED_SUFFIX} candidates price them by their regressor)")
    for k, v in acc.items():
        if isinstance(v, dict) and "within_10pct" in v:
            big = (f" | kernels >= 10 us ({acc['kernels_ge_10us']}): "
                   f"{v['within_10pct_ge_10us']:.1%}, {v['mape_pct_ge_10us']:.1f}%"
                   if "within_10pct_ge_10us" in v else "")
            click.echo(f"  {k:20s} within10={v['within_10pct']:.2%}  MAPE={v['mape_pct']:.1f}%"
                       + big)
    click.echo(f"  chosen: kernels {prof.learned['kernel_regressor_name']}, op costs "
               f"{prof.learned['regressor_name']}")
    sets = _set_accuracy(acc, prof.learned["kernel_regressor_name"])
    for g, (n, v, r) in sets.items():
        click.echo(f"  {g:34s} {n:4d} kernels: chosen {v:.2%}, roofline {r:.1%} within +-10 %")
    rows = load_rows(out / "bench.jsonl")
    rows += load_train_rows(train_rows, skip={r["workload"] for r in rows})
    base = DeviceProfile(prof.name, prof.kind, prof.peak_flops, prof.mem_bandwidth,
                         prof.kernel_overhead, prof.provenance)
    by_model = {r["model"]: r["workload"] for r in rows if r["type"] == "step"}
    click.echo("whole step (model held out): measured (2nd pass vs 1st) | kernel-sum pred | "
               "op-sum pred (learned) | op-sum roofline  [ms]")
    results = {"accuracy": acc, "sets": sets, "steps": {}, "decisions": {}}
    for name, path in paths.items():
        mname = next((m for m in by_model if m.startswith(name)), None)
        if mname is None:
            continue
        w = by_model[mname]
        held = [r for r in rows if r["model"] != mname]
        with fit_jobs(jobs):  # op costs: plain features only
            learned = fit_learned(held, base, (prof.learned["regressor"]["kind"],),
                                  heldout=False, sched=False)
        lp = dataclasses.replace(base, learned=learned)
        step = next(r for r in rows if r["type"] == "step" and r["workload"] == w)
        kern = [r for r in rows if r["type"] == "kernel" and r["workload"] == w]
        ksum = prof.learned["steps"].get(w, {}).get(prof.learned["kernel_regressor_name"])
        mod, info = load_onnx(path)
        lm = LearnedModel(lp)
        g = annotate_costs(mod, lm, lm, name=info.name, buffers=info.buffers)
        opsum = sum(op.device.training for op in g.ops) + g.loss_server.training
        rm = RooflineModel(base)
        gr = annotate_costs(mod, rm, rm, name=info.name, buffers=info.buffers)
        roofsum = sum(op.device.training for op in gr.ops) + gr.loss_server.training
        meas = step["seconds"]
        # the two timing passes against each other (meas is the smaller of the two)
        nan = float("nan")
        again = step.get("seconds_again", nan) / step.get("seconds_first", nan) - 1
        click.echo(f"  {name:18s} {meas * 1e3:8.3f} ({again * 100:+5.1f}%) | "
                   f"{ksum * 1e3 if ksum else float('nan'):8.3f}"
                   f" ({(ksum / meas - 1) * 100 if ksum else float('nan'):+6.1f}%) | "
                   f"{opsum * 1e3:8.3f} ({(opsum / meas - 1) * 100:+6.1f}%) | "
                   f"{roofsum * 1e3:8.3f} ({(roofsum / meas - 1) * 100:+6.1f}%)  {lm.name}")
        results["steps"][name] = {"measured": meas, "second_pass_vs_first": again,
                                  "kernel_sum": ksum, "op_sum": opsum, "roofline_op_sum": roofsum}
        # per binding where calibration traced the kernels (rows with "sites"), else by bucket
        sites = row_sites(kern)
        measured_ops = attribute([(op.name, op.features) for op in g.ops
                                  if op.features is not None], kern, step["seconds"], base,
                                 sites=sites or None)
        if sites:  # the planner's op costs against the measured ones, op by op
            errs = [op.device.training / measured_ops[op.name].training - 1 for op in g.ops
                    if op.name in measured_ops and measured_ops[op.name].training > 0]
            within = {f"within_{p}pct": sum(abs(e) <= p / 100 for e in errs) / len(errs)
                      for p in (10, 25)}
            results.setdefault("ops", {})[name] = {"ops": len(errs), **within}
            click.echo(f"      planner op costs vs measured per binding: "
                       f"{within['within_10pct']:.0%} within 10%, "
                       f"{within['within_25pct']:.0%} within 25% ({len(errs)} ops)")
        gm = _with_costs(g, measured_ops)
        # the planner's costs for this profile (splitc plan --op-costs auto = step): the
        # held-out kernel predictions of the compiled step, attributed as the measured ones
        kt = prof.learned["steps"].get(w, {}).get("kernel_times", {})
        kt = kt.get(prof.learned["kernel_regressor_name"])
        preds = {"op-level": {op.name: op.device for op in g.ops}}
        if sites and kt and ksum:
            preds["step"] = op_costs_from_kernels(
                [(op.name, op.features) for op in g.ops if op.features is not None], kern,
                [kt[kernel_id(r)] for r in kern], ksum, base)
        primary = "step" if "step" in preds else "op-level"
        for how, costs in preds.items():
            dec = _decisions(gm, _with_costs(g, costs), Link, solve, evaluate)
            key = "decisions" if how == primary else "decisions_op_level"
            results.setdefault(key, {})[name] = dec
            click.echo(f"      decision gap ({how} costs): " + ", ".join(
                f"{r} {d['gap_pct']:.2f}% (dev ops {d['device_ops_pred']}/"
                f"{d['device_ops_best']})" for r, d in dec.items()))
    if step_processes:  # the step's time moves with the process that times it (session 14)
        from splitc.tools.time_steps import summarize, time_fresh

        runs = time_fresh(list(paths.values()), step_processes, target, log)
        results["steps_fresh"] = summarize(runs, results["steps"])
        click.echo(f"whole step, median of {step_processes} fresh processes: kernel-sum pred | "
                   "op-sum pred (learned)  [ms]")
        for line in _fresh_lines(results["steps_fresh"]):
            click.echo(line)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    click.echo(f"wrote {out / 'results.json'} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
