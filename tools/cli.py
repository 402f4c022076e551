"""`splitc`: the command line, tvmc-style. Thin: parse, build a config, call one library function.

Exit codes come from the error hierarchy in ``splitc/__init__.py`` (2 bad input, 3 unsupported,
4 plan, 5 build, 6 package, 7 transport); click's own usage errors exit 2 as well.
Shared option parsers live in ``cli_common.py``; serve/train/demo/keygen in ``cli_runtime.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from splitc import __version__
from splitc.tools import cli_runtime
from splitc.tools.cli_common import (  # noqa: F401  (parsers re-exported for library users)
    ALGORITHMS,
    _errors,
    _plan_config,
    _progress,
    parse_input_shapes,
    parse_pins,
    plan_options,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="splitc")
def cli():
    """splitc: compile a model for split learning between an edge device and a server."""


@cli.command()
@plan_options
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="write plan + baselines + annotated graph (schema: README); '-' for stdout")
@click.option("--dot", "dot_path", type=click.Path(path_type=Path), default=None,
              help="write the graph with the cut coloured, for Graphviz")
@click.option("--no-baselines", is_flag=True, help="solve only --algorithm")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def plan(json_path, dot_path, no_baselines, quiet, **kw):
    """Find the cut that minimises the per-step delay, and compare it with the baselines."""
    from splitc.passes.pipeline import plan_model
    from splitc.tools import report

    res = plan_model(_plan_config(baselines=not no_baselines, **kw), progress=_progress(quiet))
    if json_path is not None:
        doc = json.dumps(report.plan_report_json(res.plan, res.graph, res.comparison), indent=1)
        if str(json_path) == "-":
            click.echo(doc)
            return
        json_path.write_text(doc)
    if dot_path is not None:
        dot_path.write_text(report.plan_dot(res.plan, res.graph))
    click.echo(report.plan_table(res.plan, res.graph))
    if len(res.comparison) > 1:
        click.echo("")
        click.echo(report.comparison_table(res.plan, res.comparison))


@cli.command()
@plan_options
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("split.tar"),
              show_default=True)
@click.option("--device-target", default="llvm", show_default=True,
              help="host (this CPU), llvm (generic CPU), a Jetson tag (nvidia/jetson-orin-nano) "
              "or 'cuda -arch=sm_87'")
@click.option("--server-target", default="llvm", show_default=True,
              help="as --device-target; host is ~3.6x faster than generic llvm on AVX-512")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01,
              show_default=True)
@click.option("--cross-compiler", default=None, help="e.g. aarch64-linux-gnu-g++")
@click.option("--tuning-records", type=click.Path(path_type=Path), default=None,
              help="a `splitc tune` database; untuned kernels keep the default schedules")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def compile(output, device_target, server_target, lr, cross_compiler, tuning_records, as_json,
            quiet, **kw):
    """Plan, split and compile both halves into split.tar."""
    from splitc.passes.pipeline import CompileConfig, compile_model

    pcfg = _plan_config(baselines=False, **kw)
    cfg = CompileConfig(plan=pcfg, output=output,
                        device_target=device_target, server_target=server_target,
                        lr=lr, cross_compiler=cross_compiler, tuning_records=tuning_records)
    summary = compile_model(cfg, progress=_progress(quiet))
    if as_json:
        click.echo(json.dumps(summary, indent=1, default=str))
    else:
        click.echo(f"wrote {output} (plan {summary.get('plan_id', '?')})")
        for side, info in summary.get("sides", {}).items():
            n = info.get("fallback_kernels", 0)
            if n and not quiet:
                click.echo(f"note: {n} {side} kernels not fully scheduled (correct, slower); "
                           "plan.json schedules.fallbacks says which and why", err=True)


BENCHES = ("partition", "compile", "transport", "vs_pytorch", "tuned", "cost_model", "gpu")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                              "help_option_names": []})
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@_errors
def bench(ctx, name, args):
    """Run a benchmark from tools/ (`splitc bench NAME --help` for its options).

    \b
    partition   solver build+solve time per engine/reduction; delay per algorithm and link
    compile     compile time per side and artifact sizes
    transport   throughput vs raw socket; per-step overhead; measured vs predicted step
    vs_pytorch  compiled training step vs PyTorch eager on this CPU
    tuned       knob-tuned vs default-scheduled step vs PyTorch eager, tuning time
    cost_model  learned vs roofline cost model accuracy on held-out models
    gpu         compiled CUDA training step vs PyTorch on the same GPU (build here, run there)
    """
    import importlib

    if name in (None, "--help", "-h"):  # this command's own help
        click.echo(ctx.get_help())
        return
    if name not in BENCHES:
        raise click.BadParameter(f"{name!r} is not one of {', '.join(BENCHES)}",
                                 param_hint="NAME")
    try:
        main_fn = importlib.import_module(f"splitc.tools.bench_{name}").main
    except ModuleNotFoundError as e:
        raise click.ClickException(f"benchmark {name!r} needs {e.name}") from None
    if isinstance(main_fn, click.Command):
        main_fn.main(args=list(args), prog_name=f"splitc bench {name}")
    else:
        sys.exit(main_fn(list(args)) or 0)


@cli.command()
@click.option("--target", default="llvm", show_default=True,
              help="an llvm target: host (this CPU), llvm, or llvm with -mcpu/-mtriple (a board)")
@click.option("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker (trusted "
              "network only: TVM RPC has no authentication)")
@click.option("--rpc-key", default=None, help="device key registered with the tracker")
@click.option("--models", "models", multiple=True, type=click.Path(path_type=Path),
              help="ONNX models to time (default: the bundled ones); repeatable")
@click.option("--batch-size", "batch_sizes", multiple=True, type=click.IntRange(min=1))
@click.option("--repeats", type=click.IntRange(min=1), default=30, show_default=True,
              help="timings per kernel (each >= 1 ms); the minimum is kept")
@click.option("--tuning-records", type=click.Path(path_type=Path), default=None,
              help="a `splitc tune` directory: time the kernels as tuned (the profile says so)")
@click.option("--synthetic", type=click.IntRange(min=0), default=0, show_default=True,
              help="also time N random small models as training data (needs torch; 40 "
              "doubled the held-out share within 10%)")
@click.option("--synthetic-large", type=click.IntRange(min=0), default=0, show_default=True,
              help="also time N random realistic-size models as training data (needs torch; "
              "lets the fit reach kernels larger than the small models)")
@click.option("--family-sweep", type=click.IntRange(min=0), default=0, show_default=True,
              help="also time the kernels of N random one-block models per kernel family "
              "(conv, depthwise, dense, attention, pooling) as training data (needs torch)")
@click.option("--train-rows", "train_rows", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="an earlier calibration's .jsonl whose training-only rows (sweep, "
              "synthetic and family models) join the fit without re-timing; repeatable")
@click.option("--recheck", is_flag=True, help="time each tested model twice: the rows keep "
              "both timings (the noise floor of the fit) and the smaller")
@click.option("--roofline-from", default="local-cpu", show_default=True,
              help="take the roofline constants (peak, bandwidth, per-call overhead) from this "
              "profile (a name or .json) instead of measuring this CPU now: they are the "
              "fallback for unseen kernels and normalise the learned model's features, so a "
              "board's own profile belongs here with --rpc-tracker, and pinning them refits "
              "the same rows to the same model (re-measured, they move the fit by up to 2 "
              "points of held-out kernels)")
@click.option("--no-sweep", is_flag=True, help="skip the single-op shape sweep")
@click.option("--in-process", is_flag=True, help="time every workload in this process, not "
              "each in a fresh one (a long-lived timing process drifted 5-18% slow here)")
@click.option("--no-resume", is_flag=True, help="re-measure rows already in the dataset")
@click.option("--no-fit", is_flag=True, help="time and save the rows only; the same "
              "command without --no-fit then fits them without timing anything again")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="worker processes for the fit, after the timing (default: one per CPU "
              "this process may use; the same trees either way)")
@click.option("--name", default=None, help="profile name (default: the output file's stem)")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="profile JSON to write; the dataset goes next to it as .jsonl")
@click.option("--json", "as_json", is_flag=True,
              help="print a JSON summary (profile, dataset, provenance, held-out accuracy)")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def calibrate(target, rpc_tracker, rpc_key, models, batch_sizes, repeats, tuning_records,
              synthetic, synthetic_large, family_sweep, train_rows, recheck, roofline_from,
              no_sweep, in_process, no_resume, no_fit, jobs, name, output, as_json, quiet):
    """Time compiled kernels (locally or over TVM RPC) and fit a learned cost model."""
    from splitc.cost_models.calibrate import CalibrateConfig
    from splitc.cost_models.calibrate import calibrate as run
    from splitc.cost_models.profiles import LOCAL_CPU, load_profile

    if bool(rpc_tracker) != bool(rpc_key):
        raise click.BadParameter("--rpc-tracker and --rpc-key go together",
                                 param_hint="--rpc-key")
    if roofline_from != LOCAL_CPU:  # a bad name or file fails now, not after the timing
        load_profile(roofline_from)
    cfg = CalibrateConfig(target=target, output=output, rpc_tracker=rpc_tracker,
                          rpc_key=rpc_key, models=tuple(models), batch_sizes=tuple(batch_sizes),
                          repeats=repeats, sweep=not no_sweep, resume=not no_resume, name=name,
                          tuning_records=tuning_records, synthetic=synthetic,
                          synthetic_large=synthetic_large, family_sweep=family_sweep,
                          train_rows=tuple(train_rows), recheck=recheck,
                          fresh_processes=not in_process, base_profile=roofline_from,
                          jobs=jobs, fit=not no_fit, progress=_progress(quiet))
    path = run(cfg)
    if no_fit:
        if as_json:
            click.echo(json.dumps({"profile": None, "dataset": str(path)}, indent=1))
        else:
            click.echo(f"timed into {path}; run again without --no-fit to fit the profile")
        return
    if as_json:
        p = load_profile(path)
        click.echo(json.dumps({"profile": str(path), "dataset": str(cfg.dataset_path),
                                "name": p.name, "provenance": p.provenance,
                                "accuracy": _accuracy_summary(p.learned)}, indent=1))
        return
    click.echo(f"wrote {path}; use it with `splitc plan --device {path}`")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--target", default=None,
              help="default: each half's target from split.tar, or llvm for an ONNX model")
@click.option("--strategy", type=click.Choice(["knobs", "metaschedule"]), default="knobs",
              show_default=True, help="knobs: search the default schedules' tile choices "
              "of the heaviest kernels (llvm; never slower than untuned); metaschedule: TVM's "
              "MetaSchedule search (any target, ~5 s a trial here)")
@click.option("--trials", type=click.IntRange(min=1), default=1000, show_default=True,
              help="trial budget per half")
@click.option("--kernels", "max_kernels", type=click.IntRange(min=1), default=12,
              show_default=True, help="knobs: tune the heaviest N kernels of each half")
@click.option("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker (trusted "
              "network only: TVM RPC has no authentication)")
@click.option("--rpc-key", default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--input-shapes", default=None)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="database directory (resumed when it exists)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def tune(source, target, strategy, trials, max_kernels, rpc_tracker, rpc_key, batch_size,
         input_shapes, output, as_json, quiet):
    """Tune the kernels of both halves of SOURCE (split.tar or MODEL.onnx)."""
    from splitc.passes.tune import TuneConfig
    from splitc.passes.tune import tune as run

    if bool(rpc_tracker) != bool(rpc_key):
        raise click.BadParameter("--rpc-tracker and --rpc-key go together",
                                 param_hint="--rpc-key")
    res = run(TuneConfig(source=source, output=output, target=target, trials=trials,
                         strategy=strategy, max_kernels=max_kernels, rpc_tracker=rpc_tracker,
                         rpc_key=rpc_key, batch_size=batch_size,
                         input_shapes=parse_input_shapes(input_shapes),
                         progress=_progress(quiet)))
    summary = {"database": str(res.database), "strategy": strategy, "seconds": res.seconds,
               "trials_run": res.trials_run, "tasks": len(res.tasks),
               "tasks_skipped": sum(t.skipped for t in res.tasks)}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(f"tuned {summary['tasks']} kernels ({summary['trials_run']} trials, "
                   f"{res.seconds:.0f} s) into {res.database}; apply with "
                   f"`splitc compile ... --tuning-records {res.database}`")


def _accuracy_summary(learned: dict) -> dict | None:
    """The held-out figures of a calibrated profile: its chosen kernel model and the roofline
    prior, share within +-10 % (a fraction) and MAPE (in %); ``learned.accuracy`` holds every
    candidate and group."""
    acc = (learned or {}).get("accuracy")
    if not acc:
        return None
    chosen = learned.get("kernel_regressor_name") or learned.get("regressor_name")
    out = {"kernels": acc.get("kernels"), "models": len(acc.get("models", [])),
           "chosen": chosen}
    for key in (chosen, "roofline"):
        if isinstance(acc.get(key), dict):
            out[key] = {k: acc[key].get(k) for k in ("within_10pct", "mape_pct")}
    from splitc.cost_models.fit import noise_warning

    if isinstance(acc.get("repeat"), dict):  # calibrated with --recheck: the noise floor
        out["repeat_within_10pct"] = acc["repeat"].get("within_10pct")
    if warn := noise_warning(acc):
        out["warning"] = warn
    return out


@cli.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print a JSON list instead of a table")
@_errors
def profiles(files, as_json):
    """List device profiles (the bundled ones, local-cpu and any profile FILES written by
    `splitc calibrate -o`) with their provenance and, when calibrated, held-out accuracy."""
    from splitc.cost_models.profiles import list_profiles, load_profile

    rows = []
    for name in [*list_profiles(), *files]:
        p = load_profile(name)
        acc = _accuracy_summary(p.learned)
        rows.append({"name": name, "kind": p.kind, "peak_flops": dict(p.peak_flops),
                     "mem_bandwidth": p.mem_bandwidth, "kernel_overhead": p.kernel_overhead,
                     "learned": bool(p.learned), "accuracy": acc,
                     "op_costs": _op_costs(p), "provenance": dict(p.provenance or {})})
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        prov, acc = r["provenance"], r["accuracy"]
        line = (f"{r['name']:<20} {r['kind']:<4} {r['peak_flops']['float32'] / 1e9:10.1f} "
                f"GFLOP/s (fp32) {r['mem_bandwidth'] / 1e9:8.1f} GB/s  "
                f"{prov.get('status', '?'):<10} {prov.get('source', '')}")
        if acc and isinstance(acc.get(acc["chosen"]), dict):
            line += "  " + _accuracy_line(acc)
        if r["op_costs"] == "step":
            line += "  op costs from the compiled step"
        if acc and acc.get("warning"):
            line += f"  WARNING: {acc['warning']}"
        click.echo(line)


def _op_costs(p) -> str:
    """How `splitc plan --op-costs auto` prices a training plan's ops on profile ``p``:
    ``step`` (from the compiled training step, ``cost_models/step_costs.py``) or ``ops``."""
    from splitc import SplitcError
    from splitc.cost_models.learned import LearnedModel
    from splitc.cost_models.step_costs import step_target

    if not p.learned:
        return "ops"
    try:
        return "step" if step_target(LearnedModel(p)) else "ops"
    except SplitcError:  # a profile of another version: plan says so when it is used
        return "ops"


def _accuracy_line(acc: dict) -> str:
    """The chosen regressor's held-out accuracy as ``splitc profiles`` prints it: the count,
    so that 485 of 539 (89.98 %) never reads as 90 %."""
    c, n = acc[acc["chosen"]], acc["kernels"]
    return (f"held-out {round(c['within_10pct'] * n)} of {n} kernels "
            f"({100 * c['within_10pct']:.2f}%) within 10% ({acc['chosen']}, "
            f"MAPE {c['mape_pct']:.1f}%)")


for _cmd in (cli_runtime.serve, cli_runtime.train, cli_runtime.demo, cli_runtime.keygen):
    cli.add_command(_cmd)


def main(argv=None):
    cli.main(args=argv, prog_name="splitc")


if __name__ == "__main__":
    main()
