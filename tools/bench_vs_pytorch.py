"""Benchmark: a compiled TVM training step against PyTorch eager on this CPU (issue 6).

For each model: PyTorch eager train step (forward + cross-entropy + backward + SGD step) and
forward alone, against the same step compiled by TVM twice, plain ``tvm.compile`` (the
"default" build, which schedules nothing) and ``passes.schedules.default_cpu_schedule`` then
``tvm.compile``. Same weights, same batch, same thread count, medians over ``--repeats``.

The TVM step is built the way ``splitc compile`` builds an unsplit model: the team's frontend
(``passes.frontend.load_onnx``), ``passes.training.DecomposeForTraining`` and TVM's
``SetupTrainer`` (AppendLoss, Gradient, SGD). Batch norm runs with its running statistics on
both sides (PyTorch ``model.eval()``), so both compute the same function; the ``loss rel err``
column checks that.

    python -m splitc.tools.bench_vs_pytorch --models small_resnet,encoder
    python -m splitc.tools.bench_vs_pytorch --models resnet50_b8 --no-plain --kernels 15
    python -m splitc.tools.bench_vs_pytorch --models gpt2_block_b8 --no-plain --threads 1 --ablate

With ``--threads 1`` the PyTorch step and the TVM builds are timed in turn (round robin), so
load from other processes on a shared machine hits all of them alike; with more threads
PyTorch is timed first (TVM's idle pool workers would slow PyTorch's OpenMP threads).
``--ablate`` adds the schedules without ``RewriteGrads``, the exp/erf polynomials and the
conv / max-pool kernels of ``passes/conv_weight_grads.py``, ``pointwise_convs.py`` and
``max_pool_grads.py``.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass

import click
import numpy as np
from splitc.tools.bench_models import MODEL_NAMES, _encoder, build_model  # noqa: F401 (re-export)


# ------------------------------------------------------------------------------- PyTorch
def torch_fns(model, x, y):
    """(train step, forward) closures of PyTorch eager."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def fwd():
        with torch.no_grad():
            model(x)

    return step, fwd


def torch_times(model, x, y, repeats: int) -> tuple[float, float]:
    """Median seconds of (train step, forward) in PyTorch eager."""
    step, fwd = torch_fns(model, x, y)
    return _median(step, repeats), _median(fwd, repeats)


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per name, the functions timed in turn (round robin) so that load from
    other processes hits every variant alike."""
    for fn in fns.values():
        fn()  # warm-up
    ts: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _median(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and (for TVM) lazy init
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ------------------------------------------------------------------------------- TVM
def export_onnx(model, x_shape, path: str) -> str:
    """``model`` in eval mode as ONNX at ``path`` (opset 17, input "x", no constant folding,
    so weights keep their state_dict names); returns ``path``."""
    import onnx
    import torch

    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (torch.zeros(x_shape),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            do_constant_folding=False,
        )
    onnx.save(onnx.load_from_string(buf.getvalue()), path)
    return path


def train_module(model, x_shape, classes: int):
    """(IRModule with backbone / backbone_loss_adjoint / optimizer, params, optimizer state)."""
    from splitc.passes.frontend import load_onnx
    from splitc.passes.training import DecomposeForTraining
    from tvm import IRModule, relax
    from tvm.relax.training import SetupTrainer
    from tvm.relax.training.loss import CrossEntropyLoss
    from tvm.relax.training.optimizer import SGD

    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(model, x_shape, os.path.join(d, "model.onnx"))
        mod, info = load_onnx(path)
    if info.buffers:  # running statistics are constants in eval mode: never trained, as in
        # PyTorch (SGD on them would also add a reduction per batch norm to the step)
        mod = relax.transform.BindParams("main", {k: info.params[k] for k in info.buffers})(mod)
    params = [
        np.asarray(v.numpy() if hasattr(v, "numpy") else v)
        for k, v in info.params.items()
        if k not in info.buffers
    ]
    func = mod["main"]
    for key in ("params", "num_input"):
        if func.attrs is not None and key in func.attrs:
            func = func.without_attr(key)
    mod = IRModule({"backbone": func.with_attr("global_symbol", "backbone")})
    mod = mod.with_attrs({"param_num": len(params), "state_num": 0})
    mod = DecomposeForTraining(training=False)(mod)
    batch = x_shape[0]
    sgd = SGD(0.01)
    trainer = SetupTrainer(
        CrossEntropyLoss(),
        sgd,
        [relax.TensorType((batch, classes), "float32"), relax.TensorType((batch,), "int64")],
        legalize=False,
    )
    mod = trainer(mod)
    return mod, params, [s.numpy() for s in sgd.state]


def make_case(name: str, image: int = 224):
    """(torch model in eval mode, input shape, x, y, training IRModule, params, optimizer
    state) for a model of ``tools/bench_models.py``, seeded."""
    import torch
    from splitc.tools.bench_gpu import _model

    # seeded, norm parameters random: at 1 / 0 the ONNX exporter merges identical initializers
    # and TVM would train a few shared batch-norm tensors where PyTorch trains separate ones
    model, shape, classes = _model(name, image)
    x = torch.randn(shape)
    y = torch.randint(0, classes, (shape[0],))
    mod, params, opt_state = train_module(model, shape, classes)
    model.eval()  # batch norm on running stats, as in the exported graph
    return model, shape, x, y, mod, params, opt_state


@dataclass
class TvmResult:
    train_s: float
    fwd_s: float
    compile_s: float
    loss: float
    fallbacks: list


def tvm_fns(mod, params, opt_state, x, y, target, schedule: bool, **options):
    """(train step, forward, compile seconds, first loss getter, fallbacks) of the TVM build;
    ``options`` go to ``default_cpu_schedule`` (e.g. ``rewrite_matmuls=False,
    fast_math=False`` for the schedule rules alone)."""
    import tvm
    from splitc.passes.schedules import default_cpu_schedule
    from tvm import relax

    fallbacks: list = []
    t0 = time.perf_counter()
    if schedule:
        mod = default_cpu_schedule(mod, target, fallbacks.append, **options)
    ex = tvm.compile(mod, target)
    compile_s = time.perf_counter() - t0
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    xs, ys = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(y, dev)
    ps = [tvm.runtime.tensor(p, dev) for p in params]
    state = [tvm.runtime.tensor(s, dev) for s in opt_state]
    loss = []

    def step():
        out = vm["backbone_loss_adjoint"](xs, *ps, ys)
        loss.append(out[0])
        vm["optimizer"](tuple(ps), out[1], tuple(state))  # same cost as keeping the result

    def fwd():
        vm["backbone"](xs, *ps)

    def first_loss() -> float:
        first = loss[0] if isinstance(loss[0], tvm.runtime.Tensor) else loss[0][0]
        return float(first.numpy())

    return step, fwd, compile_s, first_loss, fallbacks


def tvm_times(
    mod, params, opt_state, x, y, target, schedule: bool, repeats: int, **options
) -> TvmResult:
    """Times of the TVM step (``tvm_fns``), each timed on its own."""
    step, fwd, compile_s, first_loss, fallbacks = tvm_fns(
        mod, params, opt_state, x, y, target, schedule, **options
    )
    train_s = _median(step, repeats)
    fwd_s = _median(fwd, repeats)
    return TvmResult(train_s, fwd_s, compile_s, first_loss(), fallbacks)


def kernel_profile(mod, target, func: str = "backbone_loss_adjoint", top: int = 15):
    """[(seconds x calls, calls, kernel, arg shapes)] of the scheduled kernels of ``func``,
    each timed alone on random inputs, fastest of 5 runs (the VM in TVM 0.27 has no
    profiler)."""
    import collections

    import tvm
    from splitc.passes.schedules import default_cpu_schedule
    from tvm import relax, tirx
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    mod = default_cpu_schedule(mod, target)
    calls = collections.Counter()
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op == call_tir:
            calls[e.args[0].name_hint] += 1

    relax.analysis.post_order_visit(mod[func].body, visit)
    dev, rows = tvm.cpu(), []
    for gv, f in mod.functions.items():
        if not isinstance(f, tirx.PrimFunc) or gv.name_hint not in calls:
            continue
        infos = ArgInfo.from_prim_func(f)
        args = [
            tvm.runtime.tensor(
                np.random.uniform(-1, 1, [int(d) for d in a.shape]).astype(str(a.dtype)), dev
            )
            for a in infos
        ]
        lib = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target).jit()
        # the fastest of 5 rounds: load from other processes only ever adds time (one round of
        # 3 read a 14x14 weight gradient as 77 ms on a loaded machine, 22 ms alone)
        t = min(lib.time_evaluator("k", dev, number=1, repeat=5)(*args).results)
        shapes = [tuple(int(d) for d in a.shape) for a in infos]
        rows.append((t * calls[gv.name_hint], calls[gv.name_hint], gv.name_hint, shapes))
    rows.sort(key=lambda r: -r[0])
    return rows[:top]


# ------------------------------------------------------------------------------- CLI
# --ablate: the schedule rules alone (no RewriteGrads, libm exp/erf, TVM's own conv weight
# gradient, 1x1 conv and max-pool backward legalizations); the transpose rule stays
_BARE = {"rewrite_matmuls": False, "fast_math": False, "conv_kernels": False}


@click.command()
@click.option(
    "--models",
    default="small_resnet,encoder",
    show_default=True,
    help=f"comma-separated: {', '.join(MODEL_NAMES)}",
)
@click.option("--repeats", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option(
    "--target",
    default="host",
    show_default=True,
    help="'host' (llvm with this CPU's mcpu), 'llvm', or a JSON target",
)
@click.option("--no-plain", is_flag=True, help="skip the unscheduled TVM build (slow)")
@click.option("--image", default=224, show_default=True, help="ResNet-50 input size")
@click.option("--kernels", default=0, help="also list the N slowest scheduled kernels")
@click.option(
    "--ablate",
    is_flag=True,
    help="also time the schedules without the graph rewrites and fast math (one more column)",
)
def main(models, repeats, threads, target, no_plain, image, kernels, ablate):
    """Print a markdown table: TVM default, TVM + default schedules, PyTorch eager."""
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    import json

    import torch
    import tvm
    from splitc.passes.schedules import host_llvm_target

    torch.set_num_threads(threads)
    tgt = (
        host_llvm_target()
        if target == "host"
        else tvm.target.Target(json.loads(target) if target.startswith("{") else target)
    )
    # All PyTorch timings first: once TVM's thread pool has run, its idle workers compete with
    # PyTorch's OpenMP threads (PyTorch's 2-thread encoder step went from 0.13 s to 0.86 s).
    cases = []
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        model, shape, x, y, mod, params, opt_state = make_case(name, image)
        with torch.no_grad():
            ref_loss = float(torch.nn.functional.cross_entropy(model(x), y))
        # 1 thread: PyTorch is timed later, in turn with the TVM builds (no pool to compete)
        pt_train, pt_fwd = torch_times(model, x, y, repeats) if threads > 1 else ((model, x, y), 0)
        xn, yn = x.numpy(), y.numpy().astype("int64")
        cases.append((name, shape, mod, params, opt_state, xn, yn, pt_train, pt_fwd, ref_loss))
    rows = []
    for name, shape, mod, params, opt_state, xn, yn, pt_train, pt_fwd, ref_loss in cases:
        if threads > 1:
            sch = tvm_times(mod, params, opt_state, xn, yn, tgt, True, repeats)
            args = (mod, params, opt_state, xn, yn, tgt, True, repeats)
            bare = tvm_times(*args, **_BARE) if ablate else None
        else:
            sch, bare, pt_train, pt_fwd = _timed_in_turn(
                mod, params, opt_state, xn, yn, tgt, repeats, ablate, *pt_train
            )
        if bare is not None:
            click.echo(
                f"  {name}: schedules without rewrites/fast math {bare.train_s:.3f} s, "
                f"ratio {bare.train_s / pt_train:.2f} (with: {sch.train_s / pt_train:.2f})",
                err=True,
            )
        plain = (
            None
            if no_plain
            else tvm_times(mod, params, opt_state, xn, yn, tgt, False, max(1, repeats // 2))
        )
        rows.append((name, shape, plain, sch, pt_train, pt_fwd, ref_loss))
        click.echo(_row(*rows[-1]), err=True)
        if sch.fallbacks:
            click.echo(
                f"  {name}: {len(sch.fallbacks)} kernels not fully scheduled: "
                + ", ".join(f.kernel for f in sch.fallbacks),
                err=True,
            )
        if kernels:
            for t, n, k, shapes in kernel_profile(mod, tgt, top=kernels):
                click.echo(f"  {t * 1e3:9.2f} ms  x{n} {k} {shapes}", err=True)
    click.echo(f"\ntarget {tgt}, {threads} threads, median of {repeats}\n")
    click.echo(
        "| model | input | TVM default step | TVM + schedules step | PyTorch step | "
        "ratio (sched/PyTorch) | fwd ratio (sched/PyTorch) | TVM default / sched | "
        "compile s (sched) | loss rel err |"
    )
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(_row(*r))


def _timed_in_turn(mod, params, opt_state, xn, yn, tgt, repeats, ablate, model, x, y):
    """(sched, bare or None, PyTorch step s, PyTorch fwd s): the steps timed round robin."""
    variants = {"sched": {}} | ({"bare": _BARE} if ablate else {})
    built = {
        k: tvm_fns(mod, params, opt_state, xn, yn, tgt, True, **opts)
        for k, opts in variants.items()
    }
    pt_step, pt_fwd = torch_fns(model, x, y)
    train = _interleaved({"pt": pt_step} | {k: b[0] for k, b in built.items()}, repeats)
    fwd = _interleaved({"pt": pt_fwd} | {k: b[1] for k, b in built.items()}, repeats)
    res = {k: TvmResult(train[k], fwd[k], b[2], b[3](), b[4]) for k, b in built.items()}
    return res["sched"], res.get("bare"), train["pt"], fwd["pt"]


def _row(name, shape, plain, sch, pt_train, pt_fwd, ref_loss) -> str:
    plain_s = f"{plain.train_s:.3f} s" if plain else "-"
    speedup = f"{plain.train_s / sch.train_s:.1f}x" if plain else "-"
    err = abs(sch.loss - ref_loss) / max(abs(ref_loss), 1e-12)
    return (
        f"| {name} | {'x'.join(map(str, shape))} | {plain_s} | {sch.train_s:.3f} s | "
        f"{pt_train:.3f} s | {sch.train_s / pt_train:.2f} | {sch.fwd_s / pt_fwd:.2f} | "
        f"{speedup} | {sch.compile_s:.1f} | {err:.1e} |"
    )


if __name__ == "__main__":
    main()
