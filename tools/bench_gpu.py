"""Benchmark: the compiled TVM training step on a CUDA GPU against PyTorch eager on that GPU
(issue 6, "for CUDA targets").

Two stages, because the machine that compiles is not the machine with the GPU, as in a real
deployment (the build host compiles, the server only loads the library):

``build`` (here, any machine with nvcc): for each model of ``tools/bench_models.py``, the same
training IRModule as ``bench_vs_pytorch`` (frontend, DecomposeForTraining, SetupTrainer with
cross-entropy and SGD), compiled by ``passes/build.py``'s CUDA pipeline (dlight rules that
cannot abort the build) and exported with the kernels as nvcc fatbins for ``--arch``. It writes
``DIR/NAME.so`` and ``DIR/manifest.json`` (parameter names in argument order, shapes, the
optimizer state, versions). No weights travel: ResNet-50's are 100 MB.

``run DIR`` (the GPU machine; needs torch with CUDA and TVM's *runtime* only, e.g. the package
without ``libtvm_compiler.so`` or ``TVM_USE_RUNTIME_LIB=1``): builds each PyTorch model (seed
0), feeds its ``state_dict`` to the TVM step by parameter name, and
- checks correctness in strict float32 (TF32 off): first loss and every parameter after one
  SGD step, TVM vs PyTorch, as relative L2 errors;
- times the train step (forward + loss + backward + SGD, synchronised) and the forward,
  medians, TVM and PyTorch in turn (round robin); PyTorch twice: strict float32 and its
  defaults (cuDNN may use TF32 for convolutions; TVM's kernels are plain float32).

    python -m splitc.tools.bench_gpu build --models small_resnet,encoder --arch sm_90 -o DIR
    python -m splitc.tools.bench_gpu run DIR --repeats 20

``build --split MODEL.onnx`` also compiles that model with ``splitc compile`` (device half on
generic ``llvm``, server half on CUDA) into ``DIR/split.tar``, runs three split training steps
here with the same package built for an ``llvm`` server and stores inputs and results in
``DIR/split_ref.npz``; ``run`` repeats the steps with the server half on the GPU (loaded by
``runtime/tvm_halves.py`` with TVM's runtime only) and compares losses, cut gradients and the
final parameters of both halves (``tools/bench_gpu_split.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import click
import numpy as np
from splitc.tools.bench_gpu_split import build_split, check_split, rel_err
from splitc.tools.bench_models import MODEL_NAMES, build_model


# ------------------------------------------------------------------------------- build
def _model(name: str, image: int):
    """(model, input shape, classes), seed 0, the model held as ``.m`` so every parameter name
    starts with a letter: TVM 0.27's CUDA codegen names kernel arguments after Relax vars, and
    ResNet-50's ``4.body.6.weight`` became ``float* 4_body_6_weight_ptr``, which nvcc rejects.
    (``splitc compile`` is not affected: split halves name weights ``w_...``.)"""
    import torch

    class Held(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    torch.manual_seed(0)
    model, shape, classes = build_model(name, image)
    with torch.no_grad():  # norm layers start at 1 / 0: identical tensors, which the ONNX
        for m in model.modules():  # exporter merges into one; random values keep them apart
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return Held(model), shape, classes


def build_case(name: str, arch: str, out_dir: str, image: int = 224) -> dict:
    """Compile ``name``'s training step for CUDA ``arch``; returns its manifest entry."""
    import tvm
    from splitc.passes.build import _env, resolve_target
    from splitc.passes.build_gpu import FatbinPacker, gpu_pipeline
    from splitc.passes.compat import var_name
    from splitc.tools.bench_vs_pytorch import train_module

    model, shape, classes = _model(name, image)
    mod, params, opt_state = train_module(model, shape, classes)
    names = [var_name(v) for v in mod["backbone"].params[1:]]  # after the input x
    sd = model.state_dict()
    for n, p in zip(names, params):  # the device feeds state_dict[n]: the names must be exact
        if n not in sd or tuple(sd[n].shape) != p.shape or not np.array_equal(sd[n].numpy(), p):
            raise click.ClickException(f"bench_gpu: parameter {n!r} is not the state_dict's")
    t0 = time.perf_counter()
    if arch == "cpu":  # both stages without a GPU: a smoke run, and the test of this tool
        from splitc.passes.schedules import default_cpu_schedule, host_llvm_target

        tgt = host_llvm_target()
        ex = tvm.compile(default_cpu_schedule(mod, tgt), target=tgt)
        ex.export_library(os.path.join(out_dir, f"{name}.so"))
    else:
        tgt = resolve_target(f"cuda -arch={arch}")
        with _env(TVM_CUDA_COMPILE_MODE="nvcc"), tgt:
            ex = tvm.compile(mod, target=tgt, relax_pipeline=gpu_pipeline(tgt))
            ex.export_library(os.path.join(out_dir, f"{name}.so"), fpack_imports=FatbinPacker(arch))
    return {
        "name": name,
        "input": list(shape),
        "classes": classes,
        "params": names,
        "opt_state": [
            {"shape": list(s.shape), "dtype": str(s.dtype), "value": s.tolist()} for s in opt_state
        ],
        "compile_s": round(time.perf_counter() - t0, 1),
        "image": image,
    }


# ------------------------------------------------------------------------------- run
def _interleaved(fns: dict, sync, repeats: int, warmup: int = 3) -> dict:
    """Median seconds per name, the functions timed in turn (each synchronised)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    ts: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def top_kernels(fn, top: int | None) -> list[tuple[float, int, str]]:  # pragma: no cover
    """[(ms per call of ``fn``, launches, kernel)] of the CUDA kernels ``fn`` launches, the
    ``top`` largest (all for None), from PyTorch's profiler (CUPTI sees TVM's launches too)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        import torch

        torch.cuda.synchronize()
    rows = [
        (e.device_time_total / 1e3, e.count, e.key)
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(rows, reverse=True)[:top]


def _devices(arch: str):
    """(torch device, TVM device, synchronise) for a build's ``arch``."""
    import torch
    from splitc.runtime.tvm_halves import tvm_device

    if arch == "cpu":
        return "cpu", tvm_device("llvm"), lambda: None
    # one stream: TVM launches on CUDA's legacy default stream, which PyTorch's default syncs
    return "cuda", tvm_device("cuda"), torch.cuda.synchronize


def run_case(
    entry: dict, lib_path: str, repeats: int, profile_top: int = 0, arch: str = "sm_90"
) -> dict:
    """Correctness and timings of one model on the build's device (module docstring)."""
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine

    tdev, dev, sync = _devices(arch)

    name, shape = entry["name"], tuple(entry["input"])
    model, _, classes = _model(name, entry.get("image", 224))
    model = model.eval().to(tdev)  # batch norm on running statistics, as in the exported graph
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(tdev)
    y = torch.randint(0, classes, (shape[0],), generator=g).to(tdev)
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}

    vm = VirtualMachine(tvm.runtime.load_module(lib_path), dev)
    tx = tvm.runtime.tensor(x.cpu().numpy(), dev)
    ty = tvm.runtime.tensor(y.cpu().numpy().astype("int64"), dev)
    ps = [tvm.runtime.tensor(np.ascontiguousarray(sd[n]), dev) for n in entry["params"]]
    st = [
        tvm.runtime.tensor(np.asarray(s["value"], dtype=s["dtype"]).reshape(s["shape"]), dev)
        for s in entry["opt_state"]
    ]

    # correctness, strict float32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def pt_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    out = vm["backbone_loss_adjoint"](tx, *ps, ty)
    new_ps, _ = vm["optimizer"](tuple(ps), out[1], tuple(st))
    tvm_loss = float((out[0] if isinstance(out[0], tvm.runtime.Tensor) else out[0][0]).numpy())
    pt_loss = float(pt_step().detach())
    after = model.state_dict()
    param_err = max(
        rel_err(p.numpy(), after[n].detach().cpu().numpy()) for n, p in zip(entry["params"], new_ps)
    )
    res = {
        "name": name,
        "input": "x".join(map(str, shape)),
        "loss_rel_err": abs(tvm_loss - pt_loss) / max(abs(pt_loss), 1e-12),
        "param_rel_err": param_err,
        "compile_s": entry.get("compile_s"),
    }

    def tvm_step():
        o = vm["backbone_loss_adjoint"](tx, *ps, ty)
        vm["optimizer"](tuple(ps), o[1], tuple(st))  # same cost as keeping the result

    def tvm_fwd():
        vm["backbone"](tx, *ps)

    def pt_fwd():
        with torch.no_grad():
            model(x)

    def tf32(on: bool, fn):
        def run():
            torch.backends.cudnn.allow_tf32 = on  # on: PyTorch's default (matmul TF32 stays off)
            return fn()

        return run

    # round robin, so that drift of the shared host (eager PyTorch is launch-bound on small
    # models: its b8 ResNet-50 step read 19 and 29 ms in two runs) hits every variant alike
    steps = _interleaved(
        {"tvm": tvm_step, "pt_fp32": tf32(False, pt_step), "pt_default": tf32(True, pt_step)},
        sync,
        repeats,
    )
    fwds = _interleaved(
        {"tvm": tvm_fwd, "pt_fp32": tf32(False, pt_fwd), "pt_default": tf32(True, pt_fwd)},
        sync,
        repeats,
    )
    for k, key in (
        ("tvm", "tvm_{}_s"),
        ("pt_fp32", "pt_{}_fp32_s"),
        ("pt_default", "pt_{}_default_s"),
    ):
        res[key.format("step")], res[key.format("fwd")] = steps[k], fwds[k]
    if profile_top:
        torch.backends.cudnn.allow_tf32 = False
        every = top_kernels(tvm_step, None)
        res["tvm_kernels_all"] = every  # for calibration: every kernel of the step
        res["tvm_kernels"] = every[:profile_top]
        res["pt_kernels"] = top_kernels(pt_step, profile_top)
    return res


def _table(rows: list[dict], device: str, repeats: int) -> str:
    lines = [
        f"\n{device}, median of {repeats}\n",
        (
            "| model | input | TVM step | PyTorch step (fp32) | ratio | PyTorch step (default) | "
            "ratio | fwd ratio (fp32) | loss rel err | param rel err | compile s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['input']} | {r['tvm_step_s'] * 1e3:.2f} ms | "
            f"{r['pt_step_fp32_s'] * 1e3:.2f} ms | {r['tvm_step_s'] / r['pt_step_fp32_s']:.2f} | "
            f"{r['pt_step_default_s'] * 1e3:.2f} ms | "
            f"{r['tvm_step_s'] / r['pt_step_default_s']:.2f} | "
            f"{r['tvm_fwd_s'] / r['pt_fwd_fp32_s']:.2f} | {r['loss_rel_err']:.1e} | "
            f"{r['param_rel_err']:.1e} | {r['compile_s']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI
@click.group()
def main():
    """Compiled CUDA training step vs PyTorch eager on the same GPU."""


@main.command("build")
@click.option(
    "--models",
    default="small_resnet,encoder",
    show_default=True,
    help=f"comma-separated: {', '.join(MODEL_NAMES)}",
)
@click.option(
    "--arch",
    default="sm_90",
    show_default=True,
    help="CUDA arch of the GPU; 'cpu' builds for llvm (a smoke run without a GPU)",
)
@click.option("--image", default=224, show_default=True, help="ResNet-50 input size")
@click.option(
    "--split",
    "split_onnx",
    type=click.Path(exists=True, dir_okay=False),
    help="also build a split package of this ONNX model with a CUDA server half",
)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
def build_cmd(models, arch, image, split_onnx, out_dir):
    """Compile each model's training step for CUDA into OUT (needs nvcc, no GPU)."""
    import tvm
    from splitc.passes.build import cuda_version

    os.makedirs(out_dir, exist_ok=True)
    man_path = os.path.join(out_dir, "manifest.json")
    man = {"arch": arch, "tvm": tvm.__version__, "cuda": cuda_version(), "models": []}
    if os.path.exists(man_path):  # resumable: keep the models already built
        man = json.loads(Path(man_path).read_text())
    done = {m["name"] for m in man["models"]}
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        if name in done:
            click.echo(f"{name}: already built", err=True)
            continue
        click.echo(f"{name}: compiling for {arch} ...", err=True)
        entry = build_case(name, arch, out_dir, image)
        man["models"].append(entry)
        with open(man_path, "w") as f:  # after every model: nothing lost on failure
            json.dump(man, f)
        click.echo(f"{name}: {entry['compile_s']} s", err=True)
    if split_onnx:
        click.echo(f"split package of {split_onnx}: compiling ...", err=True)
        man["split"] = build_split(split_onnx, arch, out_dir)
        with open(man_path, "w") as f:
            json.dump(man, f)


@main.command("run")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--repeats", default=20, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write rows")
@click.option("--kernels", default=0, help="also list the N slowest kernels of each step")
def run_cmd(build_dir, repeats, json_out, kernels):
    """Check and time BUILD_DIR's models on cuda:0 against PyTorch (needs a GPU)."""
    import torch

    man = json.loads((Path(build_dir) / "manifest.json").read_text())
    arch = man["arch"]
    if arch != "cpu" and not torch.cuda.is_available():
        raise click.ClickException("bench_gpu: no CUDA device visible to PyTorch")
    name = "cpu" if arch == "cpu" else torch.cuda.get_device_name(0)
    device = f"{name}, torch {torch.__version__}, arch {arch}"
    if "split" in man:
        click.echo(check_split(build_dir, man["split"]["steps"], arch))
    rows = []
    for entry in man["models"]:
        lib = os.path.join(build_dir, f"{entry['name']}.so")
        r = run_case(entry, lib, repeats, kernels, arch)
        rows.append(r)
        for side in ("tvm", "pt"):
            for ms, n, k in r.pop(f"{side}_kernels", []):
                click.echo(f"  {entry['name']} {side:3} {ms:9.3f} ms x{n:<4} {k[:110]}", err=True)
        click.echo(json.dumps({k: v for k, v in r.items() if not k.endswith("_all")}), err=True)
        if json_out:
            with open(json_out, "w") as f:
                json.dump({"device": device, "rows": rows}, f, indent=1)
    click.echo(_table(rows, device, repeats))


if __name__ == "__main__":
    main()
