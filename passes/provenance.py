"""Which planner op each compiled kernel came from: per-binding provenance through fusion.

The planner prices ops (``OpGraph``: one op per Relax binding of ``main``, named after its
var); calibration times kernels (each ``call_tir`` of the scheduled training step). Between
the two, the gradient pass adds the backward bindings, ``cpu_graph_rewrites`` and
``LegalizeOps`` replace and add bindings, and ``FuseOps``/``FuseTIR`` merge several bindings
into one kernel (``fused_conv2d_add_relu``). TVM does not carry provenance through those
passes, but it keeps Relax ``Var`` objects: a legalized binding keeps its var, and a fused
function keeps the vars of the bindings it took in, except its output (``gv``), which is
recovered here by matching the ``call_tir`` (same PrimFunc, same arguments).

``trace()`` is a context manager: build the module inside it exactly as the build does (it
records, through a ``PassInstrument``, the module before ``FuseOps`` and before ``FuseTIR``);
``Trace.sites(source, scheduled, graph)`` then returns one ``Site`` per ``call_tir`` of the
scheduled module, in program order, with the ``Part`` s it fused: which op owns each, in which role,
and its FLOPs and bytes (to share a fused kernel's time between its parts).

Owners, per binding of the module before fusion (``_owners``):
- forward region (before the first ``*_adjoint`` var): the op named after the var, the op
  whose output tensor or weight preparation it is (``OpNode.outputs``, ``weight_prep``); a
  binding that depends on a model output is the loss's (``LOSS``);
- backward region: the op ``Y`` whose adjoint ``Y_adjoint`` it reads (Gradient emits each op's
  backward as bindings that read its output's adjoint);
- update functions (``*_update``): the op owning the parameter ``P`` read as ``P`` or
  ``P_grad``;
- any other binding (rewrites' and legalization's new bindings, Gradient's intermediates
  such as ``less(x, 0)`` for ReLU): the owner of its first consumer, else of its first
  producer. None is left only for bindings no op reaches (the optimizer's step counter).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod

import tvm
from splitc.passes.naming import TAG, binding_names, tag_ops
from splitc.passes.split_halves import ident
from tvm import relax, tirx

__all__ = ["LOSS", "TAG", "Part", "Site", "Trace", "tag_ops", "trace"]

LOSS = "<loss>"  # owner of the loss's bindings (the loss is no planner op)
_ADJ = "_adjoint"


@dataclass(frozen=True)
class Part:
    """One Relax binding inside a kernel."""

    owner: str | None  # planner op name, LOSS, or None (no op reaches it)
    role: str  # forward, backward, update
    flops: float
    nbytes: int  # bytes read and written by the binding's own PrimFunc


@dataclass(frozen=True)
class Site:
    """One ``call_tir`` of the scheduled module (one kernel launch per step)."""

    function: str
    symbol: str
    parts: tuple[Part, ...]

    def to_json(self) -> dict:
        """Plain data for ``cost_models/attribute.py`` (which does not import passes)."""
        return {"function": self.function, "symbol": self.symbol,
                "parts": [[p.owner, p.role, p.flops, p.nbytes] for p in self.parts]}


class Trace:
    """Modules recorded during one build (``trace()``)."""

    def __init__(self) -> None:
        self.before_fuse: tvm.IRModule | None = None
        self.before_fuse_tir: tvm.IRModule | None = None

    def sites(self, source: tvm.IRModule, scheduled: tvm.IRModule, graph) -> list[Site]:
        """One Site per ``call_tir`` of every Relax function of ``scheduled``, the module the
        traced build made from ``source``, in function and program order. ``graph``: the
        OpGraph of the model, of the module before or after ``tag_ops`` (owners are named
        without the tag either way)."""
        if self.before_fuse is None or self.before_fuse_tir is None:
            raise RuntimeError("Provenance: the traced build ran no FuseOps/FuseTIR; build "
                               "the module inside trace()")
        pre, mid = self.before_fuse, self.before_fuse_tir
        named = {}  # by name, in the module the build started from
        gn = _GraphNames(graph)
        for gv, f in _relax_functions(source):
            named.update(_owners(gv.name_hint, f, gn))
        owners = {}  # carried by var identity, and propagated to the bindings added since
        for _, f in _relax_functions(pre):
            binds = _bindings(f)
            owners.update(_propagate(binds, {b.var: named[b.var] for b in binds
                                             if b.var in named}))
        flops = _Flops(pre)
        index = _CallIndex(pre, mid)
        out = []
        for gv, f in _relax_functions(scheduled):
            fused = index.fused(mid, gv.name_hint)
            for b in _bindings(f):
                if not _is_call_tir(b.value):
                    continue
                if b.var in owners:
                    parts = (_part(b, owners, flops),)
                elif b.var in fused:
                    parts = tuple(_part(x, owners, flops) for x in fused[b.var])
                else:
                    parts = (Part(None, "forward", 0.0, 0),)
                out.append(Site(gv.name_hint, b.value.args[0].name_hint, parts))
        return out


@contextmanager
def trace():
    """Record the modules before ``FuseOps`` and ``FuseTIR`` of the build run inside."""
    t = Trace()

    @tvm.ir.instrument.pass_instrument
    class _Record:
        def run_before_pass(self, mod, info):
            if info.name == "FuseOps":
                t.before_fuse = mod
            elif info.name == "FuseTIR":
                t.before_fuse_tir = mod

    ctx = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=ctx.opt_level, config=ctx.config,
                                   instruments=[*ctx.instruments, _Record()]):
        yield t


# -- owners ----------------------------------------------------------------------------------
def _relax_functions(mod: tvm.IRModule):
    """(GlobalVar, Function) of the module's Relax functions with a body of bindings."""
    return [(gv, f) for gv, f in mod.functions.items()
            if isinstance(f, relax.Function) and isinstance(f.body, relax.SeqExpr)]


def _bindings(f: relax.Function):
    return [b for blk in f.body.blocks for b in blk.bindings]


def _is_call_tir(v) -> bool:
    return isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
        v.op.name == "relax.call_tir"


def _vars_in(expr) -> list:
    found: list = []
    relax.analysis.post_order_visit(
        expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
    return found


def _c_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _graph_name(name: str, tagged: bool) -> str | None:
    """The OpGraph name a forward var of a training function stands for: its own name, less
    ``TAG`` in a tagged module (where untagged vars are the training passes' own, None), and
    less the ``__d`` of DecomposeForTraining's pieces (``lv3__d``: a piece of op ``lv3``)."""
    if tagged:
        if not name.startswith(TAG):
            return None
        name = name[len(TAG):]
    return name.split("__d")[0] if "__d" in name else name


class _GraphNames:
    """The OpGraph's names as the training functions spell them, computed once per graph;
    a graph of the tagged module has its names without the tag."""

    def __init__(self, graph) -> None:
        def plain(name: str) -> str:
            return name.removeprefix(TAG)

        self.ops = {plain(op.name): plain(op.name) for op in graph.ops}
        for op in graph.ops:
            for t in (*op.outputs, *op.weight_prep):
                self.ops.setdefault(plain(t), plain(op.name))
        self.by_param = {}  # the optimizer names parameters as split_halves.ident, dots "_"
        for op in graph.ops:
            for p in op.params:
                self.by_param.setdefault(_c_name(ident(p)), plain(op.name))
        self.model_out = {plain(t.name) for t in graph.tensors.values() if t.is_output}


def _owners(fname: str, f: relax.Function, gn: _GraphNames) -> dict:
    """Owner (op name, LOSS or None) and role of every binding var of one function of the
    module the build started from (its names are the training passes' own, unchanged)."""
    names, by_param, model_out = gn.ops, gn.by_param, gn.model_out
    binds = _bindings(f)
    tagged = any(b.var.name.startswith(TAG) for b in binds)
    unique = binding_names(f)  # AnnotateCosts' names: the forward copy of main gets main's
    role = "update" if fname.endswith("_update") else "forward"
    owner: dict = {}
    roles: dict = {}
    lossy: set = set()  # forward vars that depend on a model output
    fwd_names: dict = {}  # forward var name -> var (Gradient names adjoints after them)
    for b in binds:
        if role == "forward" and b.var.name.endswith(_ADJ):
            role = "backward"
        roles[b.var] = role
        ins = _reads(b)
        name = b.var.name
        if role == "forward":
            fwd_names.setdefault(name, b.var)
            name = _graph_name(unique[b.var], tagged)
            if name in names:
                owner[b.var] = names[name]
            elif any(_graph_name(v.name, tagged) in model_out or v in lossy for v in ins):
                lossy.add(b.var)
                owner[b.var] = LOSS
        elif role == "backward":
            for v in ins:
                if v.name.endswith(_ADJ):
                    y = fwd_names.get(v.name[: -len(_ADJ)])
                    if y is not None and owner.get(y) is not None:
                        owner[b.var] = owner[y]
                        break
        else:
            base = next((name[: -len(s)] for s in ("_grad", "_new") if name.endswith(s)),
                        name)
            if _c_name(base) in by_param:
                owner[b.var] = by_param[_c_name(base)]
    return _propagate(binds, {v: (o, roles[v]) for v, o in owner.items()}, roles)


def _reads(b) -> list:
    return [v for v in _vars_in(b.value) if v is not b.var]


def _propagate(binds: list, seeds: dict, roles: dict | None = None) -> dict:
    """Owners and roles for every binding from ``seeds`` (var -> (owner, role)): the rest
    take the first consumer's owner (Gradient's intermediates, rewrites' and legalization's
    new bindings), in reverse order so chains resolve; then the first producer's; repeated
    while that settles more (a running-stat update reads only buffers, and its consumer gets
    its owner from a producer). A var without a role (``roles``) takes the role of the
    binding before it."""
    owner = {v: o for v, (o, _) in seeds.items() if o is not None}
    if roles is None:
        roles, last = {}, "forward"
        for b in binds:
            last = roles[b.var] = seeds[b.var][1] if b.var in seeds else last
    reads = {b.var: _reads(b) for b in binds}
    consumers: dict = {}
    for b in binds:
        for v in reads[b.var]:
            consumers.setdefault(v, []).append(b.var)
    changed = True
    while changed:
        changed = False
        for b in reversed(binds):
            if owner.get(b.var) is None:
                o = next((owner[c] for c in consumers.get(b.var, ())
                          if owner.get(c) is not None), None)
                if o is not None:
                    owner[b.var], changed = o, True
        for b in binds:
            if owner.get(b.var) is None:
                o = next((owner[v] for v in reads[b.var] if owner.get(v) is not None), None)
                if o is not None:
                    owner[b.var], changed = o, True
    return {b.var: (owner.get(b.var), roles[b.var]) for b in binds}


# -- fused kernels back to bindings ----------------------------------------------------------
class _CallIndex:
    """Recovers the original bindings of each fused call. Bindings of the module before
    fusion are keyed by (PrimFunc name, arguments); an argument read from a tuple (the
    optimizer's ``params[0]``, which FuseOps binds to new vars) is keyed by tuple and index,
    and the output of an earlier fused call by the original var it replaced."""

    def __init__(self, pre: tvm.IRModule, mid: tvm.IRModule) -> None:
        self.items = {**_tuple_items(pre), **_tuple_items(mid)}
        self.alias: dict = {}  # fused call var (mid) -> original output var(s) (pre)
        self.by_key: dict = {}
        self.known: set = set()
        for _, f in _relax_functions(pre):
            for b in _bindings(f):
                self.known.add(b.var)
                if _is_call_tir(b.value):
                    self.by_key.setdefault(self._key(b.value, {}), b)

    def _key(self, call, subst: dict) -> tuple:
        def canon(a):
            a = subst.get(a, a)  # a fused function's parameter: the caller's argument
            if not isinstance(a, relax.Var):
                return None  # a constant (FuseOps may pass one as a parameter)
            if a in self.items:
                t, i = self.items[a]
                t = self.alias.get(t, t)
                return t[i] if isinstance(t, tuple) else (canon(t), i)
            return self.alias.get(a, a)

        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        # TVM objects hash and compare by node, so the vars themselves are the key
        return call.args[0].name_hint, tuple(canon(a) for a in args)

    def fused(self, mid: tvm.IRModule, fname: str) -> dict:
        """Call var -> the original bindings it fused, for every call of function ``fname``
        to a fused function, in program order (so earlier outputs alias before use)."""
        out: dict = {}
        f = next((f for gv, f in _relax_functions(mid) if gv.name_hint == fname), None)
        for b in _bindings(f) if f is not None else ():
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar) and \
                    isinstance(mid[v.op], relax.Function):
                out[b.var] = self._resolve(b.var, mid[v.op], list(v.args))
        return out

    def _resolve(self, var, func: relax.Function, args: list) -> list:
        subst = {p: a for p, a in zip(func.params, args)}
        found, out = {}, []
        for b in _bindings(func):
            if not _is_call_tir(b.value):
                continue
            # by key first: a fused function FuseOps shares between two identical call
            # sites keeps the vars of the first site only
            orig = self.by_key.get(self._key(b.value, subst))
            if orig is None and b.var in self.known:
                orig = b
            out.append(orig if orig is not None else b)
            if orig is not None:
                subst[b.var] = found[b.var] = orig.var
        ret = func.body.body
        if isinstance(ret, relax.Tuple):
            self.alias[var] = tuple(found.get(x, x) for x in ret.fields)
        elif isinstance(ret, relax.Var):
            self.alias[var] = found.get(ret, ret)
        return out


def _tuple_items(mod: tvm.IRModule) -> dict:
    """var -> (tuple var, index) of every ``x = t[i]`` binding of the module's Relax functions."""
    out = {}
    for _, f in _relax_functions(mod):
        for b in _bindings(f):
            if isinstance(b.value, relax.TupleGetItem) and \
                    isinstance(b.value.tuple_value, relax.Var):
                out[b.var] = (b.value.tuple_value, int(b.value.index))
    return out


class _Flops:
    """FLOPs of the PrimFuncs of the module before fusion (cached per PrimFunc)."""

    def __init__(self, pre: tvm.IRModule) -> None:
        self.pre, self.cache = pre, {}

    def __call__(self, name: str) -> float:
        if name not in self.cache:
            from tvm.s_tir.analysis import estimate_tir_flops

            try:
                f = self.pre[name]
                self.cache[name] = float(estimate_tir_flops(tvm.IRModule({name: f}))) \
                    if isinstance(f, tirx.PrimFunc) else 0.0
            except Exception:  # noqa: BLE001 - opaque extern calls have no estimate
                self.cache[name] = 0.0
        return self.cache[name]


def _nbytes(ty) -> int:
    if hasattr(ty, "fields"):
        return sum(_nbytes(t) for t in ty.fields)
    try:
        bits = int("".join(c for c in str(ty.dtype) if c.isdigit()) or 8)
        return prod(int(d) for d in ty.shape) * max(bits // 8, 1)
    except (TypeError, AttributeError, ValueError):
        return 0


def _part(b, owners: dict, flops: _Flops) -> Part:
    call = b.value
    args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
    nbytes = sum(_nbytes(a.ty) for a in args) + _nbytes(call.ty_args[0])
    owner, role = owners.get(b.var, (None, "forward"))
    return Part(owner, role, flops(call.args[0].name_hint), nbytes)
