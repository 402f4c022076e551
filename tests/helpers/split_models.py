"""Small PyTorch models for the compile tests, exported to ONNX and imported with TVM.

Tiny shapes on purpose: every test compiles both halves on 2 shared cores.
``manual_graph`` builds a cost-free OpGraph from ``main`` following the naming contract of
``passes/opgraph.py``, so tests can place ops by hand without the cost models.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from splitc.cost_models.link import Link
from splitc.passes.opgraph import OpGraph, OpNode, Param, Tensor
from splitc.passes.plan import Placement, Plan
from torch import nn


class ResCNN(nn.Module):
    """Conv + batch norm + residual, then a linear head (5 classes)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = torch.relu(self.b2(self.c2(y)) + y)
        return self.fc(z.mean((2, 3)))


class MobileBlock(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, ReLU6, depthwise 3x3, ReLU6, 1x1 project."""

    def __init__(self, c=4, e=8):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        y = x + self.project(self.dw(self.expand(x)))
        return self.fc(y.mean((2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm block: single-head attention, layer norm, GELU MLP; mean-pooled 4-class head."""

    def __init__(self, d=8, h=16):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # separate q/k/v projections: a fused qkv + chunk exports as Split, which TVM 0.27's
        # importer turns into dynamic_strided_slice with unknown shapes
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.head = nn.Linear(d, 4)
        self.d = d

    def forward(self, x):
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.d**0.5, dim=-1) @ v
        x = x + self.proj(a)
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


MODELS = {
    "cnn": (ResCNN, (2, 3, 6, 6), 5),
    "mobile": (MobileBlock, (2, 4, 6, 6), 3),
    "transformer": (TransformerBlock, (2, 5, 8), 4),
}


def make_model(kind: str, seed: int = 0):
    """``(torch module in train mode, onnx bytes, example input, labels)``."""
    cls, shape, classes = MODELS[kind]
    torch.manual_seed(seed)
    m = cls().train()
    x = torch.randn(*shape)
    y = torch.randint(0, classes, (shape[0],))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (x,),
            buf,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            dynamo=False,
            input_names=["x"],
        )
    return m, buf.getvalue(), x, y


def import_onnx(onnx_bytes: bytes):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_onnx(onnx.load_from_string(onnx_bytes), keep_params_in_input=True)


def param_values(mod) -> dict[str, np.ndarray]:
    main = mod["main"]
    n = int(main.attrs["num_input"])
    return {p.name: v.numpy() for p, v in zip(main.params[n:], main.attrs["params"])}


def manual_graph(mod, name: str = "m") -> OpGraph:
    """Cost-free OpGraph of ``main`` (naming contract of passes/opgraph.py)."""
    from splitc.passes.naming import binding_names
    from tvm import relax

    main = mod["main"]
    names = binding_names(main)
    n = int(main.attrs["num_input"])
    inputs = list(main.params[:n])
    weights = {p for p in main.params[n:]}
    tainted, owner, tensors, ops, readers = set(inputs), {}, {}, [], {}

    def tensor(v, producer):
        ty = v.ty
        tensors[names[v]] = dict(
            shape=tuple(int(d) for d in ty.shape),
            dtype=str(ty.dtype),
            producer=producer,
            consumers=[],
        )

    for p in inputs:
        tensor(p, None)
    wdeps = {}  # weight-prep var -> params it reaches
    for b in main.body.blocks[0].bindings:
        fv = list(relax.analysis.free_vars(b.value))
        if not any(v in tainted for v in fv):
            wdeps[b.var] = {p for v in fv for p in (wdeps.get(v, set()) | ({v} & weights))}
            continue
        tainted.add(b.var)
        if isinstance(b.value, relax.TupleGetItem):
            op = owner[b.value.tuple_value]
            owner[b.var] = op
            tensor(b.var, op["name"])
            op["outputs"].append(names[b.var])
            continue
        op = dict(
            name=names[b.var],
            op=str(getattr(b.value, "op", "tuple")),
            inputs=[],
            outputs=[],
            params=set(),
            prep=[],
        )
        for v in fv:
            if v in weights:
                op["params"].add(v)
            elif v in wdeps:
                op["params"] |= wdeps[v]
                op["prep"].append(names[v])
            elif names.get(v) in tensors:
                op["inputs"].append(names[v])
                tensors[names[v]]["consumers"].append(op["name"])
        owner[b.var] = op
        if isinstance(b.var.ty, relax.TensorType):
            tensor(b.var, op["name"])
            op["outputs"].append(names[b.var])
        ops.append(op)
    ret = main.body.body
    outs = [names[v] for v in (ret.fields if isinstance(ret, relax.Tuple) else [ret])]
    for op in ops:
        for p in op["params"]:
            readers.setdefault(p, []).append(op["name"])
    g = OpGraph(
        name=name,
        ops=tuple(
            OpNode(
                o["name"],
                o["op"],
                tuple(o["inputs"]),
                tuple(o["outputs"]),
                tuple(sorted(names[p] for p in o["params"])),
                tuple(o["prep"]),
            )
            for o in ops
        ),
        tensors={
            k: Tensor(k, t["shape"], t["dtype"], t["producer"], tuple(t["consumers"]), k in outs)
            for k, t in tensors.items()
        },
        params={
            names[p]: Param(
                names[p],
                tuple(int(d) for d in p.ty.shape),
                str(p.ty.dtype),
                tuple(readers.get(p, ())),
            )
            for p in main.params[n:]
        },
        inputs=tuple(names[p] for p in inputs),
        outputs=tuple(outs),
        model_hash=name,
    )
    return g


def manual_plan(mod, device_ops, name: str = "m", objective: str = "training") -> Plan:
    g = manual_graph(mod, name)
    return Plan.build(
        g, Placement.of(device_ops), Link.parse("100Mbps", None, "0"), objective, "manual", "p", "p"
    )


def op_names(mod) -> list[str]:
    return [o.name for o in manual_graph(mod).ops]


def compile_sides(smod):
    """``(device VM, server VM)`` of a split module compiled for llvm."""
    import tvm
    from splitc.passes.build import side_module
    from tvm import relax

    dev = tvm.cpu()
    return tuple(
        relax.VirtualMachine(tvm.compile(side_module(smod, s), target="llvm"), dev)
        for s in ("device", "server")
    )


def _t(a):
    import tvm

    return tvm.runtime.tensor(np.asarray(a), tvm.cpu())


def split_step(vms, spec, values, x, y):
    """One training step through the raw functions, no update: ``(loss, grads by param name,
    new running stats by name)``."""
    vd, vs = vms
    nc, nr = len(spec.cut), len(spec.residuals)
    out = list(
        vd["device_forward"](
            _t(x), *[_t(values[n]) for n in spec.device_params + spec.device_state]
        )
    )
    cut, res, dstate = out[:nc], out[nc : nc + nr], out[nc + nr :]
    sargs = cut + [_t(values[n]) for n in spec.server_params + spec.server_state]
    o = list(vs["server_step"](*sargs, _t(y)))
    ng = sum(c.grad for c in spec.cut)
    ns = len(spec.server_params)
    grads = dict(zip(spec.server_params, [a.numpy() for a in o[1 + ng : 1 + ng + ns]]))
    gd = list(vd["device_backward"](*res, *o[1 : 1 + ng])) if spec.device_params else []
    grads |= dict(zip(spec.device_params, [a.numpy() for a in gd]))
    stats = dict(zip(spec.device_state, [a.numpy() for a in dstate]))
    stats |= dict(zip(spec.server_state, [a.numpy() for a in o[1 + ng + ns :]]))
    return float(o[0].numpy()), grads, stats


def split_infer(vms, spec, values, x):
    vd, vs = vms
    cut = list(
        vd["device_infer"](_t(x), *[_t(values[n]) for n in spec.device_params + spec.device_state])
    )
    out = vs["server_infer"](*cut, *[_t(values[n]) for n in spec.server_params + spec.server_state])
    return [a.numpy() for a in out]


def torch_name(name: str) -> str:
    """ONNX/TVM parameter name -> PyTorch state_dict key (both use dots after the import)."""
    return name


def torch_step(model, x, y):
    """Loss and gradients (by state_dict key) of one cross-entropy step in PyTorch."""
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
