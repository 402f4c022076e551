"""evaluate() and Plan: the one exact cost function, checked term by term by hand."""

from __future__ import annotations

from fractions import Fraction as F

import pytest
from splitc import PlanError
from splitc.cost_models.base import OpCost
from splitc.cost_models.link import Link
from splitc.passes.opgraph import OpGraph, OpNode, Param, Tensor
from splitc.passes.partition import solve
from splitc.passes.plan import Placement, Plan, crossing_tensors, evaluate, split_params


def _graph():
    """x -> a -> ta -> {b, c};  b -> tb (int64) -> c;  c -> tc (output).  a, c share w."""
    ts = {
        "x": Tensor("x", (1000,), "float32", None, ("a",)),  # 4000 B
        "ta": Tensor("ta", (250,), "float32", "a", ("b", "c")),  # 1000 B, read twice
        "tb": Tensor("tb", (100,), "int64", "b", ("c",)),  # 800 B, integer: no gradient
        "tc": Tensor("tc", (10,), "float32", "c", (), True),  # 40 B, the model output
    }
    ops = (
        OpNode(
            "a",
            "matmul",
            ("x",),
            ("ta",),
            ("w",),
            device=OpCost(0.5, 0.25, 0.125),
            server=OpCost(0.0625),
        ),
        OpNode("b", "argmax", ("ta",), ("tb",), device=OpCost(0.25), server=OpCost(0.125)),
        OpNode(
            "c",
            "gather",
            ("ta", "tb"),
            ("tc",),
            ("w",),
            device=OpCost(2.0, 1.0),
            server=OpCost(0.5, 0.25),
        ),
    )
    params = {"w": Param("w", (500,), "float32", ("a", "c"))}  # 2000 B, tied
    return OpGraph(
        "toy",
        ops,
        ts,
        params,
        ("x",),
        ("tc",),
        labels=(Tensor("y", (8,), "int64", None),),
        loss_server=OpCost(0.03125),
    )


LINK = Link(1e6, 2e6, latency=0.01)


def test_training_breakdown_by_hand():
    g = _graph()
    bd = evaluate(g, Placement.of(["a", "b"]), LINK, "training")
    assert bd.device == F(0.875) + F(0.25)  # a: 0.5 + 0.25 + 0.125, b: 0.25
    assert bd.server == F(0.75) + F(0.03125)  # c: 0.5 + 0.25, plus the loss
    # up: ta once though two readers (1000 B) + tb (800 B) + labels (64 B) + weight w (2000 B)
    assert bd.uplink == F(1000 + 800 + 64 + 2000, 10**6)
    # down: gradient of ta only (tb is integer) + weight sync of w
    assert bd.downlink == F(1000 + 2000, 2 * 10**6)
    assert bd.fixed == 2 * F(0.01)
    assert bd.total == bd.device + bd.uplink + bd.server + bd.downlink + bd.fixed
    assert split_params(g, Placement.of(["a", "b"])) == ["w"]


def test_training_all_device_sends_the_output_to_the_loss():
    bd = evaluate(_graph(), Placement.of(["a", "b", "c"]), LINK, "training")
    assert bd.uplink == F(40 + 64, 10**6)  # tc (40 B) to the loss, labels (64 B)
    assert bd.downlink == F(40, 2 * 10**6)  # and its gradient back down
    assert bd.server == F(0.03125)


def test_inference_result_comes_down_and_latency_only_when_crossing():
    g = _graph()
    bd = evaluate(g, Placement.of(["a", "b"]), LINK, "inference")
    assert bd.device == F(0.5) + F(0.25) and bd.server == F(0.5)  # forward only
    assert bd.uplink == F(1000 + 800, 10**6)  # no labels, no weight sync in inference
    assert bd.downlink == F(40, 2 * 10**6)  # the result made on the server comes down
    assert bd.fixed == 2 * F(0.01)
    local = evaluate(g, Placement.of(["a", "b", "c"]), LINK, "inference")
    assert local.fixed == 0 and local.uplink == 0 and local.downlink == 0


def test_server_feeding_device_is_rejected():
    with pytest.raises(PlanError, match=r"tensor 'ta' made on the server feeds device op 'b'"):
        crossing_tensors(_graph(), Placement.of(["b"]))


def test_plan_json_round_trip_is_exact():
    plan = solve(_graph(), LINK, pins={"b": "device", "c": "server"})
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.total == plan.total
    assert [c.name for c in plan.cut] == ["ta", "tb"] and [c.grad for c in plan.cut] == [
        True,
        False,
    ]
    other = solve(_graph(), LINK, algorithm="device-only")
    assert other.plan_id != plan.plan_id and len(plan.plan_id) == 16


def test_solver_total_matches_hand_optimum():
    # every valid placement of the toy graph (a always on the device: it reads x):
    # {a}: 0.875 + 0.125 + 0.75 + loss, ta up/down, w synced; {a,b}: above; {a,b,c}: all local
    g = _graph()
    totals = {
        k: evaluate(g, Placement.of(k), LINK).total for k in (("a",), ("a", "b"), ("a", "b", "c"))
    }
    plan = solve(g, LINK)
    assert plan.total == min(totals.values())
    assert plan.placement == Placement.of(min(totals, key=totals.get))
