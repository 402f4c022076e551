"""Stable names for the vars of a Relax function: the link between IR and OpGraph.

AnnotateCosts names ops and tensors with these names, SplitModule finds them again with the
same function, so a Plan (which holds only names) maps back to the IR exactly.
Names are the vars' ``name_hint``; a repeated hint gets ``_1``, ``_2``... in program order
(parameters first, then bindings).
"""

from __future__ import annotations

from tvm import relax

__all__ = ["binding_names"]


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
