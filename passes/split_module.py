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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.expr_functor import PyExprMutator, mutator

from splitc import BuildError, UnsupportedError
from splitc.passes.naming import binding_names
from splitc.passes.plan import Plan
from splitc.passes import training as T

__all__ = ["SplitModule", "SplitSpec", "split_module", "check_split"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class SplitSpec:
    """Argument orders of the emitted functions (plain data, written to the manifests)."""

    plan_id: str
    cut: tuple  # CutTensor, plan order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: TensorSpec | None
    device_params: tuple[str, ...]  # trainable, in argument order
    device_state: tuple[str, ...]  # running stats
    server_params: tuple[str, ...]
    server_state: tuple[str, ...]
    residuals: tuple[TensorSpec, ...]
    loss: str
    optimizer: str
    lr: float
    recompute: bool
    opt_state: dict = field(default_factory=dict)  # side -> list of numpy arrays
    objective: str = "training"

    def side_json(self, side: str) -> dict:
        d = {"plan_id": self.plan_id, "cut": [c.to_json() for c in self.cut],
             "params": list(getattr(self, f"{side}_params")),
             "state": list(getattr(self, f"{side}_state")),
             "optimizer": self.optimizer, "lr": self.lr, "loss": self.loss}
        train = self.objective == "training"
        if side == "device":
            d.update(inputs=[t.to_json() for t in self.inputs],
                     residuals=[t.to_json() for t in self.residuals], recompute=self.recompute,
                     functions=(["device_forward", "device_backward"] if train else [])
                     + (["device_update"] if train and self.device_params else [])
                     + ["device_infer"])
        else:
            d.update(outputs=[t.to_json() for t in self.outputs],
                     labels=self.labels.to_json() if self.labels else None,
                     functions=(["server_step"] if train else [])
                     + (["server_update"] if train and self.server_params else [])
                     + ["server_infer"])
        d["objective"] = self.objective
        return d


def _tspec(name: str, ty) -> TensorSpec:
    return TensorSpec(name, tuple(int(d) for d in ty.shape), str(ty.dtype))


@mutator
class _Subst(PyExprMutator):
    def __init__(self, vmap):
        super().__init__()
        self.vmap = vmap

    def visit_var_(self, v):  # noqa: D102
        return self.vmap.get(v, v)

    def visit_dataflow_var_(self, v):  # noqa: D102
        return self.vmap.get(v, v)


def _emit_all(bb, bindings, vmap) -> None:
    sub = _Subst(vmap)
    for b in bindings:
        vmap[b.var] = bb.emit(sub.visit_expr(b.value), name_hint=b.var.name)


class _Halves:
    """Which bindings of ``main`` each side runs (analysis only, no IR built)."""

    def __init__(self, main: relax.Function, plan: Plan):
        blocks = main.body.blocks
        if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
            raise BuildError("SplitModule: main must hold exactly one dataflow block; run "
                             "relax.transform.ConvertToDataflow after the import")
        self.main = main
        self.bindings = list(blocks[0].bindings)
        n_in = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else 1
        self.inputs, self.weights = list(main.params[:n_in]), list(main.params[n_in:])
        names = binding_names(main)
        self.by_name = {n: v for v, n in names.items()}
        unknown = sorted(plan.placement.device - set(self.by_name))
        if unknown:
            raise BuildError(f"SplitModule: plan places unknown ops {unknown[:5]} on the device; "
                             "the plan was made for another model or import, re-run splitc plan")
        tainted = set(self.inputs)
        self.side: dict[relax.Var, str] = {}
        for b in self.bindings:
            fv = relax.analysis.free_vars(b.value)
            if not any(v in tainted for v in fv):
                self.side[b.var] = "weight"  # weight prep: emitted on each side that reads it
                continue
            tainted.add(b.var)
            if isinstance(b.value, relax.TupleGetItem):
                self.side[b.var] = self.side[b.value.tuple_value]
            else:
                self.side[b.var] = "device" if names[b.var] in plan.placement.device else "server"
        self.cut = []
        for c in plan.cut:
            if c.name not in self.by_name:
                raise BuildError(f"SplitModule: cut tensor {c.name!r} is not in the model; "
                                 "the plan was made for another model, re-run splitc plan")
            self.cut.append(self.by_name[c.name])
        ret = main.body.body
        self.outputs = list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]

    def take(self, side: str, roots: list) -> list:
        """Bindings of ``side`` (plus the weight prep they read) that ``roots`` depend on."""
        defs = {b.var: b for b in self.bindings}
        need, stack = set(), list(roots)
        while stack:
            v = stack.pop()
            if v in need or v not in defs:
                continue
            s = self.side[v]
            if s not in (side, "weight"):
                continue  # arrives across the cut
            need.add(v)
            stack.extend(relax.analysis.free_vars(defs[v].value))
        return [b for b in self.bindings if b.var in need]

    def bn_stats(self, bindings) -> list:
        """(tuple var, index) of the running mean/var each training batch norm updates."""
        out = []
        for b in bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op == T._BATCH_NORM and bool(v.attrs.training):
                out += [(b.var, 1), (b.var, 2)]
        return out


def _params_read(bindings, extra, candidates) -> list:
    used = set(extra)
    for b in bindings:
        used.update(relax.analysis.free_vars(b.value))
    return [p for p in candidates if p in used]


def _build_side(h: _Halves, side: str, plan: Plan, loss: str, training: bool, name: str):
    """One Relax function for one side's forward (+ loss on the server); returns
    ``(function, inputs, trainable params, state params, cut params, labels var)``."""
    if side == "device":
        roots, outs = list(h.cut), list(h.cut)
    else:
        roots, outs = list(h.outputs), list(h.outputs)
    bindings = h.take(side, roots)
    stats = h.bn_stats(bindings) if training else []
    state_names = set(T.running_stat_params(h.main))
    weights = _params_read(bindings, roots, h.weights)
    trainable = [p for p in weights if p.name not in state_names]
    state = [p for p in weights if p.name in state_names]
    vmap, params = {}, []
    inputs = [p for p in h.inputs if side == "device"]
    for p in inputs + trainable + state:
        vmap[p] = relax.Var(p.name, p.ty)
        params.append(vmap[p])
    cut_params = []
    if side == "server":
        for c, v in zip(plan.cut, h.cut):
            vmap[v] = relax.Var(c.name, v.ty)
            cut_params.append(vmap[v])
        params = cut_params + params
    labels = None
    if side == "server" and training:
        lty = T.label_ty(loss, h.outputs[0].ty)
        if lty is not None:
            labels = relax.Var("labels", lty)
            params.append(labels)
    bb = relax.BlockBuilder()
    with bb.function(name, params):
        with bb.dataflow():
            _emit_all(bb, bindings, vmap)
            res = [vmap.get(o, o) for o in outs]
            if side == "server" and training:
                res = [bb.emit(T.make_loss(loss, res[0], labels), name_hint="loss")]
            res += [bb.emit(relax.TupleGetItem(vmap[t], i)) for t, i in stats]
            # Gradient wants the return to be a literal Tuple of non-dataflow vars
            outv = [bb.emit_output(r) for r in res]
        bb.emit_func_output(relax.Tuple(outv))
    mod = bb.get()
    mod = T.DecomposeForTraining(training)(mod)
    return mod[name], inputs, trainable, state, cut_params, labels


def _grad(func: relax.Function, name: str, wrt: list, where: str):
    """Adjoint of ``func`` (target = first output) w.r.t. the params at positions ``wrt``."""
    func = func.with_attr("global_symbol", name)
    gvars = [func.params[i] for i in wrt]
    T.check_gradients(func, gvars, where, target=func.body.body.fields[0])
    mod = tvm.IRModule({name: func})
    try:
        mod = relax.transform.Gradient(name, gvars, target_index=0)(mod)
    except Exception as e:  # noqa: BLE001 - TVM raises InternalError, ValueError...
        raise UnsupportedError(f"Gradient: {where}: {str(e).splitlines()[-1]}; simplify the "
                               "model or register the missing gradient") from None
    return mod[name + "_adjoint"]


def _flat_call(name: str, callee: relax.Function, callee_name: str, pick) -> tvm.IRModule:
    """Module with ``callee`` and ``name(params) = flatten(callee(params))`` picking ``pick``
    = [(i, j)]: element j of element i of the callee's nested result."""
    bb = relax.BlockBuilder()
    gv = bb.add_func(callee.with_attr("global_symbol", callee_name), callee_name)
    ps = [relax.Var(p.name, p.ty) for p in callee.params]
    with bb.function(name, ps):
        r = bb.emit(relax.Call(gv, ps))
        outs = []
        for i, j in pick:
            x = bb.emit(relax.TupleGetItem(r, i))
            outs.append(bb.emit(relax.TupleGetItem(x, j)))
        bb.emit_func_output(relax.Tuple(outs))
    return bb.get()


def _closure(roots, defs, allowed) -> set:
    need, stack = set(), list(roots)
    while stack:
        v = stack.pop()
        if v in need or v not in defs or v not in allowed:
            continue
        need.add(v)
        stack.extend(relax.analysis.free_vars(defs[v].value))
    return need


def _function(name, params, bindings, vmap, outs) -> relax.Function:
    bb = relax.BlockBuilder()
    with bb.function(name, params):
        with bb.dataflow():
            _emit_all(bb, bindings, vmap)
            res = [bb.emit_output(vmap.get(o, o)) for o in outs]
        bb.emit_func_output(relax.Tuple(res))
    return bb.get()[name]


def _device_functions(h: _Halves, plan: Plan, recompute: bool):
    """device_forward / device_backward (see module docstring) and their specs."""
    fwd, inputs, train, state, _, _ = _build_side(h, "device", plan, "", True, "dev_fwd")
    n_in, n_tr, n_st = len(inputs), len(train), len(state)
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
            _emit_all(bb, fwd.body.blocks[0].bindings, vmap)
            outs = [vmap.get(o, o) for o in fwd.body.body.fields]
            terms = [bb.emit(R.sum(R.multiply(outs[i], g))) for i, g in zip(gcut, gs)]
            sur = terms[0]
            for t in terms[1:]:
                sur = bb.emit(R.add(sur, t))
            res = [bb.emit_output(sur)] + [bb.emit_output(o) for o in outs]
        bb.emit_func_output(relax.Tuple(res))
    sur_fn = bb.get()["dev_sur"]
    adj = _grad(sur_fn, "dev_sur", list(range(n_in, n_in + n_tr)), "device half")
    aparams = list(adj.params)
    gvars = aparams[len(aparams) - len(gcut):]
    binds = list(adj.body.blocks[0].bindings)
    defs = {b.var: b for b in binds}
    dep_g = set(gvars)
    for b in binds:
        if any(v in dep_g for v in relax.analysis.free_vars(b.value)):
            dep_g.add(b.var)
    fields = adj.body.body.fields
    fwd_outs, grad_outs = list(fields[0].fields[1:]), list(fields[1].fields)
    allowed = set(defs) if recompute else dep_g
    bwd_set = _closure(grad_outs, defs, allowed)
    free = []
    for v in grad_outs + [fv for b in binds if b.var in bwd_set
                          for fv in relax.analysis.free_vars(b.value)]:
        if v not in bwd_set and v not in gvars and v not in free:
            free.append(v)
    order = {v: i for i, v in enumerate(aparams + [b.var for b in binds])}
    residuals = sorted(free, key=order.__getitem__)
    fwd_set = _closure(fwd_outs + residuals, defs, set(defs) - dep_g)
    fparams = [relax.Var(p.name, p.ty) for p in aparams[: len(aparams) - len(gcut)]]
    vmap = dict(zip(aparams, fparams))
    dfwd = _function("device_forward", fparams, [b for b in binds if b.var in fwd_set], vmap,
                     fwd_outs[:ncut] + residuals + fwd_outs[ncut:])
    rparams = [relax.Var(f"r{i}_{v.name}", v.ty) for i, v in enumerate(residuals)]
    gparams = [relax.Var(g.name, g.ty) for g in gvars]
    vmap = dict(zip(residuals, rparams)) | dict(zip(gvars, gparams))
    dbwd = _function("device_backward", rparams + gparams,
                     [b for b in binds if b.var in bwd_set], vmap, grad_outs)
    rspec = tuple(_tspec(v.name, v.ty) for v in residuals)
    return dfwd, dbwd, inputs, train, state, rspec


def _server_functions(h: _Halves, plan: Plan, loss: str):
    f, _, train, state, cut_params, labels = _build_side(h, "server", plan, loss, True, "srv")
    gcut = [i for i, c in enumerate(plan.cut) if c.grad]
    ncut = len(plan.cut)
    wrt = gcut + list(range(ncut, ncut + len(train)))
    if not wrt:
        raise BuildError("SplitModule: nothing to train on the server (no parameters and no "
                         "cut gradients); check the plan's placement")
    adj = _grad(f, "server_loss", wrt, "server half")
    n_stats = len(f.ret_ty.fields) - 1
    pick = [(0, 0)] + [(1, j) for j in range(len(wrt))] + [(0, 1 + k) for k in range(n_stats)]
    m = _flat_call("server_step", adj, "server_loss_adjoint", pick)
    return m, train, state, labels


def _update(side: str, params, optimizer: str, lr: float):
    if not params:
        return None, []
    return T.make_optimizer(optimizer, lr, [relax.Var(p.name, p.ty) for p in params],
                            f"{side}_update")


def _check_opaque(main: relax.Function) -> None:
    names = binding_names(main)
    left = [f"{b.value.args[0].name_hint} ({names[b.var]})" for blk in main.body.blocks
            for b in blk.bindings if isinstance(b.value, relax.Call) and b.value.op == T._CALL_TIR]
    if left:
        raise UnsupportedError(f"SplitModule: opaque kernels {', '.join(left[:5])} from the "
                               "importer cannot be split or differentiated; export the model "
                               "with plain ONNX ops")


def split_module(mod: tvm.IRModule, plan: Plan, *, loss: str = "cross-entropy",
                 optimizer: str = "sgd", lr: float = 0.01, recompute: bool = False
                 ) -> tuple[tvm.IRModule, SplitSpec]:
    """The functions of the module docstring, and the spec of their argument orders.

    An inference plan gets ``device_infer`` and ``server_infer`` only."""
    if plan.tied_weights:
        raise UnsupportedError(f"SplitModule: weights {list(plan.tied_weights)[:3]} are read on "
                               "both sides; re-plan with --tied-policy pin")
    if loss not in T.LOSSES:
        raise BuildError(f"SplitModule: unknown loss {loss!r}; use one of {', '.join(T.LOSSES)}")
    if optimizer not in T.OPTIMIZERS:
        raise BuildError(f"SplitModule: unknown optimizer {optimizer!r}; use one of "
                         f"{', '.join(T.OPTIMIZERS)}")
    mod = T.LiftOpaqueElementwise()(mod)
    _check_opaque(mod["main"])
    h = _Halves(mod["main"], plan)
    if plan.objective == "inference":
        return _inference_split(h, plan)
    dfwd, dbwd, inputs, dtrain, dstate, rspec = _device_functions(h, plan, recompute)
    out, strain, sstate, labels = _server_functions(h, plan, loss)
    dinf = _build_side(h, "device", plan, loss, False, "device_infer")[0]
    sinf = _build_side(h, "server", plan, loss, False, "server_infer")[0]
    funcs = {"device_forward": dfwd, "device_backward": dbwd, "device_infer": dinf,
             "server_infer": sinf}
    opt_state = {}
    for side, params in (("device", dtrain), ("server", strain)):
        f, st = _update(side, params, optimizer, lr)
        if f is not None:
            funcs[f"{side}_update"] = f
        opt_state[side] = st
    for k, v in funcs.items():  # server_step calls server_loss_adjoint: keep out's GlobalVars
        out[k] = v.with_attr("global_symbol", k)
    spec = SplitSpec(
        plan_id=plan.plan_id, cut=plan.cut,
        inputs=tuple(_tspec(p.name, p.ty) for p in inputs),
        outputs=tuple(_tspec(f"output{i}", o.ty) for i, o in enumerate(h.outputs)),
        labels=_tspec("labels", labels.ty) if labels is not None else None,
        device_params=tuple(p.name for p in dtrain), device_state=tuple(p.name for p in dstate),
        server_params=tuple(p.name for p in strain), server_state=tuple(p.name for p in sstate),
        residuals=rspec, loss=loss, optimizer=optimizer, lr=float(lr), recompute=recompute,
        opt_state=opt_state)
    check_split(out, spec)
    return out, spec


def _inference_split(h: _Halves, plan: Plan) -> tuple[tvm.IRModule, SplitSpec]:
    server_made = {v for v in h.outputs if h.side.get(v) == "server"}
    if set(h.outputs) - server_made - set(h.cut):
        raise BuildError("SplitModule: an inference plan with model outputs made on the device "
                         "has nothing to run on the server; compile it as device-only")
    dinf, inputs, dtrain, dstate, _, _ = _build_side(h, "device", plan, "", False,
                                                     "device_infer")
    sinf, _, strain, sstate, _, _ = _build_side(h, "server", plan, "", False, "server_infer")
    out = tvm.IRModule({"device_infer": dinf.with_attr("global_symbol", "device_infer"),
                        "server_infer": sinf.with_attr("global_symbol", "server_infer")})
    spec = SplitSpec(
        plan_id=plan.plan_id, cut=plan.cut,
        inputs=tuple(_tspec(p.name, p.ty) for p in inputs),
        outputs=tuple(_tspec(f"output{i}", o.ty) for i, o in enumerate(h.outputs)),
        labels=None, device_params=tuple(p.name for p in dtrain),
        device_state=tuple(p.name for p in dstate), server_params=tuple(p.name for p in strain),
        server_state=tuple(p.name for p in sstate), residuals=(), loss="", optimizer="",
        lr=0.0, recompute=False, objective="inference")
    check_split(out, spec)
    return out, spec


def _ty_of(ty) -> tuple:
    return tuple(int(d) for d in ty.shape), str(ty.dtype)


def check_split(mod: tvm.IRModule, spec: SplitSpec) -> None:
    """Invariants after the split; ``BuildError`` naming the function that breaks one."""
    helper = {gv: f for gv, f in mod.functions.items() if gv.name_hint == "server_loss_adjoint"}
    for gv, f in mod.functions.items():
        try:  # 0.27 raises on an ill-formed module (older versions returned False)
            ok = relax.analysis.well_formed(tvm.IRModule({**helper, gv: f}))
        except Exception as e:  # noqa: BLE001
            ok, why = False, str(e).splitlines()[-1]
        else:
            why = "well_formed returned False"
        if ok is False:
            raise BuildError(f"SplitModule: {gv.name_hint} is not well formed ({why}); report a "
                             "bug")
    want = [(tuple(c.shape), c.dtype) for c in spec.cut]
    names = {gv.name_hint for gv in mod.functions}
    for fname in [f for f in ("device_forward", "device_infer") if f in names]:
        got = [_ty_of(t) for t in mod[fname].ret_ty.fields[: len(want)]]
        if got != want:
            raise BuildError(f"SplitModule: {fname} sends {got}, the plan's transport spec says "
                             f"{want}; the plan does not match this model")
    for fname in [f for f in ("server_step", "server_infer") if f in names]:
        f = mod[fname]
        got = [(p.name, *_ty_of(p.ty)) for p in f.params[: len(want)]]
        exp = [(c.name, tuple(c.shape), c.dtype) for c in spec.cut]
        if got != exp:
            raise BuildError(f"SplitModule: {fname} receives {got}, the plan's transport spec "
                             f"says {exp}; the plan does not match this model")
    if "server_step" not in names:
        return
    ng = sum(c.grad for c in spec.cut)
    gdown = [_ty_of(t) for t in mod["server_step"].ret_ty.fields[1: 1 + ng]]
    if gdown != [w for w, c in zip(want, spec.cut) if c.grad]:
        raise BuildError(f"SplitModule: server_step returns cut gradients {gdown} that do not "
                         "match the grad=True cut tensors; report a bug")


@tvm.transform.module_pass(opt_level=0, name="SplitModule")
class SplitModule:
    """Module pass form of :func:`split_module` (the spec is recomputed by the builder)."""

    def __init__(self, plan: Plan, loss: str = "cross-entropy", optimizer: str = "sgd",
                 lr: float = 0.01, recompute: bool = False):
        self.plan, self.loss, self.optimizer, self.lr = plan, loss, optimizer, lr
        self.recompute = recompute

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return split_module(mod, self.plan, loss=self.loss, optimizer=self.optimizer,
                            lr=self.lr, recompute=self.recompute)[0]
