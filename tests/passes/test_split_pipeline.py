"""SplitModule on the real front half: load_onnx -> AnnotateCosts -> Plan -> compile_split.

The Plan's names come from the frontend engineer's AnnotateCosts (not the test helper), so
this checks the naming contract end to end on the shared test models (tests/helpers/models.py),
then trains through split.tar and compares with the unsplit package.
"""

from __future__ import annotations

import numpy as np
import pytest
from splitc.cost_models.link import Link
from splitc.passes.package import compile_split
from splitc.passes.pipeline import PlanConfig, annotate_model
from splitc.passes.plan import Placement, Plan
from splitc.runtime.tvm_halves import load_device_half, load_server_half


def _plan(graph, device_ops):
    return Plan.build(
        graph,
        Placement.of(device_ops),
        Link.parse("100Mbps"),
        "training",
        "manual",
        "local-cpu",
        "local-cpu",
    )


def _steps(tar, x, y, n=3):
    d, s = load_device_half(tar), load_server_half(tar)
    losses = []
    for _ in range(n):
        loss, g = s.step(d.forward([x]), y)
        d.backward(g)
        losses.append(loss)
    params = {k: v for k, v in (d.state_dict() | s.state_dict()).items() if k.startswith("param")}
    return np.array(losses), params


@pytest.mark.parametrize(
    "name",
    [
        "tiny_cnn",
        pytest.param("mbv2_block", marks=pytest.mark.slow),
        pytest.param("tiny_transformer", marks=pytest.mark.slow),
    ],
)
def test_real_plan_split_trains_like_unsplit(tmp_path, onnx_model, name):
    mod, _, graph = annotate_model(PlanConfig(model=onnx_model(name)))
    ops = [o.name for o in graph.ops]
    split = _plan(graph, ops[: len(ops) // 2])
    assert split.cut and any(c.grad for c in split.cut)
    out = {}
    for tag, plan in (("split", split), ("whole", _plan(graph, []))):
        out[tag] = tmp_path / f"{tag}.tar"
        summary = compile_split(mod, plan, optimizer="momentum", lr=0.05, output=out[tag])
        assert summary["plan_id"] == plan.plan_id
    d = load_device_half(out["split"])
    rng = np.random.default_rng(1)
    x = rng.standard_normal(d.manifest["inputs"][0]["shape"]).astype("float32")
    lab = load_server_half(out["split"]).manifest["labels"]
    y = rng.integers(0, 4, lab["shape"]).astype(lab["dtype"])
    loss_s, p_s = _steps(out["split"], x, y)
    loss_w, p_w = _steps(out["whole"], x, y)
    assert loss_s[-1] < loss_s[0]  # it learns
    np.testing.assert_allclose(loss_s, loss_w, rtol=1e-4)
    assert sorted(p_s) == sorted(p_w)
    for k in p_s:
        np.testing.assert_allclose(p_s[k], p_w[k], rtol=1e-4, atol=1e-6, err_msg=k)
