"""AnnotateCosts: Relax ``main`` -> ``OpGraph`` with per-side costs. No IR mutation.

Runs after ``passes/frontend.py`` (one dataflow block, weights as parameters after the first
``num_input`` inputs, static shapes) and before the partition solver, which sees only the
``OpGraph`` it stores on the pass instance (``AnnotateCosts(...).graph``).

Every binding of the dataflow block is classified (names from ``passes/naming.py``, contract
in ``passes/opgraph.py``):

- op: a Call of a Relax op that reads at least one activation -> one ``OpNode``; a
  tuple-producing op (``batch_norm``, ``split``) owns the tensors its ``TupleGetItem``
  bindings define;
- weight prep: every input is a parameter, a constant or weight prep (``permute_dims(W)``)
  -> folded into ``weight_prep`` of each op reading it, its parameters into ``params``;
- free: constants, shapes, and calls reading only constants (no activation, no parameter)
  -> cost nothing and never become tensors (the split recomputes them on the side needing
  them);
- transparent: var aliases and ``R.tuple`` forward what they hold.

Costs: ``device.op_cost`` and ``server.op_cost`` of each op's ``OpFeatures`` (FLOPs and bytes
from ``passes/op_rules.py``). A weight's optimizer update is charged to its first reader only
(``param_bytes``): a tied weight read at both ends of GPT-2 is updated once per step; when its
readers land on different sides the plan charges the per-step weight sync instead
(``passes/plan.py``), which is far larger than the second update.

In training the loss (``cross-entropy`` on logits with int64 labels of shape
``logits.shape[:-1]``, or ``mse`` with labels shaped like the output) runs on the server: its
cost is ``loss_server`` and its labels are ``OpGraph.labels``.
"""

from __future__ import annotations

import hashlib
import math

import tvm
from tvm import relax

from splitc import InputError, UnsupportedError
from splitc.cost_models.base import CostModel, OpFeatures
from splitc.passes import compat, op_rules
from splitc.passes.naming import binding_names
from splitc.passes.opgraph import OpGraph, OpNode, Param, Tensor, dtype_bytes

__all__ = ["AnnotateCosts", "annotate_costs", "LOSSES"]

LOSSES = ("cross-entropy", "mse", "none")
_OPAQUE = ("relax.call_tir", "relax.call_dps_packed", "relax.call_tir_with_grad")


@tvm.transform.module_pass(opt_level=0, name="AnnotateCosts")
class AnnotateCosts:
    """Build the cost-annotated ``OpGraph`` of ``mod["main"]``; the module passes unchanged.

    ``buffers``: parameter names that are state, not weights (batch-norm running stats,
    ``ModelInfo.buffers``): read by their op but never updated by the optimizer.
    """

    def __init__(self, device: CostModel, server: CostModel, loss: str = "cross-entropy",
                 labels_dtype: str = "int64", model_hash: str = "", name: str = "",
                 buffers=frozenset()):
        if loss not in LOSSES:
            raise InputError(f"AnnotateCosts: unknown loss {loss!r}; use one of {LOSSES}")
        self.device, self.server = device, server
        self.loss, self.labels_dtype = loss, labels_dtype
        self.model_hash, self.name, self.buffers = model_hash, name, frozenset(buffers)
        self.graph: OpGraph | None = None

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            raise InputError("AnnotateCosts: the module has no 'main' function; import the "
                             "model with passes.frontend.load_onnx")
        func = mod["main"]
        c = _Collector(func, self.buffers)
        c.run()
        ops = []
        for n in c.ops:
            f = n.features
            ops.append(OpNode(n.name, n.op, n.inputs, tuple(n.outputs), n.params, n.weight_prep, f,
                              self.device.op_cost(f), self.server.op_cost(f)))
        labels, loss_cost = (), None
        tensors = c.tensor_table()
        if self.loss != "none":
            labels, loss_f = self._loss(c, tensors)
            loss_cost = self.server.op_cost(loss_f)
        model_hash = self.model_hash or _structural_hash(func)
        kw = {"loss_server": loss_cost} if loss_cost is not None else {}
        self.graph = OpGraph(
            name=self.name or "main", ops=tuple(ops), tensors=tensors,
            params=c.param_table(), inputs=tuple(c.inputs), outputs=tuple(c.outputs),
            labels=labels, model_hash=model_hash,
            cost_model=f"device={self.device.name}; server={self.server.name}",
            meta={"loss": self.loss, "buffers": sorted(self.buffers & set(c.params))}, **kw)
        return mod

    def _loss(self, c: "_Collector", tensors: dict[str, Tensor]):
        if not c.outputs:
            raise InputError("AnnotateCosts: the model has no tensor output to train on")
        out = tensors[c.outputs[0]]
        shape, n = out.shape, math.prod(out.shape)
        name = "labels" if "labels" not in tensors else "labels_"
        if self.loss == "cross-entropy":
            if len(shape) < 1:
                raise InputError(f"AnnotateCosts: cross-entropy needs logits with a class dim, "
                                 f"output {out.name!r} is a scalar; use --loss mse")
            lab = Tensor(name, tuple(shape[:-1]), self.labels_dtype, None)
            # log_softmax 5n + log per row + pick label, negate, mean over rows: 5n + 3 rows
            flops = 5 * n + 3 * math.prod(shape[:-1])
        else:
            lab = Tensor(name, tuple(shape), out.dtype, None)
            flops = 3 * n  # subtract, square, accumulate (+ one divide)
        in_bytes = out.nbytes + lab.nbytes
        f = OpFeatures(op=f"loss.{self.loss}", flops=flops, bytes_read=in_bytes,
                       bytes_written=out.nbytes, param_bytes=0,
                       in_shapes=(shape, lab.shape), out_shapes=((),), dtype=out.dtype,
                       has_params=False, input_grad=True)
        return (lab,), f


def annotate_costs(mod: tvm.IRModule, device: CostModel, server: CostModel,
                   loss: str = "cross-entropy", **kw) -> OpGraph:
    """Run ``AnnotateCosts`` and return its ``OpGraph``."""
    p = AnnotateCosts(device, server, loss=loss, **kw)
    p(mod)
    return p.graph


def _structural_hash(func) -> str:
    return hashlib.sha256(str(compat.structural_hash(func)).encode()).hexdigest()


class _Op:
    __slots__ = ("name", "op", "inputs", "outputs", "params", "weight_prep", "features")

    def __init__(self, name, op):
        self.name, self.op = name, op
        self.inputs, self.outputs, self.params, self.weight_prep = (), [], (), ()
        self.features = None


class _Collector:
    """Walks ``main``'s dataflow block into plain data (no IR is kept after ``run``)."""

    def __init__(self, func: relax.Function, buffers: frozenset[str]):
        self.func, self.buffers = func, buffers
        self.names = binding_names(func)
        self.ops: list[_Op] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.params: dict[str, tuple[tuple[int, ...], str]] = {}
        self.readers: dict[str, list[str]] = {}
        self._shape: dict[str, tuple[tuple[int, ...], str]] = {}
        self._producer: dict[str, str | None] = {}
        self._consumers: dict[str, list[str]] = {}
        # what each var holds: ("act", [tensor names]) | ("weight", params, prep) | ("free",)
        self.val: dict[relax.Var, tuple] = {}
        self._tuple_owner: dict[relax.Var, _Op] = {}
        self._tuples: dict[relax.Var, relax.Tuple] = {}
        self._taint: set[str] = set()  # ops whose outputs depend on a trainable weight

    # -- entry -------------------------------------------------------------------------------
    def run(self) -> None:
        f = self.func
        n_in = compat.func_num_inputs(f)
        for i, p in enumerate(f.params):
            name = self.names[p]
            ty = compat.expr_ty(p)
            shape = self._static(ty, name)
            if i < n_in:
                self.inputs.append(name)
                self._add_tensor(name, shape, compat.tensor_dtype(ty), None)
                self.val[p] = ("act", [name])
            else:
                self.params[name] = (shape, compat.tensor_dtype(ty))
                self.readers[name] = []
                self.val[p] = ("weight", (name,), ())
        body = f.body
        if not isinstance(body, relax.SeqExpr):
            raise UnsupportedError("AnnotateCosts: main's body is not a SeqExpr; normalise it")
        for block in body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                raise UnsupportedError(
                    "AnnotateCosts: main has a non-dataflow block (control flow or side "
                    "effects, e.g. ONNX If); only pure dataflow models are supported")
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    raise UnsupportedError(f"AnnotateCosts: unsupported binding "
                                           f"{type(b).__name__} for {self.names[b.var]!r}")
                self._binding(b.var, b.value)
        for t in self._flatten(body.body):
            if t not in self.outputs:
                self.outputs.append(t)

    # -- helpers -----------------------------------------------------------------------------
    def _static(self, ty, name: str) -> tuple[int, ...]:
        s = compat.static_shape(ty)
        if s is None:
            raise InputError(f"AnnotateCosts: {name!r} has a symbolic shape "
                             f"{compat.tensor_shape(ty)}; pass --input-shapes with static dims")
        return s

    def _add_tensor(self, name, shape, dtype, producer) -> None:
        self._shape[name] = (shape, dtype)
        self._producer[name] = producer
        self._consumers[name] = []

    def _value_of(self, expr) -> tuple:
        if isinstance(expr, relax.Var):
            if expr in self._tuple_owner:  # an op's tuple result used whole
                return ("act", list(self._tuple_owner[expr].outputs))
            return self.val.get(expr, ("free",))
        if isinstance(expr, relax.Tuple):
            acts, params, prep, weight = [], [], [], False
            for e in expr.fields:
                v = self._value_of(e)
                if v[0] == "act":
                    acts += v[1]
                elif v[0] == "weight":
                    weight = True
                    params += v[1]
                    prep += v[2]
            if acts:
                return ("act", acts, tuple(params), tuple(prep))
            if weight:
                return ("weight", tuple(dict.fromkeys(params)), tuple(dict.fromkeys(prep)))
            return ("free",)
        return ("free",)  # Constant, ShapeExpr, PrimValue, StringImm

    def _flatten(self, expr) -> list[str]:
        v = self._value_of(expr)
        return list(v[1]) if v[0] == "act" else []

    # -- one binding ---------------------------------------------------------------------------
    def _binding(self, var: relax.Var, value) -> None:
        name = self.names[var]
        if isinstance(value, relax.TupleGetItem):
            owner = self._tuple_owner.get(value.tuple_value) if isinstance(
                value.tuple_value, relax.Var) else None
            if owner is not None:  # element of an op's tuple result: the op owns it
                ty = compat.expr_ty(var)
                if compat.is_tensor_ty(ty):
                    self._add_tensor(name, self._static(ty, name), compat.tensor_dtype(ty),
                                     owner.name)
                    owner.outputs.append(name)
                    self.val[var] = ("act", [name])
                else:
                    self.val[var] = ("free",)
                return
            src = self._value_of(value.tuple_value)
            if src[0] == "act":
                # element of an R.tuple of activations: transparent when it is a plain tuple
                tv = value.tuple_value
                inner = self._resolve_tuple(tv)
                if inner is not None:
                    self.val[var] = self._value_of(inner.fields[value.index])
                    return
                raise UnsupportedError(f"AnnotateCosts: cannot resolve tuple element {name!r}")
            if src[0] == "weight":
                self.val[var] = ("weight", src[1], src[2] + (name,))
            else:
                self.val[var] = ("free",)
            return
        if isinstance(value, (relax.Var, relax.Tuple)):
            self.val[var] = self._value_of(value)  # alias / R.tuple: transparent
            if isinstance(value, relax.Tuple):
                self._tuples[var] = value
            return
        if not isinstance(value, relax.Call):
            self.val[var] = ("free",)  # constants, shapes, prim values
            return
        if not compat.is_op_call(value):
            raise UnsupportedError(
                f"AnnotateCosts: binding {name!r} calls {value.op}, which is not a Relax op; "
                "only models of Relax ops can be costed and split")
        if compat.call_op_name(value) in _OPAQUE:
            kernel = getattr(value.args[0], "name_hint", value.args[0])
            raise UnsupportedError(
                f"AnnotateCosts: binding {name!r} is an opaque TIR kernel ({kernel}) with no "
                "FLOP rule and no gradient; the ONNX importer lowers some ops this way (Clip, "
                "Pad or Tile with bounds computed at run time): re-export them with constants")
        acts, params, prep = [], [], []
        for a in value.args:
            v = self._value_of(a)
            if v[0] == "act":
                acts += v[1]
                if len(v) > 2:
                    params += v[2]
                    prep += v[3]
            elif v[0] == "weight":
                params += v[1]
                prep += v[2]
        out_ty = compat.expr_ty(var)
        if not (compat.is_tensor_ty(out_ty) or compat.is_tuple_ty(out_ty)):
            self.val[var] = ("free",)  # shape_of and friends: shapes are free
            return
        if not acts:
            if params:
                self.val[var] = ("weight", tuple(dict.fromkeys(params)),
                                 tuple(dict.fromkeys(prep)) + (name,))
            else:
                self.val[var] = ("free",)
            return
        self._op(var, name, value, list(dict.fromkeys(acts)), tuple(dict.fromkeys(params)),
                 tuple(dict.fromkeys(prep)))

    def _resolve_tuple(self, expr):
        if isinstance(expr, relax.Tuple):
            return expr
        return self._tuples.get(expr)

    def _op(self, var, name, call, acts, params, prep) -> None:
        op = _Op(name, compat.call_op_name(call))
        op.inputs, op.params, op.weight_prep = tuple(acts), params, prep
        for t in acts:
            if name not in self._consumers[t]:
                self._consumers[t].append(name)
        for p in params:
            self.readers[p].append(name)
        ty = compat.expr_ty(var)
        if compat.is_tuple_ty(ty):
            self._tuple_owner[var] = op
            self.val[var] = ("act", [])  # filled by its TupleGetItem bindings
            out_tys = compat.tuple_fields(ty)
        else:
            self._add_tensor(name, self._static(ty, name), compat.tensor_dtype(ty), name)
            op.outputs.append(name)
            self.val[var] = ("act", [name])
            out_tys = [ty]
        op.features = self._features(op, call, out_tys)
        self.ops.append(op)

    def _features(self, op: _Op, call, out_tys) -> OpFeatures:
        args = []
        for a in call.args:
            ty = compat.expr_ty(a)
            if compat.is_tensor_ty(ty):
                args.append(op_rules.Arg(self._static(ty, op.name), compat.tensor_dtype(ty)))
            elif isinstance(a, relax.Tuple) or compat.is_tuple_ty(ty):
                for fty in compat.tuple_fields(ty):  # concat's tuple of tensors
                    if compat.is_tensor_ty(fty):
                        args.append(op_rules.Arg(self._static(fty, op.name),
                                                 compat.tensor_dtype(fty)))
            else:
                args.append(None)
        outs = tuple(op_rules.Arg(self._static(t, op.name), compat.tensor_dtype(t))
                     for t in out_tys if compat.is_tensor_ty(t))
        info = op_rules.CallInfo(op.op, op.name, tuple(args), outs, call.attrs)
        cnt = op_rules.count(call.op, info)
        trainable = [p for p in op.params if p not in self.buffers]
        # the first reader owns a weight and pays its update (readers are in program order)
        owned = [p for p in trainable if self.readers[p][0] == op.name]
        pbytes = sum(math.prod(self.params[p][0]) * dtype_bytes(self.params[p][1])
                     for p in owned)
        dtype = outs[0].dtype if outs else "float32"
        return OpFeatures(
            op=op.op, flops=cnt.flops, bytes_read=cnt.bytes_read,
            bytes_written=cnt.bytes_written, param_bytes=pbytes,
            in_shapes=tuple(a.shape for a in args if a is not None),
            out_shapes=tuple(o.shape for o in outs), dtype=dtype,
            has_params=bool(trainable), input_grad=self._input_grad(op, trainable))

    def _input_grad(self, op: _Op, trainable) -> bool:
        # an activation input needs a gradient iff it is float and depends on a trainable
        # weight (same rule as opgraph.needs_grad): taint ops in program order
        tainted = [t for t in op.inputs if self._producer[t] in self._taint]
        if trainable or tainted:
            self._taint.add(op.name)
        return any(self._shape[t][1].startswith(("float", "bfloat")) for t in tainted)

    # -- results -------------------------------------------------------------------------------
    def tensor_table(self) -> dict[str, Tensor]:
        outs = set(self.outputs)
        return {n: Tensor(n, s, d, self._producer[n], tuple(self._consumers[n]), n in outs)
                for n, (s, d) in self._shape.items()}

    def param_table(self) -> dict[str, Param]:
        return {n: Param(n, s, d, tuple(dict.fromkeys(self.readers[n])))
                for n, (s, d) in self.params.items()}
