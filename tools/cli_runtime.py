"""`splitc serve | train | demo | keygen`: the runtime side of the CLI (registered in cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from splitc.tools.cli_common import _Bar, _errors, _progress, parse_pins


@click.command()
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


@click.command()
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
    from splitc.runtime.security import CurveClient
    from splitc.runtime.tvm_halves import load_device_half
    from splitc.tools.session import load_data

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


@click.command()
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


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("name")
@_errors
def keygen(directory, name):
    """Write a CurveZMQ keypair DIRECTORY/NAME.key (public) and NAME.key_secret."""
    from splitc.runtime.security import generate_keys

    pub, sec = generate_keys(directory, name)
    click.echo(f"public {pub}\nsecret {sec}")
