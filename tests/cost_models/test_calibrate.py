"""cost_models/calibrate.py and rpc.py: measure fused kernels locally and through TVM RPC,
resume a dataset, fit and load the calibrated profile, use it to plan."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from splitc import InputError
from splitc.cost_models.calibrate import (
    CalibrateConfig,
    calibrate,
    load_rows,
    model_module,
    sweep_module,
)
from splitc.cost_models.features import parse_kinds
from splitc.cost_models.learned import LearnedModel, cost_model_for
from splitc.cost_models.profiles import load_profile
from splitc.cost_models.rpc import parse_tracker


@pytest.mark.parametrize("text", ["localhost", "host:", ":9190", "h:99999", "h:x"])
def test_parse_tracker_errors(text):
    with pytest.raises(InputError, match=r"Calibrate: RPC tracker .* must be HOST:PORT"):
        parse_tracker(text)


def test_parse_tracker():
    assert parse_tracker("127.0.0.1:9190") == ("127.0.0.1", 9190)


def test_load_rows_skips_torn_line_and_rejects_foreign(tmp_path):
    p = tmp_path / "d.jsonl"
    row = {"schema": 1, "type": "step", "workload": "w", "target": "llvm", "board": "local"}
    p.write_text(json.dumps(row) + "\n" + json.dumps({**row, "board": "b"}) + "\n{\"sch")
    assert load_rows(p) == [row, {**row, "board": "b"}]
    assert load_rows(p, "llvm", "local") == [row]
    p.write_text('{"a": 1}\n')
    with pytest.raises(InputError, match=r"line 1 is not a splitc dataset row \(schema 1\)"):
        load_rows(p)


def test_calibrate_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"Calibrate: model '.*nope.onnx' does not exist"):
        calibrate(CalibrateConfig(output=tmp_path / "p.json", models=(tmp_path / "nope.onnx",)))
    with pytest.raises(InputError, match=r"--repeats and --number must be >= 1"):
        calibrate(CalibrateConfig(output=tmp_path / "p.json", repeats=0))
    with pytest.raises(InputError, match=r"--rpc-tracker needs --rpc-key"):
        calibrate(CalibrateConfig(output=tmp_path / "p.json", rpc_tracker="127.0.0.1:1",
                                  sweep=False, models=(tmp_path / "p.json",) * 0))


def test_kernel_roles_of_the_training_step(tiny_cnn_onnx):
    """The server-only split holds the whole step: forward, then backward, then SGD."""
    import tvm
    from splitc.cost_models.kernels import calls as _calls
    from splitc.passes.schedules import default_cpu_schedule
    from tvm import relax

    w = model_module(tiny_cnn_onnx)
    with tvm.target.Target("llvm") as t:
        sched = default_cpu_schedule(relax.transform.LegalizeOps()(w.module), t)
    calls = _calls(sched, w.weights)
    roles = [c.role for c in calls if c.function == "server_loss_adjoint"]
    # forward first, then only backward (Gradient emits the forward first)
    assert roles == sorted(roles, key=["forward", "backward"].index) and "backward" in roles
    fwd = {parse_kinds(c.symbol)[0] for c in calls if c.role == "forward"}
    bwd = {parse_kinds(c.symbol)[0] for c in calls if c.role == "backward"}
    assert "conv2d" in fwd and "conv2d_transpose" in bwd and "nll_loss" in bwd
    # SGD: one update kernel per trainable tensor (conv1 w+b, bn1 w+b, conv2 w+b, fc w+b = 8)
    # plus the int64 step counter
    upd = [c for c in calls if c.role == "update"]
    assert all(c.function == "server_update" for c in upd)
    assert len([c for c in upd if c.param_bytes]) == 8 and len(upd) == 9
    # the update kernel of fc.weight [10, 8] reads the 320-byte weight (10*8*4)
    assert 320 in {c.param_bytes for c in upd}


def test_sweep_module_has_one_kernel_per_op():
    w = sweep_module()
    assert len(w.module.functions) == int(w.key.split("-v")[1]) and w.step == ()


def _calibrate(tmp_path, model, **kw):
    msgs = []
    kw = {"sweep": False, **kw}
    cfg = CalibrateConfig(output=tmp_path / "cal.json", models=(model,), repeats=1, number=1,
                          progress=msgs.append, base_profile="jetson-orin-nano", **kw)
    return calibrate(cfg), msgs


def test_calibrate_local_resume_and_plan(tmp_path, tiny_cnn_onnx, tiny_cnn):
    out, msgs = _calibrate(tmp_path, tiny_cnn_onnx)
    rows = load_rows(tmp_path / "cal.jsonl")
    kern = [r for r in rows if r["type"] == "kernel"]
    (step,) = [r for r in rows if r["type"] == "step"]
    # tiny_cnn's step, built as splitc compile builds it (RewriteGrads folds the fc weight
    # gradient's transpose into its matmul): 52 kernel calls (forward 18, backward 25, SGD 9:
    # 8 weights + the step counter), 41 distinct kernels
    assert step["n_calls"] == 52 and len(kern) == 41 and sum(r["calls"] for r in kern) == 52
    # and 393 VM builtin calls around them (argument checks and shape matches per tensor in
    # each of the 5 functions, allocations and releases per kernel; apache-tvm 0.27)
    assert step["vm_builtins"] == 393
    # the planner's view of the model (every op, then the loss) is in the dataset too
    (ops,) = [r for r in rows if r["type"] == "ops"]
    assert [o["op"] for o in ops["ops"]][-1] == "loss.cross-entropy"
    for r in rows:  # provenance on every row
        assert r["target"] == "llvm" and r["board"] == "local" and r["repeats"] == 1
        assert r["tvm"] and r["date"].endswith("Z") and r.get("spread", 0) >= 0
        assert r["stat"] == "min" and r["threads"] >= 1 and r["min_repeat_ms"] == 1
        assert r["process"] == "fresh"  # each workload timed in a process of its own
    # every kernel carries the schedule-aware features of its scheduled TIR
    from splitc.cost_models.tir_features import SCHED_FEATURE_NAMES

    assert all(len(r["features"]["sched"]) == len(SCHED_FEATURE_NAMES) for r in kern)
    # the register-tiled convolutions keep a local accumulator, the SGD updates do not
    local = {r["symbol"]: r["features"]["sched"][SCHED_FEATURE_NAMES.index("local_accum")]
             for r in kern}
    assert local["fused_conv2d_add"] == 1 and local["fused_multiply10_subtract2"] == 0
    assert step["seconds"] > 0 and all(r["seconds"] > 0 for r in kern)
    # the host's speed when they were timed: the probe's fastest readings, in seconds
    assert all(set(r["probe_s"]) == {"probe_mm", "probe_add"} and
               all(0 < t < 1 for t in r["probe_s"].values()) for r in kern + [step])
    assert any("timing 41 kernels and 2 VM functions in " in m for m in msgs)
    assert any("round 3: 41 kernels, 2 VM functions, probe" in m for m in msgs)
    prof = load_profile(str(out))
    assert prof.provenance["status"] == "calibrated" and prof.name == "cal"
    assert prof.learned["dataset"]["kernels"] == 41
    # the profile holds the fit and a digest of the rows, not the rows
    from splitc.cost_models.features import KernelFeatures
    from splitc.cost_models.fit import rows_digest

    assert prof.learned["dataset"]["sha256"] == rows_digest(rows)
    assert out.stat().st_size < 400_000 and '"seconds"' not in out.read_text()
    # every measured kernel is priced at its twins' time (4 significant digits; a
    # kernel may run in two roles), in the step: step_scale x time + call_overhead
    from splitc.cost_models.fit import twins
    from splitc.cost_models.lookup import kernel_key

    m = LearnedModel(prof)
    ks = [KernelFeatures.from_json(r["features"]) for r in kern]
    best = twins(kern)
    want = [m.step_scale * float(f"{best[kernel_key(k)]:.4g}") + m.call_overhead for k in ks]
    assert m.kernel_times(ks) == pytest.approx(want, rel=1e-12)
    # roofline constants come from the base profile (the fallback for unseen families)
    assert prof.mem_bandwidth == load_profile("jetson-orin-nano").mem_bandwidth
    # resume: nothing is measured again, and the workload is not even compiled
    n_lines = len((tmp_path / "cal.jsonl").read_text().splitlines())
    _, msgs2 = _calibrate(tmp_path, tiny_cnn_onnx)
    assert len((tmp_path / "cal.jsonl").read_text().splitlines()) == n_lines
    # 41 kernels + ops + step + done rows
    assert any("44 rows already measured" in m for m in msgs2)
    assert any(m.endswith(": already measured") for m in msgs2)
    # the profile plans: the learned model annotates every op of the model
    from splitc.passes.annotate_costs import annotate_costs

    mod, info = tiny_cnn
    model = cost_model_for(prof)
    assert isinstance(model, LearnedModel)
    g = annotate_costs(mod, model, model, name=info.name)
    assert g.cost_model.startswith("device=learned:cal(")
    assert all(op.device.training > 0 for op in g.ops)


def test_calibrate_no_fit_times_then_the_same_run_fits(tmp_path, tiny_cnn_onnx):
    """fit=False (``--no-fit``) times and saves the rows and returns the dataset; the same
    calibration again times nothing and fits them."""
    ds, msgs = _calibrate(tmp_path, tiny_cnn_onnx, fit=False)
    assert ds == tmp_path / "cal.jsonl" and not (tmp_path / "cal.json").exists()
    n = len(ds.read_text().splitlines())
    assert msgs[-1] == f"timed; {n} rows in {ds}, not fitted"
    out, msgs = _calibrate(tmp_path, tiny_cnn_onnx, jobs=1)
    assert out == tmp_path / "cal.json" and len(ds.read_text().splitlines()) == n
    assert "fitting the cost model (1 job)" in msgs
    assert load_profile(str(out)).learned["dataset"]["rows"] == n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_tracker():
    """A TVM RPC tracker and one server (key ``splitc-test``) on 127.0.0.1, each in its own
    process group: killing only the parent leaves a forked worker holding the port."""
    from tvm import rpc

    port, sport = _free_port(), _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
                               "--silent"], start_new_session=True)]
    try:
        deadline = time.time() + 60
        while True:  # a plain socket probe: connect_tracker itself retries every 5 s
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
             "--key", "splitc-test", "--host", "127.0.0.1", "--port", str(sport),
             "--port-end", str(sport + 1), "--silent"], start_new_session=True))
        while "splitc-test" not in str(rpc.connect_tracker("127.0.0.1", port).summary()):
            if time.time() > deadline:
                raise TimeoutError("rpc_server did not register with the tracker")
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


@pytest.mark.slow
def test_calibrate_through_rpc_tracker(tmp_path, tiny_cnn_onnx, rpc_tracker):
    out, _ = _calibrate(tmp_path, tiny_cnn_onnx, rpc_tracker=rpc_tracker,
                           rpc_key="splitc-test")
    rows = load_rows(tmp_path / "cal.jsonl")
    assert rows and all(r["board"] == "splitc-test" for r in rows)
    assert len([r for r in rows if r["type"] == "kernel"]) == 41
    prof = load_profile(str(out))
    assert prof.learned["dataset"]["board"] == "splitc-test"
    assert "splitc-test" in prof.provenance["source"]


def test_rpc_tracker_unreachable(tmp_path, tiny_cnn_onnx):
    port = _free_port()  # nothing listens there
    with pytest.raises(Exception, match=r"Calibrate: cannot get a board with key 'k' from the "
                                        r"RPC tracker 127.0.0.1:\d+"):
        _calibrate(tmp_path, tiny_cnn_onnx, rpc_tracker=f"127.0.0.1:{port}", rpc_key="k")


def test_step_fit_exact():
    from splitc.cost_models.calibrate import _step_fit

    # two workloads whose steps are exactly 1.5 x their kernels + 2 us per call:
    # w1: kernels 1 ms, 10 calls -> 1.5 + 0.02 = 1.52 ms; w2: 10 ms, 50 calls -> 15.1 ms
    from splitc.cost_models.features import KernelFeatures

    def feats(n):
        return KernelFeatures(("add",), n, 8 * n, 4 * n, 0, "forward", ((n,), (n,)),
                              ((n,),)).to_json()

    kern = [{"workload": "w1", "calls": 2, "seconds": 0.5e-3, "features": feats(1024)},
            {"workload": "w2", "calls": 1, "seconds": 10e-3, "features": feats(4096)}]
    steps = [{"workload": "w1", "seconds": 1.52e-3, "n_calls": 10},
             {"workload": "w2", "seconds": 15.1e-3, "n_calls": 50}]
    scale, ovh = _step_fit(kern, steps)
    assert scale == pytest.approx(1.5) and ovh == pytest.approx(2e-6)
    assert _step_fit(kern, []) == (1.0, 0.0)
    # the same kernel measured again, slower in w3: every workload counts it at the median of
    # its three timings (lookup.TWIN_STAT)
    again = [{**kern[0], "workload": w, "seconds": t} for w, t in (("w3", 0.9e-3), ("w4", 0.5e-3))]
    same = [{"workload": w, "seconds": 1.52e-3, "n_calls": 10} for w in ("w3", "w4")]
    assert _step_fit(kern + again, steps + same) == pytest.approx((1.5, 2e-6))


def test_step_fit_weighs_training_only_steps_less():
    import numpy as np
    from splitc.cost_models.features import KernelFeatures
    from splitc.cost_models.fit import TRAIN_STEP_WEIGHT, _step_fit

    def feats(n):
        return KernelFeatures(("add",), n, 8 * n, 4 * n, 0, "forward", ((n,), (n,)),
                              ((n,),)).to_json()

    # calibrated workloads: step = 1.5 x kernels + 2 us per call; training-only ones (synthetic
    # models timed on older code): 3 x kernels + 2 us per call
    kern = [{"workload": f"w{i}", "calls": 1, "seconds": t, "features": feats(1024 * i)}
            for i, t in ((1, 1e-3), (2, 10e-3), (3, 2e-3), (4, 5e-3))]
    steps = [{"workload": "w1", "seconds": 1.5e-3 + 20e-6, "n_calls": 10},
             {"workload": "w2", "seconds": 15e-3 + 100e-6, "n_calls": 50},
             {"workload": "w3", "seconds": 6e-3 + 40e-6, "n_calls": 20, "train_only": True},
             {"workload": "w4", "seconds": 15e-3 + 60e-6, "n_calls": 30, "train_only": True}]
    # alone, each group gives its own factors back (the weights cancel)
    assert _step_fit(kern, steps[2:]) == pytest.approx((3.0, 2e-6))
    # together: weighted least squares on relative errors, training-only rows at 0.1
    w = np.array([1, 1, TRAIN_STEP_WEIGHT, TRAIN_STEP_WEIGHT])
    A = np.array([[k["seconds"] / s["seconds"], s["n_calls"] * 1e-6 / s["seconds"]]
                  for k, s in zip(kern, steps)])
    want = np.linalg.lstsq(A * w[:, None], w, rcond=None)[0] * [1, 1e-6]
    assert _step_fit(kern, steps) == pytest.approx(tuple(want))
    assert TRAIN_STEP_WEIGHT == 0.1 and 1.5 < want[0] < 1.7


def test_op_fit_exact():
    """Op kernels vs the measured whole step, per role, plus a per-kernel term: steps made
    from known factors give those factors back."""
    from splitc.cost_models.base import OpFeatures
    from splitc.cost_models.features import FEATURE_NAMES, op_kernels, vector
    from splitc.cost_models.fit import _op_fit
    from splitc.cost_models.learned import Regressor

    prof = load_profile("local-cpu")
    n = len(FEATURE_NAMES)
    # op kernels predicted at 1 ns per FLOP (log10 t = log_flops - 9): times differ by op, so
    # the per-kernel overhead is not a multiple of the factors
    coef = [0.0] * n
    coef[FEATURE_NAMES.index("log_flops")] = 1.0
    reg = Regressor("linear", {"mean": [0.0] * n, "scale": [1.0] * n, "coef": coef,
                               "intercept": -9.0})

    def relu(size, grad=True):
        return OpFeatures("relax.nn.relu", size, 4 * size, 4 * size, 0, ((size,),),
                          ((size,),), input_grad=grad)

    mm = OpFeatures("relax.matmul", 2 * 64**3, 2 * 64 * 64 * 4, 64 * 64 * 4, 0,
                    ((64, 64), (64, 64)), ((64, 64),))
    # workloads: relu without a backward (first layer), relu, matmul, matmul without a
    # backward, a larger relu without a backward: 5 equations for 2 factors + 1
    models = {"w1": [relu(1024, False)], "w2": [relu(1024)], "w3": [mm],
              "w4": [OpFeatures(**{**mm.to_json(), "input_grad": False})],
              "w5": [relu(4096, False)]}
    truth = {"forward/*": 3.0, "backward/*": 2.0}
    steps, ops = [], []
    for w, fs in models.items():
        ks = [k for f in fs for role in op_kernels(f).values() for k in role]
        t = 10.0 ** reg.predict([vector(k, prof.peak("float32"), prof.mem_bandwidth)
                                 for k in ks])
        step = sum(truth[f"{k.role}/*"] * x for k, x in zip(ks, t)) + 0.5e-6 * len(ks)
        steps.append({"workload": w, "seconds": step})
        ops.append({"workload": w, "ops": [f.to_json() for f in fs]})
    scale, ovh = _op_fit(steps, ops, prof, reg)
    assert scale == pytest.approx(truth, rel=1e-6)
    assert ovh == pytest.approx(0.5e-6, rel=1e-6)
    # a sixth, training-only workload whose step reads 2x (a synthetic model timed on older
    # code) weighs TRAIN_STEP_WEIGHT: the factors move less than when it counts in full
    odd = [{"workload": "w6", "seconds": 2 * steps[2]["seconds"], "train_only": True}]
    ops6 = ops + [{**ops[2], "workload": "w6"}]
    low = _op_fit(steps + odd, ops6, prof, reg)[0]["forward/*"]
    full = _op_fit(steps + [{**odd[0], "train_only": False}], ops6, prof, reg)[0]["forward/*"]
    assert 0 < low - 3.0 < full - 3.0
    assert _op_fit([], ops, prof, reg) == ({}, 0.0)


def test_recheck_times_twice_and_keeps_the_minimum(tmp_path, tiny_cnn_onnx):
    _calibrate(tmp_path, tiny_cnn_onnx, recheck=True)
    rows = load_rows(tmp_path / "cal.jsonl")
    timed = [r for r in rows if r["type"] in ("kernel", "step")]
    assert len(timed) == 42  # 41 kernels + the step
    for r in timed:
        assert r["seconds"] == min(r["seconds_first"], r["seconds_again"]) > 0
    # the held-out report compares the two passes: the noise floor of the fit (one model, so
    # nothing to hold out here; the fit's report is computed on the rows directly)
    from splitc.cost_models.fit import heldout_report

    sweep = [dict(r, model="sweep") for r in rows if r["type"] == "kernel"][:20]
    rep = heldout_report(rows + sweep, load_profile("local-cpu"), ("linear",))
    assert 0 <= rep["repeat"]["within_10pct"] <= 1 and rep["kernels"] == 41


def test_calibrate_with_tuning_records_is_labelled_and_not_mixed(tmp_path, tiny_cnn_onnx):
    import json

    from splitc import InputError
    from splitc.cost_models.learned import cost_model_for

    db = tmp_path / "tuning"
    db.mkdir()
    (db / "knobs.json").write_text(json.dumps({"schema": 1, "target": "llvm", "records": {}}))
    out, _ = _calibrate(tmp_path, tiny_cnn_onnx, tuning_records=db)
    label = f"tuned ({db})"
    assert {r["schedules"] for r in load_rows(tmp_path / "cal.jsonl")} == {label}
    prof = load_profile(str(out))
    assert prof.provenance["schedules"] == label
    assert f"; {label} schedules" in cost_model_for(prof).name  # what plan.json records
    with pytest.raises(InputError, match=r"^Calibrate: .*cal.jsonl holds \d+ rows timed with "
                       r"other schedules \(tuned .*, now default\); pass another -o$"):
        _calibrate(tmp_path, tiny_cnn_onnx)


def test_heldout_report_groups_by_size_pricing_and_model():
    """The held-out report says where the misses are: per kernel size, looked-up, scaled
    from another batch or predicted, and per model; the group counts add up and a
    looked-up kernel is exact."""
    from splitc.cost_models.features import KernelFeatures
    from splitc.cost_models.fit import heldout_report

    def row(model, n, seconds):
        f = KernelFeatures(("add",), n, 8 * n, 4 * n, 0, "forward", ((n,), (n,)), ((n,),))
        return {"type": "kernel", "model": model, "workload": model, "calls": 1,
                "features": f.to_json(), "seconds": seconds}

    def relayout(model, batch, seconds):  # the same kernel at batch 4 and 8 (lookup.py)
        f = KernelFeatures(("reshape", "transpose"), 0.0, 1024 * batch, 1024 * batch, 0,
                           "forward", ((batch, 256),), ((batch, 16, 16),))
        return {"type": "kernel", "model": model, "workload": model, "calls": 1,
                "features": f.to_json(), "seconds": seconds}

    sizes = [256, 1024, 4096, 16384, 65536, 262144]
    rows = [row("sweep", n, n * 1e-10 + 5e-7) for n in sizes]
    # model a: one kernel also in b (looked up), one at another batch in b (scaled), one of
    # its own; b likewise
    rows += [row("a", 512, 3e-6), row("a", 1 << 20, 2e-5), row("b", 512, 3e-6),
             row("b", 2048, 1e-6), relayout("a", 4, 4e-5), relayout("b", 8, 7.6e-5)]
    said = []
    rep = heldout_report(rows, load_profile("local-cpu"), ("linear",), said.append)
    assert said == ["held out 1/2: a (3 kernels; 1 regressor fitted on the other 9)",
                    "held out 2/2: b (3 kernels; 1 regressor fitted on the other 9)"]
    n = rep["group_kernels"]
    assert rep["kernels"] == 6 and rep["looked_up"] == 2 and rep["scaled"] == 2
    assert n["lt_2us"] + n["2_to_10us"] + n["ge_10us"] == 6
    assert n["looked_up"] + n["scaled"] + n["predicted"] == 6
    assert (n["lt_2us"], n["2_to_10us"], n["ge_10us"]) == (1, 2, 3)
    assert (n["model=a"], n["model=b"]) == (3, 3)
    # a's relayout priced at b's time x 4 / 8 (3.8e-5, -5 %), b's at a's x 2 (8e-5, +5 %)
    assert rep["linear"]["groups"]["looked_up"] == 1.0 == rep["linear"]["groups"]["scaled"]
    # the unscaled variant prices the same two by the regressor; the look-ups are the same
    un = rep["linear/unscaled"]
    assert un["groups"]["looked_up"] == 1.0 and un["groups"]["scaled"] < 1.0
    assert un["groups"]["predicted"] == rep["linear"]["groups"]["predicted"]


@pytest.mark.parametrize("unscaled_share, scales", [(0.80, False), (0.75, True), (0.70, True)])
def test_profile_scales_batches_only_when_that_won_held_out(monkeypatch, unscaled_share,
                                                            scales):
    """fit_learned keeps batch-scaled look-ups (``scaled_twins``) when they priced held-out
    kernels at least as well as the regressor did (a tie keeps them), and stores none, with
    ``batch_scaling`` false, when the ``/unscaled`` candidate won; op costs then come from
    the unscaled plain candidate too."""
    from splitc.cost_models import fit as F
    from splitc.cost_models.features import KernelFeatures

    def row(model, n, batch, seconds):
        f = KernelFeatures(("add",), batch * n, 8 * batch * n, 4 * batch * n, 0, "forward",
                           ((batch, n), (batch, n)), ((batch, n),))
        return {"type": "kernel", "model": model, "workload": model, "calls": 1,
                "features": f.to_json(), "seconds": batch * n * 1e-10 + 6e-9,
                "target": "llvm", "board": "local", "tvm": "0.27", "repeats": 30}

    rows = [row("sweep", n, b, 0) for n in (16, 256, 4096) for b in (1, 2, 4)]
    share = {"linear": 0.70, "linear/unscaled": 0.72, "family_trees": 0.75,
             "family_trees/unscaled": unscaled_share}
    monkeypatch.setattr(F, "heldout_report", lambda *a: {
        "models": ["a"], "kernels": 9, **{k: {"within_10pct": v} for k, v in share.items()}})
    learned = F.fit_learned(rows, load_profile("local-cpu"), ("linear", "family_trees"))
    assert learned["batch_scaling"] is scales
    assert bool(learned["scaled_twins"]) is scales
    assert learned["kernel_regressor_name"] == "family_trees" + ("" if scales else "/unscaled")
    assert learned["regressor_name"] == "family_trees" + ("" if scales else "/unscaled")


def test_regressors_learn_the_ratio_to_the_roofline_plus_the_label_floor():
    """Both regressors of a profile learn log(time / (roofline + the fastest kernel timed)):
    the labels' own per-call floor, not the profile's kernel_overhead (a NumPy call, 80x the
    floor here), so kernels under a microsecond keep their size in the offset."""
    from splitc.cost_models.features import KernelFeatures
    from splitc.cost_models.fit import fit_learned, label_floor

    def row(model, n, seconds):
        f = KernelFeatures(("add",), n, 8 * n, 4 * n, 0, "forward", ((n,), (n,)), ((n,),))
        return {"type": "kernel", "model": model, "workload": model, "calls": 1,
                "features": f.to_json(), "seconds": seconds, "target": "llvm",
                "board": "local", "tvm": "0.27", "repeats": 30}

    rows = [row("sweep", n, n * 1e-10 + 6e-9) for n in (16, 256, 4096, 65536, 1 << 20)]
    rows += [row("sweep", 8 * n, n * 8e-10 + 6e-9) for n in (16, 256, 4096, 65536)]
    floor = 16 * 1e-10 + 6e-9
    assert label_floor(rows) == floor
    learned = fit_learned(rows, load_profile("local-cpu"), ("linear", "family_trees"),
                          heldout=False)
    assert learned["regressor"]["offset_overhead"] == floor
    assert learned["kernel_regressor"]["offset_overhead"] == floor


def test_train_rows_are_reused_not_timed_and_never_a_test_model(tmp_path, tiny_cnn_onnx):
    """--train-rows: an earlier dataset's training-only rows join the fit and their workloads
    (here the op sweep) are not timed again; its test-model rows are left out."""
    from splitc.cost_models.dataset import load_train_rows

    first = tmp_path / "a"
    first.mkdir()
    _calibrate(first, tiny_cnn_onnx)
    rows = load_rows(first / "cal.jsonl")
    key = sweep_module().key
    # the tiny CNN's rows again, relabelled as an op sweep measured earlier (training only)
    fake = [dict(r, workload=key, model="sweep", train_only=True) for r in rows]
    cache = tmp_path / "cache.jsonl"
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows + fake))
    assert load_train_rows([cache]) == fake
    assert load_train_rows([cache], skip={key}) == []
    assert load_train_rows([cache], target="other") == []
    second = tmp_path / "b"
    second.mkdir()
    out, msgs = _calibrate(second, tiny_cnn_onnx, sweep=True, train_rows=(cache,))
    assert f"{key}: already measured" in msgs
    assert any(m.endswith(f", {len(fake)} training rows reused") for m in msgs)
    timed = load_rows(second / "cal.jsonl")
    assert {r["model"] for r in timed} == {rows[0]["model"]}  # the sweep was not timed
    # fitted on both: 41 kernels timed now, 41 reused
    assert load_profile(str(out)).learned["dataset"]["kernels"] == 82
    with pytest.raises(InputError, match=r"^Calibrate: training dataset '.*nope.jsonl' does "
                       r"not exist; pass the .jsonl of an earlier calibration$"):
        load_train_rows([tmp_path / "nope.jsonl"])


def test_noise_warning_when_the_two_timing_passes_disagree():
    from splitc.cost_models.calibrate import noise_warning

    # session 8: the 9 test models re-timed while the host was slow, 71.2 % of kernels agreed
    assert noise_warning({"repeat": {"within_10pct": 0.712, "mape_pct": 8.1}}) == (
        "the two timing passes agreed within 10% for only 71% of kernels (the machine was "
        "loaded while timing); recalibrate when it is quiet")
    # quiet (session 7: 97.2 %), exactly at the bar, or timed once (no --recheck): nothing
    for acc in ({"repeat": {"within_10pct": 0.972}}, {"repeat": {"within_10pct": 0.9}}, {}):
        assert noise_warning(acc) is None


def test_step_model_splits_the_scale_by_kernel_bytes():
    """Kernels moving >= 4 MiB run 1.25x slower in the step than alone, the others 1.0x: the
    split is found among LARGE_BYTES on the steps (test_learned: LearnedModel applies it)."""
    import dataclasses

    from splitc.cost_models.features import KernelFeatures
    from splitc.cost_models.step_fit import step_model

    def feats(mib):  # an add over n floats: 3 x 4n bytes = mib MiB
        n = mib * 2 ** 20 // 12
        return KernelFeatures(("add",), n, 8 * n, 4 * n, 0, "forward", ((n,), (n,)), ((n,),))

    small, large = feats(3), feats(16)  # 3 MiB: between the 2 and 4 MiB candidates
    kern, steps = [], []
    for i, (t_small, t_large) in enumerate(((1e-3, 4e-3), (2e-3, 1e-3), (5e-3, 2e-3),
                                            (1e-3, 8e-3), (3e-3, 3e-3))):
        w = f"w{i}"
        # one kernel of each size per workload, each measured only there (its own twin)
        kern += [{"workload": w, "calls": 1, "seconds": t_small,
                  "features": dataclasses.replace(small, flops=small.flops + i).to_json()},
                 {"workload": w, "calls": 1, "seconds": t_large,
                  "features": dataclasses.replace(large, flops=large.flops + i).to_json()}]
        steps.append({"workload": w, "seconds": 1.0 * t_small + 1.25 * t_large + 20e-6,
                      "n_calls": 20})
    sm = step_model(kern, steps)
    assert sm["large_bytes"] == 4 * 2 ** 20
    assert sm["step_scale"] == pytest.approx(1.0) and sm["step_scale_large"] == pytest.approx(1.25)
    assert sm["call_overhead"] == pytest.approx(1e-6)
    # one scale explains steps that follow one scale: no split
    flat = [{**s, "seconds": 1.1 * (k1["seconds"] + k2["seconds"]) + 20e-6}
            for s, k1, k2 in zip(steps, kern[::2], kern[1::2])]
    assert step_model(kern, flat) == pytest.approx(
        {"step_scale": 1.1, "call_overhead": 1e-6, "step_scale_large": 1.1, "large_bytes": None})
    # fewer than 4 steps: no split tried
    assert step_model(kern, steps[:3])["large_bytes"] is None
