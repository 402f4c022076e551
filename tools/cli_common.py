"""Shared pieces of the `splitc` commands: pure option parsers, the plan options, error
mapping to exit codes, and the progress renderers. No command lives here."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click
from splitc import SplitcError

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
        click.option("--op-costs", "op_costs", type=click.Choice(["auto", "step", "ops"]),
                     default="auto", show_default=True,
                     help="learned CPU profiles: price ops from the compiled training step "
                          "(step; auto: where a profile allows, for training) or each op "
                          "alone (ops)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _plan_config(model, device, server, uplink, downlink, latency, batch_size, input_shapes,
                 objective, algorithm, pins, engine, loss, tied_policy, optimizer, recompute,
                 op_costs="auto", baselines=True):
    from splitc.passes.pipeline import PlanConfig

    return PlanConfig(
        model=model, device=device, server=server, uplink=uplink, downlink=downlink,
        latency=latency, batch_size=batch_size, input_shapes=parse_input_shapes(input_shapes),
        objective=objective, algorithm=algorithm, pins=parse_pins(pins), engine=engine,
        loss=loss, tied_policy=tied_policy, optimizer=optimizer, recompute=recompute,
        op_costs=op_costs,
        baselines=baselines,
    )


class _Bar:
    """One-line progress on stderr: step, loss, step time and bytes on the link."""

    def __init__(self, quiet: bool):
        self.quiet, self.last = quiet, 0.0

    def __call__(self, p) -> None:
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
