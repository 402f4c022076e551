"""Human-readable renderings of plans: the table ``splitc plan`` prints and the Graphviz dot.

All formatting of costs lives here (costs are exact Fractions in the library).
"""

from __future__ import annotations

from splitc.passes.opgraph import OpGraph
from splitc.passes.plan import Plan

__all__ = [
    "comparison_table",
    "format_bytes",
    "format_seconds",
    "plan_dot",
    "plan_report_json",
    "plan_table",
]


def format_seconds(s) -> str:
    s = float(s)
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def format_bytes(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def plan_table(plan: Plan, graph: OpGraph) -> str:
    n_dev = len(plan.placement.device)
    lines = [
        f"model {plan.model}  objective {plan.objective}  algorithm {plan.algorithm}  "
        f"plan {plan.plan_id}",
        f"device {plan.device_profile}  server {plan.server_profile}  "
        f"uplink {plan.link.uplink * 8 / 1e6:g} Mbps  downlink {plan.link.downlink * 8 / 1e6:g} Mbps"
        f"  latency {format_seconds(plan.link.latency)}",
        f"ops: {n_dev} on device, {len(graph.ops) - n_dev} on server",
        "",
        "cut tensors (transport order):",
    ]
    for i, c in enumerate(plan.cut):
        grad = "grad back" if c.grad else "no grad"
        lines.append(f"  [{i}] {c.name:<24} {list(c.shape)!s:<20} {c.dtype:<8} "
                     f"{format_bytes(c.nbytes):>10}  {grad}")
    if plan.tied_weights:
        lines.append(f"tied weights ({plan.tied_policy}): {', '.join(plan.tied_weights)}")
    b = plan.breakdown
    lines += ["", "predicted delay per step:"]
    for k in ("device", "uplink", "server", "downlink", "fixed"):
        lines.append(f"  {k:<9} {format_seconds(getattr(b, k)):>12}")
    lines.append(f"  {'total':<9} {format_seconds(b.total):>12}")
    for n in plan.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def comparison_table(best: Plan, comparison: dict[str, Plan]) -> str:
    ref = best.total
    rows = ["algorithm      total          device         link           server    vs chosen",
            "-" * 86]
    for name, p in sorted(comparison.items(), key=lambda kv: kv[1].total):
        b = p.breakdown
        delta = "" if p.total == 0 else f"{float((p.total - ref) / p.total) * 100:+.1f}%"
        rows.append(f"{name:<14} {format_seconds(b.total):>12}  {format_seconds(b.device):>12}  "
                    f"{format_seconds(b.uplink + b.downlink + b.fixed):>12}  "
                    f"{format_seconds(b.server):>12}   {delta:>8}")
    rows.append("(vs chosen: how much the chosen plan reduces each algorithm's delay)")
    return "\n".join(rows)


def plan_report_json(plan: Plan, graph: OpGraph, comparison: dict[str, Plan]) -> dict:
    """What `splitc plan --json` writes: the plan, every baseline, and the whole graph."""
    return {
        "plan": plan.to_json(),
        "comparison": {k: v.to_json() for k, v in comparison.items()},
        "graph": graph.to_json(),
    }


def plan_dot(plan: Plan, graph: OpGraph) -> str:
    """Graphviz: device ops blue, server ops orange, cut tensors as red bold edges."""
    cut = {c.name for c in plan.cut}
    out = ["digraph splitc {", "  rankdir=TB; node [shape=box, style=filled, fontsize=10];"]
    for name in graph.inputs:
        out.append(f'  "{name}" [shape=ellipse, fillcolor="#cfe2ff", label="{name}"];')
    for op in graph.ops:
        color = "#cfe2ff" if op.name in plan.placement.device else "#ffe5cc"
        short = op.op.rsplit(".", 1)[-1]
        out.append(f'  "{op.name}" [fillcolor="{color}", label="{op.name}\\n{short}"];')
    for t in graph.tensors.values():
        src = t.producer or t.name
        for c in t.consumers:
            style = ', color=red, penwidth=2.5, label="cut"' if t.name in cut else ""
            out.append(f'  "{src}" -> "{c}" [tooltip="{t.name}"{style}];')
    out.append("}")
    return "\n".join(out) + "\n"
