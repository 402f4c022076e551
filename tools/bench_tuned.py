"""Benchmark: a knob-tuned training step against the default schedules and PyTorch eager.

For each model of ``tools/bench_models.py``: the unsplit training step (forward, loss,
backward, SGD) built as ``tools/bench_vs_pytorch.py`` builds it, its kernels tuned with
``splitc tune``'s knob strategy (``passes/tune_knobs.py``, records in ``--out``), then the
default-scheduled and the tuned step timed in alternation (same process, medians), after
PyTorch eager: at 1 thread in the same alternation (so all three see the same machine load),
at more threads first (TVM's idle pool threads slow PyTorch's OpenMP threads).

    python -m splitc.tools.bench_tuned --models small_resnet,encoder --threads 1 --out /tmp/knobs
"""

from __future__ import annotations

import os
import statistics
import time

import click


def _vm_step(ex, params, opt_state, x, y):
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    xs, ys = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(y, dev)
    ps = [tvm.runtime.tensor(p, dev) for p in params]
    state = [tvm.runtime.tensor(s, dev) for s in opt_state]
    losses: list[float] = []

    def step():
        out = vm["backbone_loss_adjoint"](xs, *ps, ys)
        vm["optimizer"](tuple(ps), out[1], tuple(state))
        loss = out[0]
        losses.append(float((loss if isinstance(loss, tvm.runtime.Tensor) else loss[0]).numpy()))

    return step, losses


def _torch_step(model, x, y):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _alternate(fns, repeats: int) -> list[float]:
    for f in fns:
        f()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@click.command()
@click.option("--models", default="small_resnet,encoder,gpt2_block_b8", show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--kernels", default=12, show_default=True, help="tune the heaviest N kernels")
@click.option("--trials", default=200, show_default=True, help="candidate budget per model")
@click.option("--out", type=click.Path(), default="/tmp/splitc-knobs", show_default=True,
              help="knob records, one sub-directory per model (resumed)")
@click.option("--image", default=224, show_default=True, help="ResNet-50 input size")
def main(models, repeats, threads, kernels, trials, out, image):
    """Print a markdown table: default schedules, knob-tuned, PyTorch eager."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    from pathlib import Path

    import torch
    import tvm
    from splitc.cost_models.rpc import Runner
    from splitc.passes.build import lower_side
    from splitc.passes.schedules import default_cpu_schedule
    from splitc.passes.targets import host_target
    from splitc.passes.tune_knobs import knob_lookup, load_knobs, tune_side_knobs
    from splitc.tools.bench_vs_pytorch import make_case, torch_times

    torch.set_num_threads(threads)
    tgt = host_target()
    cases = []
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        model, _, x, y, mod, params, opt_state = make_case(name, image)
        pt_train = torch_times(model, x, y, repeats)[0] if threads > 1 else None
        cases.append((name, mod, params, opt_state, x, y, model, pt_train))
    rows = []
    for name, mod, params, opt_state, x, y, model, pt_train in cases:
        xn, yn = x.numpy(), y.numpy().astype("int64")
        db = Path(out) / name
        # the kernels default_cpu_schedule builds (all of build.rewrite_for_cpu's rewrites), so
        # the records, keyed by kernel structure, match them
        low = lower_side(mod, tgt)
        runner = Runner("llvm")
        t0 = time.perf_counter()
        tune_side_knobs(
            "unsplit", low, tgt, runner, db, max_kernels=kernels, trials=trials,
            say=lambda m, name=name: click.echo(f"  {name}: {m}", err=True),
            functions=lambda n: True,
        )
        tune_s = time.perf_counter() - t0
        runner.close()
        lookup = knob_lookup(db)
        ex_default = tvm.compile(default_cpu_schedule(mod, tgt), tgt)
        ex_tuned = tvm.compile(default_cpu_schedule(mod, tgt, tile_knobs=lookup), tgt)
        s_default, l_default = _vm_step(ex_default, params, opt_state, xn, yn)
        s_tuned, l_tuned = _vm_step(ex_tuned, params, opt_state, xn, yn)
        if pt_train is None:  # 1 thread: PyTorch in the same alternation (same load)
            t_default, t_tuned, pt_train = _alternate(
                [s_default, s_tuned, _torch_step(model, x, y)], repeats
            )
        else:
            t_default, t_tuned = _alternate([s_default, s_tuned], repeats)
        recs = load_knobs(db).values()  # this run's and earlier runs' records
        better = sum(1 for r in recs if r["knobs"] is not None)
        err = abs(l_tuned[0] - l_default[0]) / max(abs(l_default[0]), 1e-12)
        rows.append(
            f"| {name} | {t_default:.3f} s | {t_tuned:.3f} s | {pt_train:.3f} s | "
            f"{t_default / pt_train:.2f} | {t_tuned / pt_train:.2f} | {better}/{len(recs)} | "
            f"{tune_s:.0f} s | {err:.1e} |"
        )
        click.echo(rows[-1], err=True)
    click.echo(f"\ntarget {tgt}, {threads} threads, median of {repeats}, alternating\n")
    click.echo(
        "| model | default step | tuned step | PyTorch step | default/PyTorch | "
        "tuned/PyTorch | kernels improved/tuned | tuning time | loss rel diff |"
    )
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(r)


if __name__ == "__main__":
    main()
