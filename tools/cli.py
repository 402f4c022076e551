"""`splitc`: the command line, tvmc-style. Thin: parse, build a config, call one library function.

Exit codes come from the error hierarchy in ``splitc/__init__.py`` (2 bad input, 3 unsupported,
4 plan, 5 build, 6 package, 7 transport); click's own usage errors exit 2 as well.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from splitc import SplitcError, __version__

ALGORITHMS = ("mincut", "blockwise", "layerwise", "device-only", "server-only", "exhaustive")


# -- pure parsers (raise click.BadParameter) -----------------------------------------------
def parse_pins(values: tuple[str, ...]) -> dict[str, str]:
    pins = {}
    for v in values:
        name, sep, side = v.rpartition("=")
        if not sep or not name or side not in ("device", "server"):
            raise click.BadParameter(f"{v!r}: expected OP=device or OP=server", param_hint="--pin")
        pins[name] = side
    return pins


def parse_input_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """tvmc syntax: ``"x:[8,3,224,224],mask:[8,128]"`` (the frontend's parser)."""
    from splitc.passes.frontend import parse_input_shapes as parse

    try:
        return parse(text)
    except SplitcError as e:
        raise click.BadParameter(str(e), param_hint="--input-shapes") from None


def _errors(fn):
    """Map the error hierarchy to one-line messages and exit codes (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SplitcError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _progress(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: click.echo(f"[splitc] {msg}", err=True))


def plan_options(fn):
    opts = [
        click.argument("model", type=click.Path(path_type=Path)),
        click.option("--device", "device", default="local-cpu", show_default=True,
                     help="device profile name or JSON path (see `splitc profiles`)"),
        click.option("--server", "server", default="local-cpu", show_default=True,
                     help="server profile name or JSON path"),
        click.option("--uplink", default="100Mbps", show_default=True),
        click.option("--downlink", default=None, help="defaults to --uplink"),
        click.option("--latency", default="0", show_default=True, help="per message, e.g. 5ms"),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="fills a symbolic leading dim of the inputs"),
        click.option("--input-shapes", default=None, help="e.g. 'x:[8,3,224,224]'"),
        click.option("--objective", type=click.Choice(["training", "inference"]),
                     default="training", show_default=True),
        click.option("--algorithm", type=click.Choice(ALGORITHMS), default="mincut",
                     show_default=True),
        click.option("--pin", "pins", multiple=True, help="OP=device|server (name or glob)"),
        click.option("--engine", type=click.Choice(["ortools", "networkx"]), default="ortools",
                     show_default=True),
        click.option("--loss", type=click.Choice(["cross-entropy", "mse", "none"]),
                     default="cross-entropy", show_default=True),
        click.option("--tied-weights", "tied_policy", type=click.Choice(["sync", "pin"]),
                     default="sync", show_default=True,
                     help="weights read on both sides: sync per step, or pin readers together"),
        click.option("--optimizer", type=click.Choice(["sgd", "momentum", "adam"]),
                     default="sgd", show_default=True, help="priced per op (state traffic)"),
        click.option("--recompute", is_flag=True,
                     help="device backward recomputes the forward instead of keeping "
                          "residuals (less device memory; the device forward is paid twice)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _plan_config(model, device, server, uplink, downlink, latency, batch_size, input_shapes,
                 objective, algorithm, pins, engine, loss, tied_policy, optimizer, recompute,
                 baselines=True):
    from splitc.passes.pipeline import PlanConfig

    return PlanConfig(
        model=model, device=device, server=server, uplink=uplink, downlink=downlink,
        latency=latency, batch_size=batch_size, input_shapes=parse_input_shapes(input_shapes),
        objective=objective, algorithm=algorithm, pins=parse_pins(pins), engine=engine,
        loss=loss, tied_policy=tied_policy, optimizer=optimizer, recompute=recompute,
        baselines=baselines,
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
              help="llvm, a Jetson tag (nvidia/jetson-orin-nano) or 'cuda -arch=sm_87'")
@click.option("--server-target", default="llvm", show_default=True)
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


class _Bar:
    """One-line progress on stderr: step, loss, step time and bytes on the link."""

    def __init__(self, quiet: bool):
        self.quiet, self.last = quiet, 0.0

    def __call__(self, p) -> None:
        import time

        now = time.monotonic()
        if self.quiet or (now - self.last < 0.2 and p.step < p.total):
            return
        self.last = now
        width = 24
        done = int(width * p.step / max(p.total, 1))
        click.echo(f"\r[{'#' * done}{'.' * (width - done)}] {p.step}/{p.total} "
                   f"loss {p.loss:.4f}  step {p.time.total_s * 1e3:6.1f} ms  "
                   f"up {p.bytes_up / 1e6:.2f} MB  down {p.bytes_down / 1e6:.2f} MB",
                   err=True, nl=p.step >= p.total)


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--listen", default="127.0.0.1:5555", show_default=True)
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None)
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--resume", is_flag=True, help="continue from the last checkpoint")
@click.option("--max-steps", type=click.IntRange(min=1), default=None)
@click.option("--fedavg-every", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--server-key", type=click.Path(path_type=Path), default=None,
              help="CurveZMQ: this server's NAME.key_secret (encrypts and authenticates)")
@click.option("--allow-key", "allow_keys", type=click.Path(path_type=Path), multiple=True,
              help="CurveZMQ: a device public key file (NAME.key) to admit; repeatable")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def serve(package, listen, checkpoint_dir, checkpoint_every, resume, max_steps, fedavg_every,
          allow_keys, server_key, quiet):
    """Serve the server half of PACKAGE (split.tar) to device agents."""
    from splitc.runtime.security import CurveServer
    from splitc.runtime.server_agent import ServerAgent
    from splitc.runtime.tvm_halves import load_server_half

    if allow_keys and not server_key:
        raise click.BadParameter("--allow-key needs --server-key", param_hint="--allow-key")
    curve = CurveServer.from_files(server_key, allow_keys) if server_key else None
    say = _progress(quiet)
    agent = ServerAgent(load_server_half(package), listen, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume, allow_keys=curve,
                        max_steps=max_steps, fedavg_every=fedavg_every,
                        on_event=lambda e: say(str(e)))
    import signal

    # SIGTERM/SIGINT end the loop cleanly: the server checkpoints before it exits.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop_event.set())
    say(f"serving plan {agent.plan_id} on {agent.address}")
    result = agent.run()
    say(f"stopped after {result.steps_applied} steps")


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--connect", default="127.0.0.1:5555", show_default=True)
@click.option("--data", default="digits", show_default=True,
              help="'digits' (bundled) or an .npz with x, y[, x_test, y_test]")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="must equal the compiled batch (default: read from the package)")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None)
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--resume", is_flag=True)
@click.option("--codec", default="none", show_default=True,
              help="none | fp16 | int8 | topk:0.1 | zstd | lz4")
@click.option("--link-rate", default=None, help="emulate a link, e.g. 100Mbps")
@click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--fedavg-every", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--key", type=click.Path(path_type=Path), default=None,
              help="CurveZMQ: this device's NAME.key_secret")
@click.option("--server-public-key", type=click.Path(path_type=Path), default=None,
              help="CurveZMQ: the server's NAME.key")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def train(package, connect, data, epochs, batch_size, checkpoint_dir, checkpoint_every, resume,
          codec, link_rate, device_id, fedavg_every, key, server_public_key, as_json, quiet):
    """Train the device half of PACKAGE against a running `splitc serve`."""
    from splitc.cost_models.link import parse_rate
    from splitc.runtime.data import DataLoader
    from splitc.runtime.device_agent import evaluate
    from splitc.runtime.device_agent import train as train_device
    from splitc.runtime.tvm_halves import load_device_half
    from splitc.tools.session import load_data

    from splitc.runtime.security import CurveClient

    if bool(key) != bool(server_public_key):
        raise click.BadParameter("--key and --server-public-key go together", param_hint="--key")
    curve = CurveClient.from_files(key, server_public_key) if key else None
    half = load_device_half(package)
    compiled = int(half.manifest["inputs"][0]["shape"][0])
    if batch_size not in (None, compiled):
        raise click.BadParameter(f"the package was compiled for batch {compiled}",
                                 param_hint="--batch-size")
    bs = compiled
    x, y, xt, yt = load_data(data)
    res = train_device(half, connect, DataLoader(x, y, bs, seed=device_id), epochs=epochs,
                       device_id=device_id, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=checkpoint_every, resume=resume, codec=codec,
                       link_rate=parse_rate(link_rate) if link_rate else None,
                       fedavg_every=fedavg_every, curve=curve, on_progress=_Bar(quiet))
    summary = {"steps": len(res.losses), "final_loss": res.losses[-1] if res.losses else None,
               "bytes_up": res.bytes_up, "bytes_down": res.bytes_down, "codec": res.codec}
    if xt is not None and yt is not None:
        summary["test_accuracy"] = evaluate(half, connect, xt, yt, batch_size=bs,
                                            device_id=device_id, curve=curve)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo("  ".join(f"{k} {v}" for k, v in summary.items()))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("splitc-demo"),
              show_default=True, help="where split.tar is written")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--uplink", default="100Mbps", show_default=True)
@click.option("--device", default="local-cpu", show_default=True)
@click.option("--server", default="local-cpu", show_default=True)
@click.option("--pin", "pins", multiple=True, help="OP=device|server")
@click.option("--codec", default="none", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def demo(workdir, epochs, uplink, device, server, pins, codec, as_json, quiet):
    """Compile the bundled CNN, serve and train it over loopback on digits, report accuracy."""
    from splitc.tools import report
    from splitc.tools.session import DemoConfig, run_demo

    def show_plan(res):
        if not quiet:
            click.echo(report.plan_table(res.plan, res.graph), err=True)
            click.echo(report.comparison_table(res.plan, res.comparison), err=True)

    cfg = DemoConfig(workdir=workdir, epochs=epochs, uplink=uplink, device=device,
                     server=server, pins=tuple(parse_pins(pins).items()), codec=codec)
    out = run_demo(cfg, _progress(quiet), show_plan, _Bar(quiet))
    if as_json:
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(f"test accuracy {out['accuracy'] * 100:.2f}% on {out['test_samples']} held-out "
                   f"digits after {out['steps']} split-training steps "
                   f"({out['train_seconds']:.1f} s, {out['bytes_up'] / 1e6:.2f} MB up, "
                   f"{out['bytes_down'] / 1e6:.2f} MB down)")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("name")
@_errors
def keygen(directory, name):
    """Write a CurveZMQ keypair DIRECTORY/NAME.key (public) and NAME.key_secret."""
    from splitc.runtime.security import generate_keys

    pub, sec = generate_keys(directory, name)
    click.echo(f"public {pub}\nsecret {sec}")


BENCHES = ("partition", "compile", "transport", "vs_pytorch", "cost_model")


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
    cost_model  learned vs roofline cost model accuracy on held-out models
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
@click.option("--target", default="llvm", show_default=True, help="only llvm targets for now")
@click.option("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker (trusted "
              "network only: TVM RPC has no authentication)")
@click.option("--rpc-key", default=None, help="device key registered with the tracker")
@click.option("--models", "models", multiple=True, type=click.Path(path_type=Path),
              help="ONNX models to time (default: the bundled ones); repeatable")
@click.option("--batch-size", "batch_sizes", multiple=True, type=click.IntRange(min=1))
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--no-sweep", is_flag=True, help="skip the single-op shape sweep")
@click.option("--no-resume", is_flag=True, help="re-measure rows already in the dataset")
@click.option("--name", default=None, help="profile name (default: the output file's stem)")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="profile JSON to write; the dataset goes next to it as .jsonl")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def calibrate(target, rpc_tracker, rpc_key, models, batch_sizes, repeats, no_sweep, no_resume,
              name, output, quiet):
    """Time compiled kernels (locally or over TVM RPC) and fit a learned cost model."""
    from splitc.cost_models.calibrate import CalibrateConfig
    from splitc.cost_models.calibrate import calibrate as run

    if bool(rpc_tracker) != bool(rpc_key):
        raise click.BadParameter("--rpc-tracker and --rpc-key go together",
                                 param_hint="--rpc-key")
    cfg = CalibrateConfig(target=target, output=output, rpc_tracker=rpc_tracker,
                          rpc_key=rpc_key, models=tuple(models), batch_sizes=tuple(batch_sizes),
                          repeats=repeats, sweep=not no_sweep, resume=not no_resume, name=name,
                          progress=_progress(quiet))
    path = run(cfg)
    click.echo(f"wrote {path}; use it with `splitc plan --device {path}`")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--target", default=None,
              help="default: each half's target from split.tar, or llvm for an ONNX model")
@click.option("--trials", type=click.IntRange(min=1), default=1000, show_default=True,
              help="MetaSchedule trial budget per half")
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
def tune(source, target, trials, rpc_tracker, rpc_key, batch_size, input_shapes, output,
         as_json, quiet):
    """MetaSchedule-tune the kernels of both halves of SOURCE (split.tar or MODEL.onnx)."""
    from splitc.passes.tune import TuneConfig
    from splitc.passes.tune import tune as run

    if bool(rpc_tracker) != bool(rpc_key):
        raise click.BadParameter("--rpc-tracker and --rpc-key go together",
                                 param_hint="--rpc-key")
    res = run(TuneConfig(source=source, output=output, target=target, trials=trials,
                         rpc_tracker=rpc_tracker, rpc_key=rpc_key, batch_size=batch_size,
                         input_shapes=parse_input_shapes(input_shapes),
                         progress=_progress(quiet)))
    summary = {"database": str(res.database), "seconds": res.seconds,
               "trials_run": res.trials_run, "tasks": len(res.tasks),
               "tasks_skipped": sum(t.skipped for t in res.tasks)}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(f"tuned {summary['tasks']} kernels ({summary['trials_run']} trials, "
                   f"{res.seconds:.0f} s) into {res.database}; apply with "
                   f"`splitc compile ... --tuning-records {res.database}`")


@cli.command()
@_errors
def profiles():
    """List device profiles with their provenance and, when calibrated, accuracy."""
    from splitc.cost_models.profiles import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        prov = p.provenance or {}
        acc = (getattr(p, "learned", None) or {}).get("accuracy")
        click.echo(f"{name:<20} {p.kind:<4} {p.peak('float32') / 1e9:10.1f} GFLOP/s (fp32) "
                   f"{p.mem_bandwidth / 1e9:8.1f} GB/s  {prov.get('status', '?'):<10} "
                   f"{prov.get('source', '')}" + (f"  accuracy {acc}" if acc else ""))


def main(argv=None):
    cli.main(args=argv, prog_name="splitc")


if __name__ == "__main__":
    main()
