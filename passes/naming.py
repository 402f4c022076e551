"""Stable names for the vars of a Relax function: the link between IR and OpGraph.

AnnotateCosts names ops and tensors with these names, SplitModule finds them again with the
same function, so a Plan (which holds only names) maps back to the IR exactly.
Names are the vars' ``name_hint``; a repeated hint gets ``_1``, ``_2``... in program order
(parameters first, then bindings). ``tag_ops`` renames main's binding vars ``TAG + name`` so
that the training passes' own ``lv<N>`` vars can never be taken for an op
(``passes/provenance.py``).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["TAG", "binding_names", "tag_ops"]

TAG = "op__"  # tag_ops' prefix of main's binding vars


def _hint(var: relax.Var) -> str:
    # TVM 0.27 renamed ``Var.name_hint`` to ``Var.name``; accept both.
    return getattr(var, "name", None) or getattr(var, "name_hint", None) or "v"


def binding_names(func: relax.Function) -> dict[relax.Var, str]:
    names: dict[relax.Var, str] = {}
    used: dict[str, int] = {}

    def name(var: relax.Var) -> None:
        hint = _hint(var)
        if hint in used:
            used[hint] += 1
            hint = f"{hint}_{used[hint]}"
            while hint in used:  # a hint that already looked like "x_1"
                used[hint.rsplit("_", 1)[0]] += 1
                hint = f"{_hint(var)}_{used[_hint(var)]}"
        used.setdefault(hint, 0)
        names[var] = hint

    for p in func.params:
        name(p)
    body = func.body
    if isinstance(body, relax.SeqExpr):
        for block in body.blocks:
            for b in block.bindings:
                name(b.var)
    return names


def tag_ops(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every binding var of ``main`` renamed ``TAG + its op name`` (its
    ``binding_names`` name); the IR is otherwise identical, and so are its kernels. The
    training passes name new bindings ``lv<N>`` (DecomposeForTraining's batch-norm pieces,
    Gradient's intermediates), which collide with an importer's ``lv<N>``: with the tag, a
    forward var of the training step names its op exactly. Tag before planning and splitting,
    then match ops by name without the tag (``provenance.Trace.sites`` accepts graphs of
    either module)."""
    main = mod["main"]
    names = binding_names(main)
    binds = {b.var for blk in main.body.blocks for b in blk.bindings}
    out = mod.clone()
    out["main"] = _Rename({v: TAG + n for v, n in names.items() if v in binds}).visit_expr(main)
    return out


@mutator
class _Rename(PyExprMutator):
    def __init__(self, names: dict):
        super().__init__()
        self.names, self.new = names, {}

    def _def(self, v, cls):
        if v in self.names and v not in self.new:
            self.new[v] = cls(self.names[v], v.ty)
        return self.new.get(v, v)

    def visit_var_def_(self, v):
        return self._def(v, relax.Var)

    def visit_dataflow_var_def_(self, v):
        return self._def(v, relax.DataflowVar)

    def visit_var_(self, v):
        return self.new.get(v, v)

    def visit_dataflow_var_(self, v):
        return self.new.get(v, v)
