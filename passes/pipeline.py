"""The library entry points the CLI calls: ONNX -> annotated OpGraph -> Plan -> split.tar.

Each function takes one config dataclass and returns plain results; nothing here prints or
reads argv (``tools/cli.py`` does). Order of passes:

  load_onnx (frontend) -> AnnotateCosts (visitor, no mutation) -> solve (IR-free)
  -> SplitModule + build + package (``passes/package.py: compile_split``)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from splitc.cost_models.base import OpCost
from splitc.cost_models.link import Link
from splitc.passes.opgraph import OpGraph
from splitc.passes.plan import Plan

__all__ = [
    "OP_COSTS",
    "CompileConfig",
    "PlanConfig",
    "PlanResult",
    "compile_model",
    "plan_model",
    "with_recompute",
    "with_step_costs",
]


@dataclass(frozen=True)
class PlanConfig:
    model: Path
    device: str = "local-cpu"  # profile name or JSON path
    server: str = "local-cpu"
    uplink: str = "100Mbps"
    downlink: str | None = None  # defaults to the uplink rate
    latency: str = "0"
    batch_size: int | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    objective: str = "training"
    algorithm: str = "mincut"
    pins: dict[str, str] = field(default_factory=dict)
    engine: str = "ortools"
    loss: str = "cross-entropy"
    optimizer: str = "sgd"  # the update cost per op depends on the optimizer's state traffic
    recompute: bool = False  # device backward recomputes the forward (see with_recompute)
    tied_policy: str = "sync"
    allow_raw_upload: bool = False
    baselines: bool = True  # also solve every other algorithm for comparison
    # learned CPU profiles: price ops from the compiled training step ("step"), from each op
    # alone ("ops"), or the step where the profile allows it ("auto"); see with_step_costs
    op_costs: str = "auto"

    @property
    def link(self) -> Link:
        return Link.parse(self.uplink, self.downlink, self.latency)


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    graph: OpGraph
    comparison: dict[str, Plan]  # algorithm -> plan (includes the chosen one)
    module: object = None  # the imported tvm.IRModule, kept for compile_model
    info: object = None  # frontend ModelInfo (input names, initial parameter values)


def _cost_models(cfg: PlanConfig):
    """Learned model for calibrated profiles, the roofline prior otherwise."""
    from splitc.cost_models.learned import cost_model_for
    from splitc.cost_models.profiles import load_profile

    dev, srv = load_profile(cfg.device), load_profile(cfg.server)
    return (cost_model_for(dev, cfg.optimizer), cost_model_for(srv, cfg.optimizer), dev.name,
            srv.name)


def with_recompute(graph: OpGraph) -> OpGraph:
    """Charge the device side of every op its forward twice, as ``--recompute`` runs it.

    With recomputation ``device_backward`` re-runs the device forward instead of reading
    residuals kept by ``device_forward``, so each op placed on the device costs
    forward (in device_forward) + forward + backward (in device_backward) + update.
    Server costs are unchanged (``server_step`` runs forward and backward once).
    """
    ops = tuple(
        replace(op, device=OpCost(op.device.forward, op.device.backward + op.device.forward,
                                  op.device.update))
        for op in graph.ops
    )
    return replace(graph, ops=ops, cost_model=graph.cost_model + "; device recompute")


def annotate_model(cfg: PlanConfig, models=None, progress: Callable[[str], None] | None = None):
    """Import and annotate: returns (IRModule, ModelInfo, OpGraph).

    ``models``: the ``_cost_models(cfg)`` tuple when the caller already has it.
    """
    from splitc.passes.annotate_costs import annotate_costs
    from splitc.passes.frontend import load_onnx

    mod, info = load_onnx(cfg.model, cfg.input_shapes or None, cfg.batch_size)
    dev, srv, _, _ = models or _cost_models(cfg)
    graph = annotate_costs(mod, dev, srv, loss=cfg.loss, model_hash=info.sha256, name=info.name,
                           buffers=info.buffers)
    return mod, info, with_step_costs(cfg, graph, dev, srv, progress)


OP_COSTS = ("auto", "step", "ops")


def with_step_costs(cfg: PlanConfig, graph: OpGraph, dev, srv,
                    progress: Callable[[str], None] | None = None) -> OpGraph:
    """``cfg.op_costs``: each side whose cost model is a learned profile calibrated on a CPU
    target gets its op costs (and the server its loss) from the compiled training step
    (``cost_models/step_costs.py`` says how and why). ``auto``: for training plans, where a
    side allows it and its step builds (else that side's ops are priced alone, and progress
    says why); ``step``: both sides must (else the error); ``ops``: never."""
    from splitc import InputError, SplitcError
    from splitc.cost_models.learned import LearnedModel
    from splitc.cost_models.step_costs import LOSS, step_op_costs, step_target

    if cfg.op_costs not in OP_COSTS:
        raise InputError(f"unknown op costs {cfg.op_costs!r}; use one of {', '.join(OP_COSTS)}")
    if cfg.op_costs == "ops" or (cfg.op_costs == "auto" and cfg.objective != "training"):
        return graph
    if cfg.objective != "training":
        raise InputError("--op-costs step prices the compiled training step; use --op-costs "
                         "ops for an inference plan")
    sides = {}
    for side, m in (("device", dev), ("server", srv)):
        if isinstance(m, LearnedModel) and step_target(m) is not None:
            sides[side] = m
        elif cfg.op_costs == "step":
            raise InputError(f"--op-costs step: the {side} profile is not a learned profile "
                             f"calibrated on a CPU (llvm) target ({m.name}); use --op-costs ops")
    if not sides:
        return graph
    say = progress or (lambda msg: None)
    ops = [(op.name, op.features) for op in graph.ops if op.features is not None]
    costs: dict[str, dict] = {}
    for side, m in sides.items():
        if side == "server" and "device" in sides and m.profile == dev.profile:
            if "device" in costs:  # one profile on both sides: priced (or failed) once
                costs[side] = costs["device"]
            continue
        say(f"pricing the {side}'s ops from the compiled training step ({m.profile.name})")
        try:
            costs[side] = step_op_costs(cfg.model, m, ops, cfg.batch_size,
                                        cfg.input_shapes or None, cfg.loss, cfg.optimizer, say)
        except SplitcError as e:  # a step the split cannot build: auto prices ops alone
            if cfg.op_costs == "step":
                raise
            say(f"the training step did not build ({e}); pricing the {side}'s ops alone")
    if not costs:
        return graph
    dc, sc = costs.get("device", {}), costs.get("server", {})
    new_ops = tuple(replace(op, device=dc.get(op.name, op.device),
                            server=sc.get(op.name, op.server)) for op in graph.ops)
    return replace(graph, ops=new_ops, loss_server=sc.get(LOSS, graph.loss_server),
                   cost_model=graph.cost_model + f"; op costs from the compiled step "
                   f"({', '.join(costs)})")


def plan_model(cfg: PlanConfig, progress: Callable[[str], None] | None = None) -> PlanResult:
    from splitc.passes.partition import compare, solve

    say = progress or (lambda msg: None)
    say(f"importing {cfg.model}")
    models = _cost_models(cfg)
    _, _, dev_name, srv_name = models
    mod, info, graph = annotate_model(cfg, models, say)
    if cfg.recompute:
        graph = with_recompute(graph)
    kw = {"objective": cfg.objective, "pins": cfg.pins, "tied_policy": cfg.tied_policy,
          "allow_raw_upload": cfg.allow_raw_upload, "device_profile": dev_name,
          "server_profile": srv_name}
    say(f"solving ({cfg.algorithm}) over {len(graph.ops)} ops")
    plan = solve(graph, cfg.link, algorithm=cfg.algorithm, engine=cfg.engine, **kw)
    comparison = {cfg.algorithm: plan}
    if cfg.baselines:
        say("solving baselines")
        comparison = compare(graph, cfg.link, **kw)
        comparison[cfg.algorithm] = plan
    return PlanResult(plan, graph, comparison, mod, info)


@dataclass(frozen=True)
class CompileConfig:
    plan: PlanConfig
    output: Path = Path("split.tar")
    device_target: str = "llvm"
    server_target: str = "llvm"
    lr: float = 0.01  # the optimizer itself is cfg.plan.optimizer (it is priced in the plan)
    cross_compiler: str | None = None
    tuning_records: Path | None = None


def compile_model(cfg: CompileConfig, progress: Callable[[str], None] | None = None,
                  on_plan: Callable[[PlanResult], None] | None = None) -> dict:
    """Plan, split, build both halves and write split.tar; returns the build summary.

    ``on_plan`` sees the plan (and its baselines) before the slow compile starts.
    """
    from splitc.passes.package import compile_split

    say = progress or (lambda msg: None)
    result = plan_model(cfg.plan, progress=say)
    if on_plan is not None:
        on_plan(result)
    summary = compile_split(
        result.module, result.plan, device_target=cfg.device_target,
        server_target=cfg.server_target, loss=cfg.plan.loss, optimizer=cfg.plan.optimizer,
        lr=cfg.lr, recompute=cfg.plan.recompute, cross_compiler=cfg.cross_compiler,
        output=cfg.output, progress=say, tuning_records=cfg.tuning_records,
    )
    summary.setdefault("plan", result.plan.to_json())
    return summary

