"""tools/time_steps.py: whole steps timed in fresh processes, against the bench's figures."""

import json

import pytest
from click.testing import CliRunner
from splitc.tools.time_steps import main, summarize


def test_summarize_against_the_bench():
    runs = {"mlp": [0.5, 0.625, 0.5625], "tiny_cnn-f59d": [0.25], "other": [1.0, 2.0]}
    bench = {"mlp": {"measured": 0.625, "kernel_sum": 0.5, "op_sum": 0.75},
             "tiny_cnn": {"measured": 0.25, "kernel_sum": None, "op_sum": 0.125}}
    res = summarize(runs, bench)
    assert res["mlp"] == {
        "runs": [0.5, 0.625, 0.5625], "median": 0.5625, "spread": 0.25,
        "bench": {"name": "mlp", "measured": 0.625,
                  "kernel_sum": 0.5, "kernel_sum_vs_median": 0.5 / 0.5625 - 1,
                  "kernel_sum_vs_measured": 0.5 / 0.625 - 1,
                  "op_sum": 0.75, "op_sum_vs_median": 0.75 / 0.5625 - 1,
                  "op_sum_vs_measured": 0.75 / 0.625 - 1}}
    # matched by prefix (the bench names tiny_cnn, the workload tiny_cnn-<hash>); no kernel sum
    assert res["tiny_cnn-f59d"]["bench"] == {"name": "tiny_cnn", "measured": 0.25,
                                             "op_sum": 0.125, "op_sum_vs_median": -0.5,
                                             "op_sum_vs_measured": -0.5}
    assert "bench" not in res["other"] and res["other"]["spread"] == 1.0
    assert summarize(runs)["mlp"].keys() == {"runs", "median", "spread"}


@pytest.mark.slow
def test_time_steps_in_two_processes(tiny_cnn_onnx, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"steps": {"tiny_cnn": {
        "measured": 5e-5, "kernel_sum": 4e-5, "op_sum": 6e-5}}}))
    r = CliRunner().invoke(main, [str(tiny_cnn_onnx), "--processes", "2", "--json",
                                  "--bench-results", str(results)])
    assert r.exit_code == 0, r.output
    (model, row), = json.loads(r.stdout).items()
    assert model.startswith("tiny_cnn") and len(row["runs"]) == 2
    assert all(t > 0 for t in row["runs"]) and row["median"] == sum(row["runs"]) / 2
    assert row["bench"]["kernel_sum_vs_measured"] == pytest.approx(-0.2)
    assert "pass 2/2: " + model in r.stderr


def test_time_steps_reports_a_failed_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    r = CliRunner().invoke(main, [str(bad), "--processes", "1"])
    assert r.exit_code != 0
    assert str(r.exception).startswith(f"time_steps: timing {str(bad)!r} failed:\n")
