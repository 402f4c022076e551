"""IR plumbing for SplitModule: which bindings each side runs, and building its functions.

Private helpers of ``passes/split_module.py`` (kept apart so the pass stays readable):
``Halves`` classifies the bindings of ``main`` by side, ``build_side`` emits one side's
forward (with the loss on the server) as a one-dataflow-block function ready for
``Gradient``, ``grad`` differentiates it after checking every op has a gradient, and
``function`` / ``closure`` / ``flat_call`` rebuild functions from a subset of bindings.
"""

from __future__ import annotations

import tvm
from splitc import BuildError, UnsupportedError
from splitc.passes import training as T
from splitc.passes.naming import binding_names
from splitc.passes.plan import Plan
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def ident(name: str) -> str:
    """A var name that stays a C identifier in generated kernels: TVM turns ``0.weight``
    (an nn.Sequential weight) into buffers such as ``0_weight_shared``, which nvcc rejects."""
    return f"w_{name}" if name[:1].isdigit() else name


__all__ = [
    "Halves",
    "build_side",
    "closure",
    "emit_all",
    "flat_call",
    "function",
    "grad",
    "ident",
]


@mutator
class _Subst(PyExprMutator):
    def __init__(self, vmap):
        super().__init__()
        self.vmap = vmap

    def visit_var_(self, v):
        return self.vmap.get(v, v)

    def visit_dataflow_var_(self, v):
        return self.vmap.get(v, v)


def emit_all(bb, bindings, vmap) -> None:
    sub = _Subst(vmap)
    for b in bindings:
        vmap[b.var] = bb.emit(sub.visit_expr(b.value), name_hint=b.var.name)


class Halves:
    """Which bindings of ``main`` each side runs (analysis only, no IR built)."""

    def __init__(self, main: relax.Function, plan: Plan):
        blocks = main.body.blocks
        if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
            raise BuildError(
                "SplitModule: main must hold exactly one dataflow block; run "
                "relax.transform.ConvertToDataflow after the import"
            )
        self.main = main
        self.bindings = list(blocks[0].bindings)
        n_in = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else 1
        self.inputs, self.weights = list(main.params[:n_in]), list(main.params[n_in:])
        names = binding_names(main)
        self.by_name = {n: v for v, n in names.items()}
        unknown = sorted(plan.placement.device - set(self.by_name))
        if unknown:
            raise BuildError(
                f"SplitModule: plan places unknown ops {unknown[:5]} on the device; "
                "the plan was made for another model or import, re-run splitc plan"
            )
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
                raise BuildError(
                    f"SplitModule: cut tensor {c.name!r} is not in the model; "
                    "the plan was made for another model, re-run splitc plan"
                )
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


def params_read(bindings, extra, candidates) -> list:
    used = set(extra)
    for b in bindings:
        used.update(relax.analysis.free_vars(b.value))
    return [p for p in candidates if p in used]


def build_side(h: Halves, side: str, plan: Plan, loss: str, training: bool, name: str):
    """One Relax function for one side's forward (+ loss on the server); returns
    ``(function, inputs, trainable params, state params, cut params, labels var)``."""
    if side == "device":
        roots, outs = list(h.cut), list(h.cut)
    else:
        roots, outs = list(h.outputs), list(h.outputs)
    bindings = h.take(side, roots)
    stats = h.bn_stats(bindings) if training else []
    state_names = set(T.running_stat_params(h.main))
    weights = params_read(bindings, roots, h.weights)
    trainable = [p for p in weights if p.name not in state_names]
    state = [p for p in weights if p.name in state_names]
    vmap, params = {}, []
    inputs = [p for p in h.inputs if side == "device"]
    for p in inputs + trainable + state:
        vmap[p] = relax.Var(ident(p.name), p.ty)
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
            emit_all(bb, bindings, vmap)
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


def grad(func: relax.Function, name: str, wrt: list, where: str):
    """Adjoint of ``func`` (target = first output) w.r.t. the params at positions ``wrt``."""
    func = func.with_attr("global_symbol", name)
    gvars = [func.params[i] for i in wrt]
    T.check_gradients(func, gvars, where, target=func.body.body.fields[0])
    mod = tvm.IRModule({name: func})
    try:
        mod = relax.transform.Gradient(name, gvars, target_index=0)(mod)
    except Exception as e:  # noqa: BLE001 - TVM raises InternalError, ValueError...
        raise UnsupportedError(
            f"Gradient: {where}: {str(e).splitlines()[-1]}; simplify the "
            "model or register the missing gradient"
        ) from None
    return mod[name + "_adjoint"]


def flat_call(name: str, callee: relax.Function, callee_name: str, pick) -> tvm.IRModule:
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


def closure(roots, defs, allowed) -> set:
    need, stack = set(), list(roots)
    while stack:
        v = stack.pop()
        if v in need or v not in defs or v not in allowed:
            continue
        need.add(v)
        stack.extend(relax.analysis.free_vars(defs[v].value))
    return need


def function(name, params, bindings, vmap, outs) -> relax.Function:
    bb = relax.BlockBuilder()
    with bb.function(name, params):
        with bb.dataflow():
            emit_all(bb, bindings, vmap)
            res = [bb.emit_output(vmap.get(o, o)) for o in outs]
        bb.emit_func_output(relax.Tuple(res))
    return bb.get()[name]
