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
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _plan_config(model, device, server, uplink, downlink, latency, batch_size, input_shapes,
                 objective, algorithm, pins, engine, loss, tied_policy, baselines=True):
    from splitc.passes.pipeline import PlanConfig

    return PlanConfig(
        model=model, device=device, server=server, uplink=uplink, downlink=downlink,
        latency=latency, batch_size=batch_size, input_shapes=parse_input_shapes(input_shapes),
        objective=objective, algorithm=algorithm, pins=parse_pins(pins), engine=engine,
        loss=loss, tied_policy=tied_policy, baselines=baselines,
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
@click.option("--optimizer", type=click.Choice(["sgd", "momentum", "adam"]), default="sgd",
              show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01,
              show_default=True)
@click.option("--recompute", is_flag=True, help="recompute the device forward in backward")
@click.option("--cross-compiler", default=None, help="e.g. aarch64-linux-gnu-g++")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout")
@click.option("-q", "--quiet", is_flag=True)
@_errors
def compile(output, device_target, server_target, optimizer, lr, recompute, cross_compiler,
            as_json, quiet, **kw):
    """Plan, split and compile both halves into split.tar."""
    from splitc.passes.pipeline import CompileConfig, compile_model

    cfg = CompileConfig(plan=_plan_config(baselines=False, **kw), output=output,
                        device_target=device_target, server_target=server_target,
                        optimizer=optimizer, lr=lr, recompute=recompute,
                        cross_compiler=cross_compiler)
    summary = compile_model(cfg, progress=_progress(quiet))
    if as_json:
        click.echo(json.dumps(summary, indent=1, default=str))
    else:
        click.echo(f"wrote {output} (plan {summary.get('plan_id', '?')})")


@cli.command()
@_errors
def profiles():
    """List device profiles with their provenance."""
    from splitc.cost_models.profiles import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        prov = p.provenance or {}
        click.echo(f"{name:<20} {p.kind:<4} {p.peak_flops / 1e9:10.1f} GFLOP/s "
                   f"{p.mem_bandwidth / 1e9:8.1f} GB/s  {prov.get('status', '?'):<10} "
                   f"{prov.get('source', '')}")


def main(argv=None):
    cli.main(args=argv, prog_name="splitc")


if __name__ == "__main__":
    main()
