"""SplitModule: from the imported ``main`` and a Plan to device and server training functions.

Runs after ``passes/frontend.py: load_onnx`` (``main`` with one dataflow block, parameters as
function inputs, ``num_input`` attr) and ``passes/partition.py: solve``; before
``passes/build.py`` (which compiles the ``device_*`` and ``server_*`` functions separately).

Worked example (tests/passes/test_split_module.py builds it). A four-op model
``x -> dense(w1) -> relu -> dense(w2) -> softmax``, ``main(x, w1, w2)`` with::

    lv = matmul(x, w1); lv1 = relu(lv); lv2 = matmul(lv1, w2); gv = softmax(lv2)

with ``Placement.of({"lv", "lv1"})`` crosses one tensor, ``Plan.cut == (lv1,)`` (grad=True: it
depends on ``w1``). The module gets::

    device_forward(x, w1)            -> (lv1, residuals...)        # cut first, plan order
    device_backward(residuals..., g_lv1) -> (grad_w1,)
    device_update((w1,), (grad_w1,), opt_state) -> ((w1',), opt_state')
    device_infer(x, w1)              -> (lv1,)
    server_step(lv1, w2, labels)     -> (loss, g_lv1, grad_w2)
    server_update((w2,), (grad_w2,), opt_state) -> ((w2',), opt_state')
    server_infer(lv1, w2)            -> (gv,)

Across the boundary, in ``Plan.cut`` order: up, the cut tensors (then the labels); down, the
gradients of the cut tensors with ``grad=True`` in the same relative order. Batch-norm running
stats are non-trainable state: after the trainable parameters in the argument lists, and their
new values last in ``device_forward`` / ``server_step`` outputs.

How the device backward is found: ``Gradient`` of the surrogate ``sum_i sum(cut_i * g_i)``
(its gradient w.r.t. ``θd`` is exactly the vector-Jacobian product ``J^T g``); the adjoint's
bindings that do not depend on any ``g_i`` are the forward (``device_forward``), the rest the
backward; forward values the backward reads are the residuals. ``recompute=True`` keeps only the
inputs as residuals and recomputes the forward inside ``device_backward``.

The IR plumbing is in ``passes/split_halves.py``; ``SplitSpec`` and the invariants re-checked
after the split (``check_split``) in ``passes/split_spec.py``.
"""

from __future__ import annotations

import tvm
from splitc import BuildError, InputError, UnsupportedError
from splitc.passes import training as T
from splitc.passes.naming import binding_names
from splitc.passes.plan import Plan
from splitc.passes.split_halves import (
    Halves,
    build_side,
    closure,
    emit_all,
    flat_call,
    function,
    grad,
    ident,
)
from splitc.passes.split_spec import SplitSpec, check_split, tensor_spec
from tvm import relax
from tvm.relax import op as R

__all__ = ["SplitModule", "SplitSpec", "check_split", "split_module"]

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _device_functions(h: Halves, plan: Plan, recompute: bool):
    """device_forward / device_backward (see module docstring) and their specs."""
    fwd, inputs, train, state, _, _ = build_side(h, "device", plan, "", True, "dev_fwd")
    n_in, n_tr = len(inputs), len(train)
    gcut = [i for i, c in enumerate(plan.cut) if c.grad]
    ncut = len(plan.cut)
    if not train or not gcut:  # nothing to differentiate on the device
        f = fwd.with_attr("global_symbol", "device_forward")
        bb = relax.BlockBuilder()
        gs = [relax.Var(f"g_{plan.cut[i].name}", f.ret_ty.fields[i]) for i in gcut]
        with bb.function("device_backward", gs):
            bb.emit_func_output(relax.Tuple([]))
        return f, bb.get()["device_backward"], inputs, train, state, ()
    # surrogate(inputs, θ, state, g) = (sum_i sum(cut_i * g_i), cut..., stats...)
    bb = relax.BlockBuilder()
    ps = [relax.Var(p.name, p.ty) for p in fwd.params]
    gs = [relax.Var(f"g_{plan.cut[i].name}", fwd.ret_ty.fields[i]) for i in gcut]
    with bb.function("dev_sur", ps + gs):
        with bb.dataflow():
            vmap = dict(zip(fwd.params, ps))
            emit_all(bb, fwd.body.blocks[0].bindings, vmap)
            outs = [vmap.get(o, o) for o in fwd.body.body.fields]
            terms = [bb.emit(R.sum(R.multiply(outs[i], g))) for i, g in zip(gcut, gs)]
            sur = terms[0]
            for t in terms[1:]:
                sur = bb.emit(R.add(sur, t))
            res = [bb.emit_output(sur)] + [bb.emit_output(o) for o in outs]
        bb.emit_func_output(relax.Tuple(res))
    sur_fn = bb.get()["dev_sur"]
    adj = grad(sur_fn, "dev_sur", list(range(n_in, n_in + n_tr)), "device half")
    aparams = list(adj.params)
    gvars = aparams[len(aparams) - len(gcut) :]
    binds = list(adj.body.blocks[0].bindings)
    defs = {b.var: b for b in binds}
    dep_g = set(gvars)
    for b in binds:
        if any(v in dep_g for v in relax.analysis.free_vars(b.value)):
            dep_g.add(b.var)
    fields = adj.body.body.fields
    fwd_outs, grad_outs = list(fields[0].fields[1:]), list(fields[1].fields)
    allowed = set(defs) if recompute else dep_g
    bwd_set = closure(grad_outs, defs, allowed)
    free = []
    for v in grad_outs + [
        fv for b in binds if b.var in bwd_set for fv in relax.analysis.free_vars(b.value)
    ]:
        if v not in bwd_set and v not in gvars and v not in free:
            free.append(v)
    order = {v: i for i, v in enumerate(aparams + [b.var for b in binds])}
    residuals = sorted(free, key=order.__getitem__)
    fwd_set = closure(fwd_outs + residuals, defs, set(defs) - dep_g)
    fparams = [relax.Var(p.name, p.ty) for p in aparams[: len(aparams) - len(gcut)]]
    vmap = dict(zip(aparams, fparams))
    dfwd = function(
        "device_forward",
        fparams,
        [b for b in binds if b.var in fwd_set],
        vmap,
        fwd_outs[:ncut] + residuals + fwd_outs[ncut:],
    )
    rparams = [relax.Var(f"r{i}_{v.name}", v.ty) for i, v in enumerate(residuals)]
    gparams = [relax.Var(g.name, g.ty) for g in gvars]
    vmap = dict(zip(residuals, rparams)) | dict(zip(gvars, gparams))
    dbwd = function(
        "device_backward",
        rparams + gparams,
        [b for b in binds if b.var in bwd_set],
        vmap,
        grad_outs,
    )
    rspec = tuple(tensor_spec(v.name, v.ty) for v in residuals)
    return dfwd, dbwd, inputs, train, state, rspec


def _server_functions(h: Halves, plan: Plan, loss: str):
    f, _, train, state, _, labels = build_side(h, "server", plan, loss, True, "srv")
    gcut = [i for i, c in enumerate(plan.cut) if c.grad]
    ncut = len(plan.cut)
    wrt = gcut + list(range(ncut, ncut + len(train)))
    if not wrt:
        raise BuildError(
            "SplitModule: nothing to train on the server (no parameters and no "
            "cut gradients); check the plan's placement"
        )
    adj = grad(f, "server_loss", wrt, "server half")
    n_stats = len(f.ret_ty.fields) - 1
    pick = [(0, 0)] + [(1, j) for j in range(len(wrt))] + [(0, 1 + k) for k in range(n_stats)]
    m = flat_call("server_step", adj, "server_loss_adjoint", pick)
    return m, train, state, labels


def _update(side: str, params, optimizer: str, lr: float):
    if not params:
        return None, []
    return T.make_optimizer(
        optimizer, lr, [relax.Var(ident(p.name), p.ty) for p in params], f"{side}_update"
    )


def _check_opaque(main: relax.Function) -> None:
    names = binding_names(main)
    left = [
        f"{b.value.args[0].name_hint} ({names[b.var]})"
        for blk in main.body.blocks
        for b in blk.bindings
        if isinstance(b.value, relax.Call) and b.value.op == _CALL_TIR
    ]
    if left:
        raise UnsupportedError(
            f"SplitModule: opaque kernels {', '.join(left[:5])} from the "
            "importer cannot be split or differentiated; export the model "
            "with plain ONNX ops"
        )


def split_module(
    mod: tvm.IRModule,
    plan: Plan,
    *,
    loss: str = "cross-entropy",
    optimizer: str = "sgd",
    lr: float = 0.01,
    recompute: bool = False,
) -> tuple[tvm.IRModule, SplitSpec]:
    """The functions of the module docstring, and the spec of their argument orders.

    An inference plan gets ``device_infer`` and ``server_infer`` only."""
    if plan.tied_weights:
        raise UnsupportedError(
            f"SplitModule: weights {list(plan.tied_weights)[:3]} are read on "
            "both sides; re-plan with --tied-weights pin"
        )
    if loss not in T.LOSSES:
        raise InputError(f"SplitModule: unknown loss {loss!r}; use one of {', '.join(T.LOSSES)}")
    if optimizer not in T.OPTIMIZERS:
        raise InputError(
            f"SplitModule: unknown optimizer {optimizer!r}; use one of {', '.join(T.OPTIMIZERS)}"
        )
    mod = T.LiftOpaqueElementwise()(mod)
    _check_opaque(mod["main"])
    h = Halves(mod["main"], plan)
    if plan.objective == "inference":
        return _inference_split(h, plan)
    dfwd, dbwd, inputs, dtrain, dstate, rspec = _device_functions(h, plan, recompute)
    out, strain, sstate, labels = _server_functions(h, plan, loss)
    dinf = build_side(h, "device", plan, loss, False, "device_infer")[0]
    sinf = build_side(h, "server", plan, loss, False, "server_infer")[0]
    funcs = {
        "device_forward": dfwd,
        "device_backward": dbwd,
        "device_infer": dinf,
        "server_infer": sinf,
    }
    opt_state = {}
    for side, params in (("device", dtrain), ("server", strain)):
        f, st = _update(side, params, optimizer, lr)
        if f is not None:
            funcs[f"{side}_update"] = f
        opt_state[side] = st
    for k, v in funcs.items():  # server_step calls server_loss_adjoint: keep out's GlobalVars
        out[k] = v.with_attr("global_symbol", k)
    spec = SplitSpec(
        plan_id=plan.plan_id,
        cut=plan.cut,
        inputs=tuple(tensor_spec(p.name, p.ty) for p in inputs),
        outputs=tuple(tensor_spec(f"output{i}", o.ty) for i, o in enumerate(h.outputs)),
        labels=tensor_spec("labels", labels.ty) if labels is not None else None,
        device_params=tuple(p.name for p in dtrain),
        device_state=tuple(p.name for p in dstate),
        server_params=tuple(p.name for p in strain),
        server_state=tuple(p.name for p in sstate),
        residuals=rspec,
        loss=loss,
        optimizer=optimizer,
        lr=float(lr),
        recompute=recompute,
        opt_state=opt_state,
    )
    check_split(out, spec)
    return out, spec


def _inference_split(h: Halves, plan: Plan) -> tuple[tvm.IRModule, SplitSpec]:
    server_made = {v for v in h.outputs if h.side.get(v) == "server"}
    if set(h.outputs) - server_made - set(h.cut):
        raise BuildError(
            "SplitModule: an inference plan with model outputs made on the device "
            "has nothing to run on the server; compile it as device-only"
        )
    dinf, inputs, dtrain, dstate, _, _ = build_side(h, "device", plan, "", False, "device_infer")
    sinf, _, strain, sstate, _, _ = build_side(h, "server", plan, "", False, "server_infer")
    out = tvm.IRModule(
        {
            "device_infer": dinf.with_attr("global_symbol", "device_infer"),
            "server_infer": sinf.with_attr("global_symbol", "server_infer"),
        }
    )
    spec = SplitSpec(
        plan_id=plan.plan_id,
        cut=plan.cut,
        inputs=tuple(tensor_spec(p.name, p.ty) for p in inputs),
        outputs=tuple(tensor_spec(f"output{i}", o.ty) for i, o in enumerate(h.outputs)),
        labels=None,
        device_params=tuple(p.name for p in dtrain),
        device_state=tuple(p.name for p in dstate),
        server_params=tuple(p.name for p in strain),
        server_state=tuple(p.name for p in sstate),
        residuals=(),
        loss="",
        optimizer="",
        lr=0.0,
        recompute=False,
        objective="inference",
    )
    check_split(out, spec)
    return out, spec


@tvm.transform.module_pass(opt_level=0, name="SplitModule")
class SplitModule:
    """Module pass form of :func:`split_module` (the spec is recomputed by the builder)."""

    def __init__(
        self,
        plan: Plan,
        loss: str = "cross-entropy",
        optimizer: str = "sgd",
        lr: float = 0.01,
        recompute: bool = False,
    ):
        self.plan, self.loss, self.optimizer, self.lr = plan, loss, optimizer, lr
        self.recompute = recompute

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return split_module(
            mod,
            self.plan,
            loss=self.loss,
            optimizer=self.optimizer,
            lr=self.lr,
            recompute=self.recompute,
        )[0]
