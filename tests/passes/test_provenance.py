"""passes/provenance.py: every compiled kernel call traced back to the planner ops it fused."""

from pathlib import Path

import pytest
import tvm
from splitc.cost_models.kernels import calls, scheduled
from splitc.cost_models.link import Link
from splitc.cost_models.profiles import load_profile
from splitc.cost_models.roofline import RooflineModel
from splitc.passes.annotate_costs import annotate_costs
from splitc.passes.frontend import load_onnx
from splitc.passes.partition import solve
from splitc.passes.provenance import LOSS, TAG, tag_ops, trace
from splitc.passes.split_module import split_module
from splitc.passes.targets import host_target

DEMO = Path(__file__).resolve().parents[2] / "tools" / "models" / "demo_cnn.onnx"


def _traced(path, batch=None, tag=True, tagged_graph=False):
    """The server-only training step of a model (as calibration builds it), its OpGraph
    (untagged names) and the Sites of its scheduled kernels (traced with the graph of the
    tagged module when ``tagged_graph``)."""
    mod, info = load_onnx(path, None, batch)
    roof = RooflineModel(load_profile("local-cpu"))
    graph = annotate_costs(mod, roof, roof, name=info.name, buffers=info.buffers)
    src = tag_ops(mod) if tag else mod
    g2 = annotate_costs(src, roof, roof, name=info.name, buffers=info.buffers)
    plan = solve(g2, Link.parse("1Gbps", None, "0"), algorithm="server-only",
                 allow_raw_upload=True)
    smod, _ = split_module(src, plan)
    step = tvm.IRModule({gv: f for gv, f in smod.functions.items()
                         if gv.name_hint in ("server_loss_adjoint", "server_update")})
    with trace() as t:
        sched = scheduled(step, host_target())
    return graph, sched, t.sites(step, sched, g2 if tagged_graph else graph)


@pytest.fixture(scope="module")
def demo():
    return _traced(DEMO, 4)


def _owners(site):
    return {(p.owner, p.role) for p in site.parts}


def test_every_kernel_call_has_a_site_and_every_part_an_owner(demo):
    graph, sched, sites = demo
    # one Site per call_tir, in the order calibration lists the calls
    assert [(s.function, s.symbol) for s in sites] == \
        [(c.function, c.symbol) for c in calls(sched, frozenset())]
    ops = {op.name for op in graph.ops} | {LOSS}
    unowned = [s for s in sites if any(p.owner not in ops for p in s.parts)]
    # only the optimizer's step counter belongs to no op
    assert [(s.function, [p.role for p in s.parts]) for s in unowned] == \
        [("server_update", ["update"])]
    assert all(p.role == "update" for s in sites if s.function == "server_update"
               for p in s.parts)


def test_fused_kernels_split_between_the_ops_they_came_from(demo):
    graph, _, sites = demo
    kinds = {op.name: op.op.split(".")[-1] for op in graph.ops}
    first = sites[1]  # conv2d + bias add, fused (sites[0] reshapes the bias: weight prep)
    assert sorted(kinds[o] for o, _ in _owners(first)) == ["add", "conv2d"]
    assert {r for _, r in _owners(first)} == {"forward"}
    assert _owners(sites[0]) == {(graph.ops[1].name, "forward")}  # the add reads it
    # the backward of the second dense layer fused with the ReLU backward before it
    dense2, relu = [op.name for op in graph.ops if op.op in ("relax.matmul", "relax.nn.relu")
                    ][-1], [op.name for op in graph.ops if op.op == "relax.nn.relu"][-1]
    assert any(_owners(s) == {(dense2, "backward"), (relu, "backward")} for s in sites)
    loss = [s for s in sites if _owners(s) == {(LOSS, "forward")}]
    assert [s.symbol for s in loss] == ["log_softmax", "nll_loss_without_weight"]


def test_conv_backward_kernels_carry_the_forward_flops(demo):
    graph, _, sites = demo
    for op in graph.ops:
        if op.op != "relax.nn.conv2d":
            continue
        fwd = sum(p.flops for s in sites for p in s.parts if (p.owner, p.role) ==
                  (op.name, "forward") and p.flops > 10 * op.features.flops / 100)
        assert fwd == op.features.flops
        # data gradient (not for the first conv: its input needs none) + weight gradient
        bwd = [p.flops for s in sites for p in s.parts
               if (p.owner, p.role) == (op.name, "backward") and p.flops > 0]
        want = [op.features.flops] * (2 if op.features.input_grad else 1)
        assert sorted(bwd)[-len(want):] == want
        # and one SGD update per parameter
        upd = [s for s in sites if (op.name, "update") in _owners(s)]
        assert len(upd) == len(op.params)


def test_tagged_batch_norm_pieces_belong_to_the_batch_norm(tiny_cnn_onnx):
    graph, _, sites = _traced(tiny_cnn_onnx)
    bn = next(op.name for op in graph.ops if op.op == "relax.nn.batch_norm")
    stats = [s for s in sites if s.symbol in ("mean", "variance") and s.function ==
             "server_loss_adjoint" and any(p.role == "forward" for p in s.parts)]
    # the batch statistics (the global mean pool is another kernel, "mean1")
    assert [(_owners(s) == {(bn, "forward")}) for s in stats] == [True, True]
    assert any((bn, "backward") in _owners(s) for s in sites)
    ops = {op.name for op in graph.ops} | {LOSS}
    assert sum(any(p.owner not in ops for p in s.parts) for s in sites) == 1


def test_tag_ops_changes_names_only(tiny_cnn_onnx):
    mod, _ = load_onnx(tiny_cnn_onnx)
    tagged = tag_ops(mod)
    tvm.ir.assert_structural_equal(tagged["main"], mod["main"], map_free_vars=True)
    names = [b.var.name for blk in tagged["main"].body.blocks for b in blk.bindings]
    assert names and all(n.startswith(TAG) for n in names)
    assert mod["main"].body.blocks[0].bindings[0].var.name == names[0][len(TAG):]


def test_tagging_leaves_the_kernels_as_they_were(tiny_cnn_onnx):
    kernels = []
    for tag in (False, True):
        _, _, sites = _traced(tiny_cnn_onnx, tag=tag)
        kernels.append([(s.function, s.symbol, [p.flops for p in s.parts]) for s in sites])
    assert kernels[0] == kernels[1]


def test_the_tagged_modules_graph_gives_the_same_owners(tiny_cnn_onnx):
    _, _, plain = _traced(tiny_cnn_onnx)
    _, _, tagged = _traced(tiny_cnn_onnx, tagged_graph=True)
    assert tagged == plain
