"""tools/bench_cost_model.py: accuracy over the small and the big test models."""

import pytest
from splitc.tools.bench_cost_model import _fresh_lines, _set_accuracy
from splitc.tools.time_steps import summarize


def test_set_accuracy_weights_models_by_their_kernels():
    acc = {"group_kernels": {"lt_2us": 10, "model=mlp": 30, "model=encoder": 10},
           "trees": {"groups": {"lt_2us": 0.5, "model=mlp": 0.9, "model=encoder": 0.5}},
           "roofline": {"groups": {"lt_2us": 0.0, "model=mlp": 0.1, "model=encoder": 0.3}}}
    out = _set_accuracy(acc, "trees")
    assert out["lt_2us"] == (10, 0.5, 0.0)
    assert out["small test models (session 4's 7)"] == (30, 0.9, pytest.approx(0.1))
    assert out["big test models"] == (10, 0.5, 0.3)
    assert out["all test models"] == (40, pytest.approx(0.8), pytest.approx(0.15))


def test_fresh_lines_score_predictions_against_the_fresh_median():
    fresh = summarize({"mlp": [0.5, 0.5625, 0.625], "stray": [1.0]},
                      {"mlp": {"measured": 0.625, "kernel_sum": 0.5, "op_sum": 0.5625}})
    # one line per model the bench knows: median, spread, kernel-sum and op-sum errors
    assert _fresh_lines(fresh) == [
        "  mlp                 562.500 (spread 25.0%) |  -11.1% |   +0.0%"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flag, fresh", [([], True), (["--in-process"], False)])
def test_in_process_times_every_workload_in_the_bench_process(monkeypatch, tmp_path, flag,
                                                               fresh):
    from click.testing import CliRunner
    from splitc.cost_models import calibrate as cal
    from splitc.tools import bench_cost_model as bench

    seen = []

    def stop(cfg):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(bench, "_models", lambda out, big=False: {})
    monkeypatch.setattr(cal, "calibrate", stop)
    res = CliRunner().invoke(bench.main, ["--out", str(tmp_path), *flag])
    assert isinstance(res.exception, _Stop)
    assert seen[0].fresh_processes is fresh
