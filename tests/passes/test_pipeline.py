"""passes/pipeline.py: the glue the CLI calls (recompute pricing, batch-size resolution)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from splitc.cost_models.base import OpCost
from splitc.cost_models.link import Link
from splitc.passes.opgraph import OpGraph, OpNode, Param, Tensor
from splitc.passes.pipeline import with_recompute
from splitc.passes.plan import Placement, evaluate
from splitc.tools.session import DEMO_MODEL


def _two_op_graph() -> OpGraph:
    # x -> a (reads w) -> t -> b -> y ; costs in seconds chosen as exact binary fractions
    ops = (
        OpNode("a", "relax.nn.dense", ("x",), ("t",), ("w",),
               device=OpCost(0.5, 1.0, 0.25), server=OpCost(0.125, 0.25, 0.0625)),
        OpNode("b", "relax.nn.relu", ("t",), ("y",),
               device=OpCost(0.25, 0.25, 0.0), server=OpCost(0.0625, 0.0625, 0.0)),
    )
    tensors = {
        "x": Tensor("x", (2, 4), "float32", None, ("a",)),
        "t": Tensor("t", (2, 4), "float32", "a", ("b",)),
        "y": Tensor("y", (2, 4), "float32", "b", (), is_output=True),
    }
    return OpGraph("g", ops, tensors, {"w": Param("w", (4, 4), "float32", ("a",))},
                   ("x",), ("y",))


def test_recompute_charges_the_device_forward_twice():
    g = with_recompute(_two_op_graph())
    assert g.op("a").device == OpCost(0.5, 1.5, 0.25)  # backward 1.0 + recomputed forward 0.5
    assert g.op("a").server == OpCost(0.125, 0.25, 0.0625)  # the server never recomputes
    link = Link(1e6, 1e6)
    # device: a = 0.5 + 1.5 + 0.25, b = 0.25 + 0.5 + 0 -> 3.0 s (was 2.25 s without recompute)
    assert evaluate(g, Placement.of(["a", "b"]), link).device == Fraction(3)
    assert evaluate(_two_op_graph(), Placement.of(["a", "b"]), link).device == Fraction(9, 4)


def test_batch_size_fills_the_symbolic_leading_dim():
    from splitc import InputError
    from splitc.passes.frontend import load_onnx

    def shapes(input_shapes, batch):
        return {i.name: i.shape for i in load_onnx(DEMO_MODEL, input_shapes, batch)[1].inputs}

    assert shapes(None, 32) == {"x": (32, 1, 8, 8)}
    # explicit --input-shapes win over --batch-size
    assert shapes({"x": (4, 1, 8, 8)}, 32) == {"x": (4, 1, 8, 8)}
    with pytest.raises(InputError, match=r"input 'x' has symbolic dim 0 \('N'\)"):
        shapes(None, None)


def test_link_doctests():
    import doctest

    from splitc.cost_models import link

    assert doctest.testmod(link).failed == 0
