"""Calibration workloads: the Relax modules whose kernels ``calibrate.py`` times.

``model_module``: one ONNX model planned server-only and split (``passes/split_module.py``), so
one side holds the whole training step (``server_loss_adjoint``, ``server_step``,
``server_update``, plus flat entry points for the Relax VM over RPC). ``sweep_module``: single
ops over shapes, so the regressor sees sizes the models do not have.

Layering note: ``cost_models`` does not import ``passes`` at module level; building the
training step needs the frontend and SplitModule, so ``model_module`` imports them inside
the function (calibration is the one place where measuring needs the compiler).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from splitc import InputError
from splitc.cost_models.profiles import DeviceProfile

__all__ = [
    "SYNTHETIC_KINDS",
    "Workload",
    "export_random_models",
    "export_training_onnx",
    "model_module",
    "sweep_module",
    "synthetic_models",
]


@dataclass
class Workload:
    key: str  # unique per model file + input shapes
    model: str  # short name, the held-out group
    module: object  # tvm.IRModule before legalization
    weights: frozenset  # Relax parameter names that are trainable weights
    step: tuple[str, ...]  # functions that make one training step (timed through the VM)
    # training data only (the op sweep, synthetic models): never a held-out test model
    train_only: bool = False
    # the OpFeatures the planner prices for this model (every op, then the loss): what the
    # fit compares op-level predictions with measured steps on (step_fit.py: _op_fit)
    ops: tuple = ()
    # the model's OpGraph (of the tag_ops module): which op each kernel came from
    # (passes/provenance.py); None for the op sweep
    graph: object = None


def model_module(path: Path, batch: int | None = None, train_only: bool = False,
                 step: bool = True, input_shapes: dict | None = None,
                 loss: str = "cross-entropy", optimizer: str = "sgd") -> Workload:
    """Server-only split of one ONNX model: the whole training step on one side. ``step``:
    whether calibration times the whole step too (the family sweep's blocks: kernels only).
    ``input_shapes``, ``loss`` and ``optimizer`` as ``splitc plan`` takes them (calibration
    uses the defaults)."""
    import tvm
    from splitc.cost_models.link import Link
    from splitc.cost_models.roofline import RooflineModel
    from splitc.passes.annotate_costs import annotate_costs
    from splitc.passes.frontend import load_onnx
    from splitc.passes.partition import solve
    from splitc.passes.provenance import tag_ops
    from splitc.passes.split_module import split_module

    mod, info = load_onnx(path, input_shapes or None, batch)
    # main's vars named after their ops: names only, the kernels are the same (provenance)
    mod = tag_ops(mod)
    # costs do not matter for a server-only plan; any profile will do
    prior = RooflineModel(DeviceProfile("calib", "cpu", {"float32": 1e11}, 1e10, 1e-6,
                                        {"status": "prior", "source": "placeholder"}))
    seen: list = []

    class _Record:  # the server model is asked about every op and the loss: record them
        name = "record"

        def op_cost(self, f):
            seen.append(f)
            return prior.op_cost(f)

    graph = annotate_costs(mod, prior, _Record(), loss=loss, model_hash=info.sha256,
                           name=info.name, buffers=info.buffers)
    plan = solve(graph, Link.parse("1Gbps", None, "0"), algorithm="server-only",
                 allow_raw_upload=True)
    smod, spec = split_module(mod, plan, loss=loss, optimizer=optimizer)
    keep = {gv: f for gv, f in smod.functions.items()
            if gv.name_hint in ("server_loss_adjoint", "server_step", "server_update")}
    keep = _with_flat_entries(tvm.IRModule(keep), ("server_step", "server_update"))
    dims = ",".join(f"{i.name}={'x'.join(map(str, i.shape))}" for i in info.inputs)
    key = f"{info.name}@{info.sha256[:12]}[{dims}]"
    return Workload(key, info.name, keep, frozenset(spec.server_params),
                    ("server_step_flat", "server_update_flat") if step else (), train_only,
                    tuple(seen), graph)


def _unflatten(ty, hint: str, flat: list):
    """An expression of type ``ty`` built from fresh tensor vars (appended to ``flat``)."""
    from tvm import relax

    if hasattr(ty, "fields"):
        return relax.Tuple([_unflatten(t, f"{hint}_{i}", flat) for i, t in enumerate(ty.fields)])
    v = relax.Var(hint, ty)
    flat.append(v)
    return v


def _with_flat_entries(mod, names):
    """Add ``NAME_flat(tensors...)`` calling ``NAME`` with its tuple arguments rebuilt: TVM RPC
    cannot pass nested tuples (``server_update((params), (grads), state)``) to a remote VM."""
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    for name in names:
        gv = mod.get_global_var(name)
        func = mod[name]
        if gv.ty is None or not hasattr(gv.ty, "ret"):
            relax.expr._update_type(gv, func.ty)  # a GlobalVar from IRModule({...}) has none
        flat: list = []
        rebuilt = [_unflatten(p.ty, p.name, flat) for p in func.params]
        with bb.function(f"{name}_flat", flat):
            out = bb.emit(relax.Call(gv, rebuilt))
            bb.emit_func_output(out)
    return bb.get()


# single ops over shapes: (op, shapes...), see sweep_module
_SWEEP = (
    [("matmul", (m, k), (k, n)) for m, k, n in
     [(8, 64, 64), (32, 256, 256), (64, 512, 512), (128, 128, 1024), (256, 1024, 256),
      (16, 1024, 1024), (512, 64, 512)]]
    + [("conv2d", (n, c, h, h), (o, c, k, k)) for n, c, h, o, k in
       [(1, 16, 32, 16, 3), (4, 32, 16, 32, 3), (1, 64, 16, 128, 1), (8, 3, 32, 16, 3),
        (2, 64, 8, 64, 3), (1, 128, 14, 128, 3)]]
    + [("conv2d_transpose", (n, o, h, h), (o, c, 3, 3)) for n, c, h, o in
       [(4, 16, 16, 32), (1, 64, 16, 64), (8, 8, 32, 16)]]
    + [(op, (n,), (n,)) for op in ("add", "multiply") for n in (1024, 32768, 1 << 20)]
    + [("relu", (n,)) for n in (4096, 262144, 1 << 22)]
    + [("sum", (r, c)) for r, c in [(64, 1024), (1024, 64), (16, 65536)]]
    + [("softmax", (r, c)) for r, c in [(64, 1000), (512, 128)]]
    + [("permute_dims", (r, c)) for r, c in [(256, 256), (64, 4096)]]
)


def sweep_module() -> Workload:
    """One Relax function per single op of the sweep (all forward kernels)."""
    from tvm import relax
    from tvm.relax import op as R

    bb = relax.BlockBuilder()
    for i, (op, *shapes) in enumerate(_SWEEP):
        ps = [relax.Var(f"a{j}", relax.TensorType(s, "float32")) for j, s in enumerate(shapes)]
        with bb.function(f"sweep{i}_{op}", ps):
            with bb.dataflow():
                if op in ("matmul", "add", "multiply"):
                    y = getattr(R, op)(*ps)
                elif op == "conv2d":
                    y = R.nn.conv2d(ps[0], ps[1], padding=shapes[1][-1] // 2)
                elif op == "conv2d_transpose":
                    y = R.nn.conv2d_transpose(ps[0], ps[1], padding=1)
                elif op == "relu":
                    y = R.nn.relu(ps[0])
                elif op == "sum":
                    y = R.sum(ps[0], axis=[1])
                elif op == "softmax":
                    y = R.nn.softmax(ps[0])
                else:
                    y = R.permute_dims(ps[0])
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return Workload(f"sweep-v{len(_SWEEP)}", "sweep", bb.get(), frozenset(), (), True)


# -- synthetic models ------------------------------------------------------------------------
# Size ranges of the synthetic models: "small" (session 4: steps of 0.07-4.6 ms) and
# "large", drawn like the bench's realistic models (tools/bench_models.py: small_resnet b32
# and the encoder b16 d256 run 136 and 124 ms steps here). Trained on small ones only, those
# two models' kernels were 41-46 % within +-10 % held-out, vs 44-89 % for the small test
# models: their kernels are larger than any the fit had seen. Large ones stay under ~100 ms
# a step, so each costs about a minute of calibration.
_SIZES = {
    "small": {"mlp_in": [64, 128, 256, 512, 784, 1024], "mlp_h": [64, 128, 256, 512, 1024],
              "mlp_b": [1, 4, 8, 16, 32, 64], "cnn_ch": [3, 8, 16], "cnn_hw": [8, 16, 32],
              "cnn_b": [1, 2, 4, 8], "cnn_out": [8, 16, 32, 64], "mb_ch": [8, 16, 24, 32],
              "mb_hw": [8, 14, 16], "mb_b": [1, 2, 4], "tf_d": [32, 64, 96, 128, 192, 256],
              "tf_h": [1, 2, 4], "tf_b": [1, 2, 4], "tf_s": [8, 16, 32, 64]},
    "large": {"mlp_in": [512, 784, 1024, 2048], "mlp_h": [256, 512, 1024, 2048],
              "mlp_b": [32, 64, 128], "cnn_ch": [3, 16, 32], "cnn_hw": [16, 32],
              "cnn_b": [8, 16, 32], "cnn_out": [16, 32, 64, 128], "mb_ch": [16, 24, 32],
              "mb_hw": [14, 16, 28], "mb_b": [4, 8, 16], "tf_d": [128, 192, 256],
              "tf_h": [4, 8], "tf_b": [2, 4, 8], "tf_s": [32, 64]},
}


def _synthetic(kind: str, rng, size: str = "small"):
    """(torch module, input shape, has batch norm) of one random model of ``kind``, with
    sizes drawn from ``_SIZES[size]``."""
    import torch
    from torch import nn

    c = lambda xs: xs[int(rng.integers(len(xs)))]
    z = _SIZES[size]
    if kind == "mlp":
        dims = [c(z["mlp_in"])] + [c(z["mlp_h"]) for _ in range(int(rng.integers(1, 4)))]
        act = c([nn.ReLU, nn.GELU, nn.Tanh])
        layers: list = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), act()]
        return nn.Sequential(*layers, nn.Linear(dims[-1], 10)), (c(z["mlp_b"]), dims[0]), False
    if kind == "cnn":
        ch, hw, bn = c(z["cnn_ch"]), c(z["cnn_hw"]), bool(rng.integers(2))
        shape = (c(z["cnn_b"]), ch, hw, hw)
        layers, cin = [], ch
        for _ in range(int(rng.integers(2, 5))):
            cout, k = c(z["cnn_out"]), c([1, 3, 3])
            s = c([1, 1, 2]) if hw > 4 else 1
            layers += [nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)]
            layers += [nn.BatchNorm2d(cout)] if bn else []
            layers += [c([nn.ReLU, nn.ReLU6])()]
            cin, hw = cout, (hw + s - 1) // s
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
        return nn.Sequential(*layers), shape, bn
    if kind == "mbv2":
        class Block(nn.Module):  # MobileNetV2 inverted residual, optional batch norm
            def __init__(self, ch: int, e: int, bn: bool):
                super().__init__()
                norm = (lambda n: nn.BatchNorm2d(n)) if bn else (lambda n: nn.Identity())
                self.f = nn.Sequential(nn.Conv2d(ch, ch * e, 1), norm(ch * e), nn.ReLU6(),
                                       nn.Conv2d(ch * e, ch * e, 3, padding=1, groups=ch * e),
                                       norm(ch * e), nn.ReLU6(), nn.Conv2d(ch * e, ch, 1))

            def forward(self, x):
                return x + self.f(x)

        ch, bn, hw = c(z["mb_ch"]), bool(rng.integers(2)), c(z["mb_hw"])
        return Block(ch, c([2, 4, 6]), bn), (c(z["mb_b"]), ch, hw, hw), bn
    d, h = c(z["tf_d"]), c(z["tf_h"])

    class Block(nn.Module):  # pre-LN encoder block + mean pool + head
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            r = c([2, 4])
            self.fc1, self.fc2 = nn.Linear(d, r * d), nn.Linear(r * d, d)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2)
                       for t in self.qkv(self.ln1(x)).split(d, dim=-1))
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1) @ v
            x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
            x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
            return self.head(x.mean(1))

    return Block(), (c(z["tf_b"]), c(z["tf_s"]), d), False


SYNTHETIC_KINDS = ("mlp", "cnn", "mbv2", "transformer")


def synthetic_models(out: Path, n: int, seed: int = 0, size: str = "small") -> list[Path]:
    """``n`` random small models (MLPs, CNNs, MobileNetV2 blocks, transformer blocks, in turn;
    sizes drawn with ``seed``) exported to ONNX under ``out`` (cached by name): calibration
    data whose kernels vary in shape the way real models' do, as nn-Meter samples kernel
    configurations. Needs torch (only here)."""
    # "small" keeps session 4's names and seeds: its cached files and dataset rows stay valid
    large = size != "small"
    return export_random_models(
        out, n, SYNTHETIC_KINDS, f"syn{'L' if large else ''}{seed}",
        lambda i: [seed, i, 1] if large else [seed, i],
        lambda kind, rng: _synthetic(kind, rng, size), "--synthetic")


def export_random_models(out: Path, n: int, kinds, prefix: str, key, build,
                         flag: str, only=()) -> list[Path]:
    """Export ``n`` random torch models to ``out/<prefix>_<i>_<kind>.onnx`` (``kinds`` in
    turn; cached by name, so a resumed calibration finds the same files and skips their
    measured rows). Model ``i`` is ``build(kind, rng)`` -> (module, input shape, has batch
    norm, ...) with ``rng = default_rng(key(i))``. With ``only``, models of other kinds are
    neither exported nor listed. ``flag`` names the option in the error raised when torch is
    missing."""
    import numpy as np

    try:
        import torch
    except ImportError:
        raise InputError(
            f"Calibrate: {flag} needs PyTorch to build random models; "
            f"pip install torch (CPU wheel) or pass {flag} 0"
        ) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if only and kind not in only:
            continue
        p = out / f"{prefix}_{i:03d}_{kind}.onnx"
        paths.append(p)
        if p.exists():
            continue
        rng = np.random.default_rng(key(i))
        torch.manual_seed(int(rng.integers(1 << 30)))
        model, shape, bn = build(kind, rng)[:3]
        export_training_onnx(model, shape, bn, p)
    return paths


def export_training_onnx(model, shape, bn: bool, path: Path) -> None:
    """Export a torch module for training calibration (batch norm in its training form when
    ``bn``) to ``path``, through a temporary file so an interrupted export leaves nothing."""
    import warnings

    import torch

    model.train(bn)  # batch norm exports its training form only in training mode
    mode = torch.onnx.TrainingMode.TRAINING if bn else torch.onnx.TrainingMode.EVAL
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(tmp), input_names=["x"],
                          opset_version=17, dynamo=False, do_constant_folding=False,
                          training=mode)
    tmp.replace(path)
