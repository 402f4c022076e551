"""Calibration rows carry kernel provenance (passes/provenance.py), and attribute() uses it."""

import pytest
from splitc.cost_models.attribute import LOSS, attribute
from splitc.cost_models.calibrate import CalibrateConfig, calibrate, load_rows
from splitc.cost_models.profiles import load_profile
from splitc.cost_models.roofline import RooflineModel
from splitc.passes.annotate_costs import annotate_costs
from splitc.passes.frontend import load_onnx


def test_kernel_rows_name_the_ops_they_came_from(tmp_path, tiny_cnn_onnx):
    # timed in this process (the other calibrations in the tests time in a fresh one)
    calibrate(CalibrateConfig(output=tmp_path / "cal.json", models=(tiny_cnn_onnx,),
                              repeats=1, number=1, sweep=False, fresh_processes=False))
    rows = load_rows(tmp_path / "cal.jsonl")
    kern = [r for r in rows if r["type"] == "kernel"]
    (step,) = [r for r in rows if r["type"] == "step"]
    assert {r["process"] for r in rows} == {"shared"}  # the rows say how they were timed
    mod, info = load_onnx(tiny_cnn_onnx)
    roof = RooflineModel(load_profile("local-cpu"))
    g = annotate_costs(mod, roof, roof, name=info.name, buffers=info.buffers)
    names = {op.name for op in g.ops} | {LOSS}
    # one parts list per call of every kernel row, owned by the planner's (untagged) ops
    assert all(len(r["sites"]) == r["calls"] for r in kern)
    owners = [p[0] for r in kern for site in r["sites"] for p in site]
    assert owners.count(None) == 1  # the optimizer's step counter
    assert {o for o in owners if o is not None} == names
    sites = [{"function": r["function"], "symbol": r["symbol"], "parts": p}
             for r in kern for p in r["sites"]]
    got = attribute([(op.name, op.features) for op in g.ops], kern, step["seconds"],
                    roof.profile, sites=sites)
    assert sum(c.training for c in got.values()) == pytest.approx(
        max(step["seconds"], sum(r["calls"] * r["seconds"] for r in kern)), rel=1e-9)
    assert set(got) == names and all(c.training > 0 for c in got.values())
