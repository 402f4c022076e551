"""cost_models/features.py, regressors.py, learned.py: features, JSON regressors, fallback."""

import dataclasses
import json
import math

import numpy as np
import pytest
from splitc import InputError
from splitc.cost_models.base import OpFeatures
from splitc.cost_models.features import (
    FEATURE_NAMES,
    KernelFeatures,
    family_of,
    op_kernels,
    parse_kinds,
    vector,
)
from splitc.cost_models.learned import (
    LEARNED_VERSION,
    LearnedModel,
    Regressor,
    cost_model_for,
    fit_regressor,
    mape,
    within,
)
from splitc.cost_models.profiles import DeviceProfile, load_profile
from splitc.cost_models.roofline import RooflineModel

PROV = {"status": "calibrated", "source": "test"}


@pytest.mark.parametrize("name,kinds", [
    ("fused_conv2d_transpose_add3_less_where", ("conv2d_transpose", "add", "less", "where")),
    ("fused_conv2d1_add_add2", ("conv2d", "add", "add")),
    ("te_nll_loss_backward_no_weight", ("nll_loss",)),
    ("fused_add1_tir_sqrt", ("add", "sqrt")),
    ("collapse_sum1", ("collapse_sum",)),
    ("fused_expand_dims_broadcast_to", ("expand_dims", "broadcast_to")),
    ("log_softmax", ("log_softmax",)),
])
def test_parse_kinds(name, kinds):
    assert parse_kinds(name) == kinds


@pytest.mark.parametrize("kinds,family", [
    (("conv2d_transpose", "add", "less", "where"), "conv_t"),
    (("add", "conv2d", "relu"), "conv"),
    (("matmul", "divide"), "matmul"),
    (("maximum", "minimum"), "ewise"),  # elementwise max/min, not the max reduction
    (("multiply", "collapse_sum"), "reduce"),
    (("expand_dims", "broadcast_to"), "layout"),
    (("relax.nn.conv2d",), "conv"),
])
def test_family_of(kinds, family):
    assert family_of(kinds) == family


def _conv_features(input_grad=True):
    # conv 3x3, 8 -> 16 channels, x[2,8,8,8] -> y[2,16,8,8] with weight [16,8,3,3] (no bias):
    # FLOPs = 2 * (2*16*8*8) * (8*3*3) = 2 * 2048 * 72 = 294912
    # weight bytes = 16*8*3*3*4 = 4608; x bytes = 2*8*8*8*4 = 4096; y bytes = 2*16*8*8*4 = 8192
    return OpFeatures("relax.nn.conv2d", 294912, 4096 + 4608, 8192, 4608,
                      ((2, 8, 8, 8), (16, 8, 3, 3)), ((2, 16, 8, 8),), "float32", True,
                      input_grad)


def test_op_kernels_conv_exact():
    ks = op_kernels(_conv_features())
    (fwd,) = ks["forward"]
    assert fwd.kinds == ("conv2d",) and fwd.flops == 294912 and fwd.role == "forward"
    assert (fwd.bytes_read, fwd.bytes_written, fwd.param_bytes) == (8704, 8192, 4608)
    # backward: data grad (conv2d_transpose: reads dy 8192 + weight 4608, writes dx 4096) and
    # weight grad (conv2d: reads dy 8192 + x 4096, writes dw 4608), each the forward's FLOPs
    dx, dw = ks["backward"]
    assert dx.kinds == ("conv2d_transpose",) and dw.kinds == ("conv2d",)
    assert (dx.flops, dx.bytes_read, dx.bytes_written) == (294912, 12800, 4096)
    assert (dw.flops, dw.bytes_read, dw.bytes_written) == (294912, 12288, 4608)
    # SGD update over 4608 weight bytes = 1152 floats: reads param + grad (2 x 4608), writes
    # 4608, 2 FLOPs per weight = 2304
    (upd,) = ks["update"]
    assert (upd.flops, upd.bytes_read, upd.bytes_written, upd.role) == (2304, 9216, 4608,
                                                                       "update")
    # first layer (reads only the model input): weight grad only
    assert [k.kinds for k in op_kernels(_conv_features(False))["backward"]] == [("conv2d",)]
    # gradient kernels carry the shapes they run on: dx reads dy and w and writes x's shape,
    # dw reads x and dy and writes the weight; the update runs over the weight tensor
    x, w, y = (2, 8, 8, 8), (16, 8, 3, 3), (2, 16, 8, 8)
    assert (dx.in_shapes, dx.out_shapes) == ((y, w), (x,))
    assert (dw.in_shapes, dw.out_shapes) == ((x, y), (w,))
    assert (upd.in_shapes, upd.out_shapes) == ((w, w), (w,))
    assert (fwd.in_shapes, fwd.out_shapes) == ((x, w), (y,))


def test_op_kernels_one_update_per_weight_tensor():
    from splitc.cost_models.base import OpFeatures

    # layer norm over 64 features owns gamma and beta (2 x 256 bytes): two update kernels
    ln = OpFeatures("relax.nn.layer_norm", 1024, 2560, 2048, 512, ((8, 64), (64,), (64,)),
                    ((8, 64),), has_params=True)
    ups = op_kernels(ln)["update"]
    assert [(k.out_shapes, k.flops, k.bytes_read, k.bytes_written) for k in ups] == \
        [(((64,),), 128.0, 512, 256)] * 2
    # weights that do not match the inputs' sizes: one flat tensor
    odd = OpFeatures("relax.add", 64, 512, 256, 100, ((8, 8), (8, 8)), ((8, 8),),
                     has_params=True)
    assert [k.out_shapes for k in op_kernels(odd)["update"]] == [((25,),)]


def test_op_kernels_elementwise_and_reduce_gradient_shapes():
    from splitc.cost_models.base import OpFeatures

    relu = OpFeatures("relax.nn.relu", 64, 256, 256, 0, ((8, 8),), ((8, 8),))
    (b,) = op_kernels(relu)["backward"]
    assert (b.in_shapes, b.out_shapes) == (((8, 8), (8, 8)), ((8, 8),))
    s = OpFeatures("relax.sum", 64, 256, 32, 0, ((8, 8),), ((8,),))
    (b,) = op_kernels(s)["backward"]
    assert b.kinds == ("broadcast_to",) and (b.in_shapes, b.out_shapes) == (((8,),), ((8, 8),))


def test_kernel_features_json_roundtrip():
    k = op_kernels(_conv_features())["backward"][0]
    assert KernelFeatures.from_json(json.loads(json.dumps(k.to_json()))) == k
    assert len(vector(k, 1e11, 1e10)) == len(FEATURE_NAMES)


def test_shape_facts_power_of_two_and_output_dims():
    def facts(ins, outs):
        k = KernelFeatures(("transpose",), 0.0, 4, 4, 0, "forward", ins, outs)
        v = vector(k, 1e11, 1e10)
        return v[FEATURE_NAMES.index("pow2_out_inner"):]

    # encoder's head split: every dim a power of two, 4 dims out
    assert facts(((16, 64, 256),), ((16, 4, 64, 64),)) == [6.0, 8.0, 1.0, 4.0, 2.0, 6.0, 6.0]
    # 192 = 64 x 3, 384 = 128 x 3: not every dim a power of two
    assert facts(((4, 128, 384),), ((4, 2, 128, 192),)) == \
        [6.0, 7.0, 0.0, 2.0, 1.0, 7.0, math.log2(192)]
    # a 1-d output fills the last slot, the others read -1; 2048 = 2^11 is capped at 2^10
    assert facts(((2048,), (2048,)), ((2048,),)) == [10.0, 10.0, 1.0, -1.0, -1.0, -1.0, 11.0]
    # a scalar output and no inputs: zeros, and -1 in every dim slot
    assert facts((), ((),)) == [0.0, 0.0, 1.0, -1.0, -1.0, -1.0, -1.0]


def _synthetic(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 6, (n, len(FEATURE_NAMES)))
    y = -6 + 0.8 * X[:, 0] + 0.3 * np.sin(X[:, 1]) + 0.1 * X[:, 2]
    return X, y


@pytest.mark.parametrize("kind", ["linear", "trees"])
def test_regressor_json_predicts_like_sklearn(kind):
    X, y = _synthetic()
    reg = fit_regressor(kind, X, y)
    back = Regressor.from_json(json.loads(json.dumps(reg.to_json())))
    if kind == "linear":
        from sklearn.linear_model import Ridge

        mu, sd = X.mean(0), X.std(0)
        ref = Ridge(alpha=1.0).fit((X - mu) / sd, y).predict((X - mu) / sd)
    else:
        from sklearn.ensemble import GradientBoostingRegressor

        ref = GradientBoostingRegressor(n_estimators=100, max_depth=3, learning_rate=0.15,
                                        subsample=0.8, random_state=0).fit(X, y).predict(X)
    # leaf values are stored with 7 significant digits: 100 x 0.15 x 5e-8 < 1e-6
    np.testing.assert_allclose(back.predict(X), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["trees", "family_trees"])
def test_offset_regressor_extrapolates_with_the_roofline(kind):
    """Kernels at 40 % of the roofline: with the offset, trees fitted on small kernels price
    a 100x larger one at 40 % too (exact: the ratio is constant); without, at about the
    largest time they saw."""
    col = FEATURE_NAMES.index("log_roofline")
    X = np.zeros((60, len(FEATURE_NAMES)))
    X[:, col] = np.linspace(-6, -4, 60)  # roofline 1 us .. 100 us
    ovh = 1e-6
    y = np.log10((10.0 ** X[:, col] + ovh) / 0.4)
    big = X[-1:].copy()
    big[0, col] = -2.0  # 10 ms of roofline time, outside the training range
    reg = fit_regressor(kind, X, y, offset_overhead=ovh)
    back = Regressor.from_json(json.loads(json.dumps(reg.to_json())))
    want = np.log10((1e-2 + ovh) / 0.4)
    np.testing.assert_allclose(back.predict(big), [want], atol=1e-6)
    np.testing.assert_allclose(back.predict(X), y, atol=1e-6)
    assert fit_regressor(kind, X, y).predict(big)[0] < want - 1.5  # no offset: ~100x short


def test_metrics_exact():
    # errors 5 %, 20 %, 0 %, 50 % -> MAPE 18.75 %, 2 of 4 within 10 %
    pred, meas = [1.05, 1.2, 2.0, 3.0], [1.0, 1.0, 2.0, 2.0]
    assert mape(pred, meas) == pytest.approx(18.75)
    assert within(pred, meas) == 0.5


def _learned_profile(families=("ewise",), version=LEARNED_VERSION, overhead=1e-6):
    X, y = _synthetic()
    reg = fit_regressor("linear", X, y)
    learned = {"version": version, "features": list(FEATURE_NAMES), "regressor": reg.to_json(),
               "kernel_regressor": reg.to_json(), "sched_features": [],
               "families": list(families), "call_overhead": overhead,
               "op_overhead": overhead}
    return DeviceProfile("cal", "cpu", {"float32": 1e11}, 1e10, 2e-6, PROV, learned)


def test_fallback_is_counted_and_named():
    m = LearnedModel(_learned_profile(families=("ewise",)))
    relu = OpFeatures("relax.nn.relu", 1024, 4096, 4096, 0, ((1024,),), ((1024,),))
    m.op_cost(relu)  # forward + backward: 2 ewise kernels, learned
    assert m.fallbacks == 0 and m.name == "learned:cal(linear)"
    c = m.op_cost(_conv_features())  # conv family never measured: roofline prior
    # relu: 2 kernels (fwd, bwd); conv: fwd + 2 bwd conv kernels fall back, update is ewise
    assert (m.fallbacks, m.kernels) == (3, 6)
    assert m.name == "learned:cal(linear; roofline fallback 3/6 kernels)"
    # the forward conv falls back to roofline + overhead, plus the per-op-kernel overhead:
    # max(294912 / 1e11, 16896 / 1e10) + 2e-6 + 1e-6 = 2.94912e-6 + 3e-6
    assert c.forward == pytest.approx(294912 / 1e11 + 2e-6 + 1e-6)


def test_cost_model_for_picks_learned_or_roofline(tmp_path):
    assert isinstance(cost_model_for(load_profile("jetson-orin-nano")), RooflineModel)
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(_learned_profile().to_json()))
    prof = load_profile(str(p))
    assert prof.learned["version"] == LEARNED_VERSION
    assert isinstance(cost_model_for(prof), LearnedModel)
    # profiles without "learned" still load and write the same JSON as before
    assert "learned" not in load_profile("a100").to_json()


def test_learned_model_errors():
    with pytest.raises(InputError, match=r"LearnedModel: profile 'a100' has no 'learned' "
                                         r"section; run splitc calibrate"):
        LearnedModel(load_profile("a100"))
    with pytest.raises(InputError, match=r"has learned version 99, expected 3; recalibrate"):
        LearnedModel(_learned_profile(version=99))
    prof = _learned_profile()
    bad = DeviceProfile("cal", "cpu", {"float32": 1e11}, 1e10, 2e-6, PROV,
                        {**prof.learned, "features": ["x"]})
    with pytest.raises(InputError, match=r"was fitted on other features; recalibrate"):
        LearnedModel(bad)
    with pytest.raises(InputError, match=r"unknown optimizer 'lamb'"):
        LearnedModel(prof, "lamb")
    with pytest.raises(InputError, match=r"unknown regressor 'svm'; use linear, trees or "):
        fit_regressor("svm", *_synthetic())


def test_parallel_guess_follows_the_schedule_threshold():
    from splitc.cost_models.features import parallel_guess

    # injective: 64 x 64 = 4096 output elements reach the 4096-iteration threshold, 64 x 63 not
    big = KernelFeatures(("add",), 4096, 32768, 16384, 0, "forward", (), ((64, 64),))
    small = KernelFeatures(("add",), 4032, 32256, 16128, 0, "forward", (), ((64, 63),))
    assert parallel_guess(big) and not parallel_guess(small)
    # a reduction to 10 outputs with 2 x 4096 FLOPs = 4096 multiply-accumulates: parallel
    red = KernelFeatures(("matmul",), 8192, 1, 40, 0, "forward", (), ((10,),))
    assert parallel_guess(red)
    # measured from the TIR wins over the guess
    assert not parallel_guess(dataclasses.replace(big, parallel=False))


def _mm_local():
    """16x16x32 matmul whose accumulator is cached in a local buffer (the register-tile rule's
    ``cache_write``), no parallel or vector loop."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def mm(a: T.Buffer((16, 32), "float32"), b: T.Buffer((32, 16), "float32"),
           c: T.Buffer((16, 16), "float32")):
        for i, j, k in T.grid(16, 16, 32):
            with T.sblock("c"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    c[vi, vj] = T.float32(0)
                c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]

    sch = tvm.s_tir.Schedule(mm)
    sch.cache_write(sch.get_sblock("c"), 0, "local")
    return sch.mod["main"]


def _ewise_par_vec():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def ewise(a: T.Buffer((64, 256), "float32"), b: T.Buffer((64, 256), "float32")):
        for i in T.parallel(64):
            for j0 in range(32):
                for j1 in T.vectorized(8):
                    with T.sblock("b"):
                        vi = T.axis.spatial(64, i)
                        vj = T.axis.spatial(256, j0 * 8 + j1)
                        b[vi, vj] = a[vi, vj] * T.float32(2)

    return ewise


def test_loop_features_exact():
    import math

    from splitc.cost_models.tir_features import LOOP_FEATURES, loop_features

    f = dict(zip(LOOP_FEATURES, loop_features(_mm_local())))
    # blocks: the reduction into c_local (16*16*32 = 8192 iterations) and the copy to c (256)
    assert (f["n_blocks"], f["n_reduce_blocks"], f["heavy_reduce"]) == (2, 1, 1)
    assert f["log_iters"] == pytest.approx(math.log10(8192 + 256 + 1))
    assert f["log_iters_heavy"] == pytest.approx(math.log10(8192 + 1))
    assert f["log_inner_heavy"] == pytest.approx(math.log10(32))  # k, the innermost loop
    # c_local: 16*16 floats = 1024 bytes; nothing parallel or vectorised
    assert f["local_accum"] == 1 and f["log_alloc_bytes"] == pytest.approx(math.log10(1025))
    assert (f["vec_share"], f["par_share"], f["unscheduled_share"], f["max_lanes"]) == \
        (0, 0, 1, 1)
    g = dict(zip(LOOP_FEATURES, loop_features(_ewise_par_vec())))
    # 64 x 32 x 8 = 16384 iterations, all under parallel(64) and vectorized(8)
    assert g["log_iters"] == pytest.approx(math.log10(16385))
    assert (g["vec_share"], g["par_share"], g["max_lanes"], g["local_accum"]) == (1, 1, 8, 0)
    assert g["log_par_heavy"] == pytest.approx(math.log10(64))
    assert g["log_inner_heavy"] == pytest.approx(math.log10(32))


def test_schedule_features_width_and_metaschedule_part():
    import tvm
    from splitc.cost_models.tir_features import SCHED_FEATURE_NAMES, _context, schedule_features
    from tvm.s_tir import meta_schedule as ms

    f = _ewise_par_vec()
    v = schedule_features(f, tvm.target.Target("llvm"))
    assert len(v) == len(SCHED_FEATURE_NAMES) == 15 + 164
    # the MetaSchedule part is PerStoreFeature of the one store (its max over stores)
    mod = tvm.IRModule({"main": f})
    ref = ms.feature_extractor.PerStoreFeature(extract_workload=False).extract_from(
        _context(mod, tvm.target.Target("llvm")),
        [ms.MeasureCandidate(tvm.s_tir.Schedule(mod), ms.arg_info.ArgInfo.from_prim_func(f))])
    np.testing.assert_allclose(v[15:], ref[0].numpy()[0, :164], atol=1e-5)
    assert any(x > 0 for x in v[15:])


def test_kernel_regressor_serves_kernels_with_schedule_features():
    from splitc.cost_models.features import sched_vector
    from splitc.cost_models.tir_features import SCHED_FEATURE_NAMES

    base = _learned_profile()
    # a schedule-aware regressor that predicts 10^-3 s for everything, the plain one 10^-6
    n = len(FEATURE_NAMES) + len(SCHED_FEATURE_NAMES)
    const = lambda v: Regressor("linear", {"mean": [0.0] * n, "scale": [1.0] * n,
                                           "coef": [0.0] * n, "intercept": v})
    plain = Regressor("linear", {"mean": [0.0] * len(FEATURE_NAMES),
                                 "scale": [1.0] * len(FEATURE_NAMES),
                                 "coef": [0.0] * len(FEATURE_NAMES), "intercept": -6.0})
    prof = dataclasses.replace(base, learned={
        **base.learned, "regressor": plain.to_json(), "kernel_regressor": const(-3.0).to_json(),
        "sched_features": list(SCHED_FEATURE_NAMES), "call_overhead": 0.0, "op_overhead": 0.0})
    m = LearnedModel(prof)
    k = KernelFeatures(("add",), 1024, 8192, 4096, 0, "forward", ((1024,), (1024,)),
                       ((1024,),))
    ks = dataclasses.replace(k, sched=(0.0,) * len(SCHED_FEATURE_NAMES))
    assert len(sched_vector(ks, 1e11, 1e10)) == n
    np.testing.assert_allclose(m.kernel_times([k, ks]), [1e-6, 1e-3])
    # op costs (nothing scheduled yet) use the plain regressor
    relu = OpFeatures("relax.nn.relu", 1024, 4096, 4096, 0, ((1024,),), ((1024,),))
    assert m.op_cost(relu).forward == pytest.approx(1e-6)
    # ... corrected towards the measured step: the role's factor + the per-op-kernel
    # overhead (no step_scale: both were fitted against whole steps)
    scaled = LearnedModel(dataclasses.replace(prof, learned={
        **prof.learned, "op_scale": {"forward/*": 3.0, "backward/*": 2.0},
        "op_overhead": 1e-7, "step_scale": 10.0}))
    assert scaled.op_cost(relu).forward == pytest.approx(3.1e-6)
    assert scaled.op_cost(relu).backward == pytest.approx(2.1e-6)
    # real kernels: step_scale, never op_scale
    assert scaled.kernel_times([ks])[0] == pytest.approx(1e-2)
    with pytest.raises(InputError, match=r"fitted on other schedule features; recalibrate"):
        LearnedModel(dataclasses.replace(prof, learned={**prof.learned,
                                                        "sched_features": ["x"]}))


def test_family_trees_route_rows_by_family_and_roundtrip_json():
    """One ensemble per family with >= 30 rows (a bag of them); the JSON copy predicts exactly
    the same; a profile's single ensemble (before bags) predicts as a bag of one."""
    from splitc.cost_models.features import FAMILIES

    rng = np.random.default_rng(1)
    X = rng.uniform(0, 6, (300, len(FEATURE_NAMES)))
    col = FEATURE_NAMES.index("family=conv_t")
    X[:, col:col + len(FAMILIES)] = 0
    fam = np.array([1] * 150 + [2] * 140 + [3] * 10)  # conv, matmul, 10 loss rows
    X[np.arange(300), col + fam] = 1
    # conv kernels grow with feature 0, matmul kernels with feature 1
    y = np.where(fam == 1, X[:, 0], np.where(fam == 2, -X[:, 1], 0.0))
    reg = fit_regressor("family_trees", X, y)
    assert sorted(reg.params["families"]) == ["conv", "matmul"]  # loss: 10 rows, global
    back = Regressor.from_json(json.loads(json.dumps(reg.to_json())))
    np.testing.assert_array_equal(back.predict(X), reg.predict(X))
    # a profile from before the bags (one ensemble per family, not a list) predicts with it
    one = {**reg.params, "global": reg.params["global"][0],
           "families": {f: e[0] for f, e in reg.params["families"].items()}}
    solo = {**reg.params, "global": reg.params["global"][:1],
            "families": {f: e[:1] for f, e in reg.params["families"].items()}}
    np.testing.assert_array_equal(Regressor("family_trees", one).predict(X),
                                  Regressor("family_trees", solo).predict(X))
    # conv and matmul fit a quantile (sign-only gradients): most rows within 0.01, the few
    # at the ends of the range converge slower in 100 trees (worst 0.79 here)
    err = np.abs(reg.predict(X)[:290] - y[:290])
    assert np.median(err) < 0.01 and err.max() < 1.0


def test_heavy_families_fit_a_low_quantile_the_rest_the_mean():
    """conv, conv_t and matmul ensembles fit the 30th percentile of the target (timing noise
    only adds time), the others least squares, each a bag of three seeds; the JSON copy
    predicts as scikit-learn's mean of the three does."""
    from sklearn.ensemble import GradientBoostingRegressor
    from splitc.cost_models.features import FAMILIES
    from splitc.cost_models.regressors import _BAGS, _QUANTILE, _QUANTILE_FAMILIES

    assert (_QUANTILE, _QUANTILE_FAMILIES) == (0.3, ("conv", "conv_t", "matmul"))
    rng = np.random.default_rng(2)
    X = rng.uniform(0, 6, (240, len(FEATURE_NAMES)))
    col = FEATURE_NAMES.index("family=conv_t")
    X[:, col:col + len(FAMILIES)] = 0
    fam = np.array([FAMILIES.index("conv")] * 120 + [FAMILIES.index("ewise")] * 120)
    X[np.arange(240), col + fam] = 1
    # one-sided noise: a third of the rows 0.1 (26 %) slower, as a loaded machine times them
    y = 0.2 * X[:, 0] + np.where(rng.uniform(size=240) < 1 / 3, 0.1, 0.0)
    back = Regressor.from_json(json.loads(json.dumps(fit_regressor("family_trees", X, y)
                                                     .to_json())))
    conv, ew = slice(0, 120), slice(120, 240)
    # a bag of _BAGS ensembles, seeds 0, 1, 2, averaged
    kw = {"n_estimators": 100, "max_depth": 5, "learning_rate": 0.15, "subsample": 0.8}
    bag = lambda rows, **loss: np.mean(
        [GradientBoostingRegressor(random_state=s, **loss, **kw).fit(X[rows], y[rows])
         .predict(X[rows]) for s in range(_BAGS)], axis=0)
    q, ls = bag(conv, loss="quantile", alpha=0.3), bag(ew)
    assert _BAGS == 3
    np.testing.assert_allclose(back.predict(X[conv]), q, rtol=0, atol=1e-6)
    np.testing.assert_allclose(back.predict(X[ew]), ls, rtol=0, atol=1e-6)


def test_twins_keep_the_median_time_and_price_only_real_kernels():
    from splitc.cost_models.fit import twins

    k = KernelFeatures(("add", "relu"), 512.0, 4096, 2048, 0, "forward", ((8, 64), (8, 64)),
                       ((8, 64),))
    other = dataclasses.replace(k, out_shapes=((64, 8),))
    rows = [{"features": k.to_json(), "seconds": s} for s in (3e-6, 2e-6, 5e-6)]
    rows.append({"features": other.to_json(), "seconds": 7e-6})
    table = twins(rows)
    # the same kernel measured three times: the median (lookup.TWIN_STAT); the role is not
    # part of the identity (an update is the same kernel as a forward on the same sizes)
    # (elementwise: also under the loose key, element counts only, which both share)
    assert table == pytest.approx({"add+relu|8x64,8x64|8x64|float32|512": 3e-6,
                                   "add+relu|8x64,8x64|64x8|float32|512": 7e-6,
                                   "~add+relu|512,512|512|float32|512": 4e-6})
    base = _learned_profile()
    m = LearnedModel(dataclasses.replace(base, learned={
        **base.learned, "twins": table, "step_scale": 2.0, "call_overhead": 1e-7}))
    upd = dataclasses.replace(k, role="update")
    # measured kernels: looked up, then placed in the step (2 x 3 us + 0.1 us)
    np.testing.assert_allclose(m.kernel_times([k, upd]), [6.1e-6, 6.1e-6])
    unseen = dataclasses.replace(k, flops=1024.0)
    assert m.kernel_times([unseen])[0] != pytest.approx(6.1e-6)
    # op kernels (the planner's, not fused kernels) are never looked up
    assert m.kernel_times([k], op_level=True)[0] != pytest.approx(6.1e-6)


def test_learned_model_prices_a_kernel_at_another_batch_by_scaling():
    from splitc.cost_models.lookup import scaled_twins

    def conv(n):  # a 3x3 conv, 64 -> 64 channels at 16x16, on a batch of n
        return KernelFeatures(("conv2d",), 2.0 * n * 64 * 256 * 64 * 9, 65536 * n + 147456,
                              65536 * n, 147456, "forward",
                              ((n, 64, 16, 16), (64, 64, 3, 3)), ((n, 64, 16, 16),))

    base = _learned_profile(families=("conv", "ewise"))
    learned = {**base.learned, "scaled_twins": scaled_twins([(conv(8), 2e-3)]),
               "step_scale": 1.5, "call_overhead": 1e-6}
    m = LearnedModel(dataclasses.replace(base, learned=learned))
    # batch 16 from batch 8: 2 x 2 ms, placed in the step: 1.5 x 4 ms + 1 us
    np.testing.assert_allclose(m.kernel_times([conv(16)]), [6.001e-3])
    # op kernels (the planner's) are never looked up
    assert m.kernel_times([conv(16)], op_level=True)[0] != pytest.approx(6.001e-3)
    # a profile from before scaled look-up has none: predicted
    old = LearnedModel(dataclasses.replace(base, learned={
        k: v for k, v in learned.items() if k != "scaled_twins"}))
    assert old.kernel_times([conv(16)])[0] != pytest.approx(6.001e-3)


def test_elementwise_kernels_are_looked_up_by_element_counts_only():
    from splitc.cost_models.fit import twins
    from splitc.cost_models.lookup import loose_key, measured_time

    ew = KernelFeatures(("multiply", "add"), 1024.0, 8192, 4096, 0, "backward",
                        ((16, 64), (16, 64)), ((16, 64),))
    tr = KernelFeatures(("transpose",), 0.0, 4096, 4096, 0, "forward", ((16, 64),), ((64, 16),))
    table = twins([{"features": ew.to_json(), "seconds": 3e-6},
                   {"features": tr.to_json(), "seconds": 5e-6}])
    # the same elementwise work laid out as [4, 256] or [1024]: found by its element counts
    for shape in ((4, 256), (1024,)):
        moved = dataclasses.replace(ew, in_shapes=(shape, shape), out_shapes=(shape,))
        assert loose_key(moved) == "~multiply+add|1024,1024|1024|float32|1024"
        assert measured_time(table, moved) == 3e-6
    # a transpose's time depends on the shape itself: exact key only
    assert loose_key(tr) is None
    assert measured_time(table, dataclasses.replace(tr, in_shapes=((32, 32),),
                                                    out_shapes=((32, 32),))) is None
    assert measured_time(table, tr) == 5e-6
    # different element counts or FLOPs: not the same kernel
    assert measured_time(table, dataclasses.replace(ew, flops=2048.0)) is None


def test_conv_geometry_features_exact():
    """Three features: fewest channels, input/output height ratio, smallest window
    (log10(x + 1), log2 ratio), so a depthwise or strided conv differs from a dense one."""
    from splitc.cost_models.features import FEATURE_NAMES, vector

    names = ["log_min_channels", "log2_spatial_ratio", "log_min_window"]
    at = FEATURE_NAMES.index(names[0])
    assert FEATURE_NAMES[at:at + 3] == names

    def geometry(k):
        return vector(k, 1e11, 1e10)[at:at + 3]

    # stride-2 3x3 conv, 8 -> 16 channels at 16x16: fewest channels 8, 16/8 = 2, window 3x3
    k = KernelFeatures(("conv2d",), 1e6, 1000, 1000, 0, "forward",
                       ((2, 8, 16, 16), (16, 8, 3, 3)), ((2, 16, 8, 8),))
    assert geometry(k) == pytest.approx([np.log10(9), 1.0, 1.0])
    # depthwise weight gradient (N*C, 1, H, W) x dy -> (C, 1, 3, 3): one channel
    k = KernelFeatures(("conv2d",), 1e6, 1000, 1000, 0, "backward",
                       ((64, 1, 8, 8), (2, 32, 8, 8)), ((32, 1, 3, 3),))
    assert geometry(k) == pytest.approx([np.log10(2), np.log2(8 / 3), 1.0])
    # no 4-d tensor (a matmul): zeros
    k = KernelFeatures(("matmul",), 1e6, 1000, 1000, 0, "forward", ((8, 64), (64, 64)),
                       ((8, 64),))
    assert geometry(k) == [0.0, 0.0, 0.0]


def test_kernel_times_apply_the_large_kernels_step_scale():
    """step_fit.step_model's split: kernels moving large_bytes or more (read + written) take
    step_scale_large, the others step_scale; profiles without it one scale."""
    small = KernelFeatures(("add",), 1e3, 8000, 4000, 0, "forward", ((1000,), (1000,)), ((1000,),))
    large = dataclasses.replace(small, bytes_read=2 ** 22, bytes_written=2 ** 20)
    base = _learned_profile(overhead=0.0)
    one = LearnedModel(base).kernel_times([small, large])
    split = LearnedModel(dataclasses.replace(base, learned={
        **base.learned, "step_scale": 1.5, "call_overhead": 1e-6, "step_scale_large": 2.0,
        "large_bytes": 2 ** 22}))
    np.testing.assert_allclose(split.kernel_times([small, large]),
                               [1.5 * one[0] + 1e-6, 2.0 * one[1] + 1e-6], rtol=1e-9)
    # the boundary belongs to the large side; without large_bytes, one scale
    edge = dataclasses.replace(small, bytes_read=2 ** 22 - 4000, bytes_written=4000)
    assert split.kernel_times([edge])[0] == pytest.approx(
        2.0 * LearnedModel(base).kernel_times([edge])[0] + 1e-6)
    plain = LearnedModel(dataclasses.replace(base, learned={**base.learned, "step_scale": 1.5}))
    np.testing.assert_allclose(plain.kernel_times([small, large]), 1.5 * one, rtol=1e-9)
