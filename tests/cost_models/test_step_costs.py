"""cost_models/step_costs.py and ``splitc plan --op-costs``: op costs priced from the compiled
training step, attributed to the ops like the measured ones."""

import pytest
from splitc import InputError
from splitc.cost_models.attribute import LOSS
from splitc.cost_models.base import OpFeatures
from splitc.cost_models.calibrate import CalibrateConfig, calibrate, load_rows
from splitc.cost_models.features import KernelFeatures
from splitc.cost_models.learned import LearnedModel
from splitc.cost_models.profiles import load_profile
from splitc.cost_models.step_costs import kernel_id, op_costs_from_kernels, step_op_costs
from splitc.passes.pipeline import PlanConfig, annotate_model, plan_model

PROF = load_profile("jetson-orin-nano")
ROOF = f"roofline:jetson-orin-nano({PROF.provenance['status']})"


def _row(sym, role, calls, parts):
    return {"function": "f", "role": role, "symbol": sym, "calls": calls,
            "features": {"family": "ewise"}, "sites": [parts] * calls}


def test_op_costs_from_kernels_add_up_to_the_step_exactly():
    ops = [("a", OpFeatures("relax.nn.relu", 1, 4, 4, 0, ((1,),), ((1,),))),
           ("b", OpFeatures("relax.nn.relu", 1, 4, 4, 0, ((1,),), ((1,),)))]
    # one kernel fusing a's and b's forward (equal roofline weight), one b's backward called
    # twice, one the loss's
    rows = [_row("k1", "forward", 1, [["a", "forward", 0, 4], ["b", "forward", 0, 4]]),
            _row("k2", "backward", 2, [["b", "backward", 0, 4]]),
            _row("k3", "forward", 1, [[LOSS, "forward", 0, 4]])]
    c = op_costs_from_kernels(ops, rows, [2e-6, 1e-6, 3e-6], 11e-6, PROF)
    # kernels: 2 + 2 x 1 + 3 = 7 us; the 4 us beyond them over the 4 calls, 1 us each
    assert c["a"].forward == pytest.approx(1.5e-6)
    assert c["b"].forward == pytest.approx(1.5e-6)
    assert c["b"].backward == pytest.approx(4e-6)
    assert c[LOSS].forward == pytest.approx(4e-6)
    assert sum(x.training for x in c.values()) == pytest.approx(11e-6)
    # a step shorter than its kernels: the kernels as they are
    c = op_costs_from_kernels(ops, rows, [2e-6, 1e-6, 3e-6], 1e-6, PROF)
    assert sum(x.training for x in c.values()) == pytest.approx(7e-6)
    with pytest.raises(ValueError, match=r"^op_costs_from_kernels: 3 kernel rows, 2 times$"):
        op_costs_from_kernels(ops, rows, [1e-6, 1e-6], 1e-5, PROF)
    assert kernel_id(rows[1]) == "f|backward|k2"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_cnn_onnx):
    out = tmp_path_factory.mktemp("stepcosts") / "cal.json"
    calibrate(CalibrateConfig(output=out, models=(tiny_cnn_onnx,), repeats=1, number=1,
                              sweep=False, base_profile="jetson-orin-nano"))
    return out


def test_the_compiled_step_is_priced_kernel_by_kernel_and_attributed(calibrated,
                                                                     tiny_cnn_onnx):
    prof = load_profile(str(calibrated))
    assert prof.learned["dataset"]["target"] == "llvm"
    model = LearnedModel(prof)
    cfg = PlanConfig(model=tiny_cnn_onnx, device=str(calibrated), server=str(calibrated),
                     op_costs="ops")
    _, _, g = annotate_model(cfg)
    ops = [(op.name, op.features) for op in g.ops]
    msgs = []
    costs = step_op_costs(tiny_cnn_onnx, model, ops, say=msgs.append)
    # the kernels scheduled for pricing are the calibrated ones (41 kernels, 52 calls), each
    # priced at its measured time: the costs add up to the predicted step
    kern = [r for r in load_rows(calibrated.with_suffix(".jsonl")) if r["type"] == "kernel"]
    ks = [KernelFeatures.from_json(r["features"]) for r in kern]
    step = sum(r["calls"] * t for r, t in zip(kern, model.kernel_times(ks)))
    assert msgs == [f"priced 41 kernels (52 calls) of the compiled step: {step * 1e3:.3f} ms"]
    assert set(costs) == {op.name for op in g.ops} | {LOSS}
    assert sum(c.training for c in costs.values()) == pytest.approx(step, rel=1e-9)
    assert all(costs[op.name].forward > 0 and costs[op.name].backward > 0 for op in g.ops)
    # the planner: --op-costs auto prices both sides (one profile: priced once) this way
    said = []
    res = plan_model(PlanConfig(model=tiny_cnn_onnx, device=str(calibrated),
                                server=str(calibrated), baselines=False), said.append)
    assert res.graph.cost_model.endswith("; op costs from the compiled step (device, server)")
    assert sum(1 for m in said if m.startswith("pricing the ")) == 1
    for op in res.graph.ops:
        assert op.device == pytest.approx(costs[op.name]) and op.server == op.device
    assert res.graph.loss_server == pytest.approx(costs[LOSS])
    # --op-costs ops keeps each op priced alone
    assert [op.device for op in g.ops] != [op.device for op in res.graph.ops]
    assert "compiled step" not in g.cost_model


def test_op_costs_step_needs_learned_cpu_profiles_and_a_training_plan(calibrated,
                                                                       tiny_cnn_onnx):
    with pytest.raises(InputError, match=r"^--op-costs step: the server profile is not a "
                       r"learned profile calibrated on a CPU \(llvm\) target \(roofline:"):
        annotate_model(PlanConfig(model=tiny_cnn_onnx, device=str(calibrated),
                                  op_costs="step"))
    with pytest.raises(InputError, match=r"^--op-costs step prices the compiled training "
                       r"step; use --op-costs ops for an inference plan$"):
        annotate_model(PlanConfig(model=tiny_cnn_onnx, device=str(calibrated),
                                  server=str(calibrated), op_costs="step",
                                  objective="inference"))
    with pytest.raises(InputError, match=r"^unknown op costs 'x'; use one of auto, step, ops$"):
        annotate_model(PlanConfig(model=tiny_cnn_onnx, op_costs="x"))
    # auto: the learned device side only; the roofline server keeps its op costs
    _, _, g = annotate_model(PlanConfig(model=tiny_cnn_onnx, device=str(calibrated)))
    _, _, g0 = annotate_model(PlanConfig(model=tiny_cnn_onnx, device=str(calibrated),
                                         op_costs="ops"))
    assert g.cost_model.endswith("; op costs from the compiled step (device)")
    assert [op.server for op in g.ops] == [op.server for op in g0.ops]
    assert g.loss_server == g0.loss_server


def test_plan_cli_takes_op_costs(calibrated, tiny_cnn_onnx, tmp_path):
    import json

    from click.testing import CliRunner
    from splitc.tools.cli import cli

    r = CliRunner().invoke(cli, ["plan", str(tiny_cnn_onnx), "--device", "jetson-orin-nano",
                                 "--op-costs", "step", "-q"])
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        "error: --op-costs step: the device profile is not a learned profile calibrated on a "
        f"CPU (llvm) target ({ROOF}); use --op-costs ops")
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(cli, ["plan", str(tiny_cnn_onnx), "--device", str(calibrated),
                                 "--server", str(calibrated), "--op-costs", "step", "--json",
                                 str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["graph"]["cost_model"].endswith(
        "; op costs from the compiled step (device, server)")
    # splitc profiles says which profiles price ops this way
    r = CliRunner().invoke(cli, ["profiles", str(calibrated), "--json"])
    assert r.exit_code == 0, r.output
    got = {p["name"]: p["op_costs"] for p in json.loads(r.stdout)}
    assert got[str(calibrated)] == "step" and got["jetson-orin-nano"] == "ops"
    r = CliRunner().invoke(cli, ["profiles", str(calibrated)])
    assert r.stdout.splitlines()[-1].endswith("op costs from the compiled step")


def test_heldout_report_keeps_each_kernels_time_alone_for_the_chosen_candidate():
    from splitc.cost_models.fit import _chosen_kernel_times, heldout_report

    def row(model, sym, n, seconds):
        f = KernelFeatures(("add",), n, 8 * n, 4 * n, 0, "forward", ((n,), (n,)), ((n,),))
        return {"type": "kernel", "model": model, "workload": model, "calls": 2,
                "function": "f", "role": "forward", "symbol": sym, "features": f.to_json(),
                "seconds": seconds}

    rows = [row("sweep", f"s{n}", n, n * 1e-10 + 5e-7) for n in (256, 4096, 65536, 262144)]
    rows += [row("a", "add", 512, 3e-6), row("a", "add1", 1 << 20, 2e-5),
             row("b", "add", 512, 3.2e-6), row("b", "add2", 2048, 1e-6)]
    rows += [{"type": "step", "model": m, "workload": m, "seconds": 5e-5, "n_calls": 4}
             for m in ("a", "b")]
    rep = heldout_report(rows, load_profile("local-cpu"), ("linear",))
    kt = rep["steps"]["a"]["kernel_times"]
    assert set(kt) == {"linear", "linear/unscaled"}
    assert set(kt["linear"]) == {"f|forward|add", "f|forward|add1"}
    assert kt["linear"]["f|forward|add"] == pytest.approx(3.2e-6)  # b's twin, looked up
    kept = _chosen_kernel_times(rep["steps"], "linear")
    assert set(kept["a"]["kernel_times"]) == {"linear"}
    assert kept["a"]["linear"] == rep["steps"]["a"]["linear"]


def test_auto_prices_ops_alone_when_the_training_step_does_not_build(calibrated,
                                                                     tiny_cnn_onnx,
                                                                     monkeypatch):
    import splitc.cost_models.step_costs as sc
    from splitc import UnsupportedError

    calls = []

    def fail(*a, **k):
        calls.append(1)
        raise UnsupportedError("SplitModule: no step here")

    monkeypatch.setattr(sc, "step_op_costs", fail)
    cfg = {"model": tiny_cnn_onnx, "device": str(calibrated), "server": str(calibrated)}
    said = []
    _, _, g = annotate_model(PlanConfig(**cfg), progress=said.append)
    _, _, g0 = annotate_model(PlanConfig(**cfg, op_costs="ops"))
    assert calls == [1]  # one profile on both sides: tried once
    assert said[-1] == ("the training step did not build (SplitModule: no step here); pricing "
                        "the device's ops alone")
    assert g.cost_model == g0.cost_model and [op.device for op in g.ops] == [
        op.device for op in g0.ops]
    with pytest.raises(UnsupportedError, match=r"^SplitModule: no step here$"):
        annotate_model(PlanConfig(**cfg, op_costs="step"))
