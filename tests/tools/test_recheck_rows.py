"""tools/recheck_rows.py: a dataset's workloads timed again and compared kernel by kernel."""

import json

import pytest
from click.testing import CliRunner
from splitc.tools.recheck_rows import compare, main


def _row(workload, symbol, seconds, family="conv", role="forward"):
    return {"type": "kernel", "workload": workload, "function": "f", "role": role,
            "symbol": symbol, "seconds": seconds, "features": {"family": family}}


def test_compare_pairs_same_kernels_only():
    us1, us15 = 2.0 ** -20, 2.0 ** -16  # 0.95 and 15.3 us: ratios exact in binary
    old = [_row("a", "k1", us1), _row("a", "k2", us15, "matmul"), _row("b", "k1", 4e-6),
           _row("b", "gone", 1e-6), _row("b", "zero", 0.0),
           {"type": "step", "workload": "a", "seconds": 1.0}]
    new = [_row("a", "k1", 1.25 * us1), _row("a", "k2", 0.9375 * us15, "matmul"),
           _row("b", "k1", 4e-6), _row("b", "zero", 1e-6),  # 0 s before: no ratio
           _row("c", "k1", 9.0)]  # c: not in the old rows
    res = compare(old, new)
    assert res["all"] == {"kernels": 3, "median_ratio": 1.0, "within_10pct": 2 / 3}
    assert res["family"] == {
        "conv": {"kernels": 2, "median_ratio": 1.125, "within_10pct": 0.5},
        "matmul": {"kernels": 1, "median_ratio": 0.9375, "within_10pct": 1.0}}
    assert res["size"] == {
        "2-10 us": {"kernels": 1, "median_ratio": 1.0, "within_10pct": 1.0},
        "< 2 us": {"kernels": 1, "median_ratio": 1.25, "within_10pct": 0.0},
        ">= 10 us": {"kernels": 1, "median_ratio": 0.9375, "within_10pct": 1.0}}
    assert res["workload"]["a"]["kernels"] == 2 and res["workload"]["b"]["kernels"] == 1
    assert ("a", "k1", "forward", us1, 1.25 * us1) in res["pairs"]
    assert compare(old, [])["all"] is None


def test_recheck_rows_times_a_swept_block_again(tmp_path):
    pytest.importorskip("torch")
    from splitc.tools.sweep_family import main as sweep

    out = tmp_path / "fam"
    r = CliRunner().invoke(sweep, [str(out), "5", "--kinds", "pool"])
    assert r.exit_code == 0, r.output
    ds = out / "fam.jsonl"
    before = ds.read_text()
    kern = [x for x in map(json.loads, before.splitlines()) if x["type"] == "kernel"]
    r = CliRunner().invoke(main, [str(ds), "--models", str(out / "family"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    # every kernel of the one block is timed again and paired with its stored row
    assert res["all"]["kernels"] == len(kern) == len(res["pairs"])
    assert sum(v["kernels"] for v in res["family"].values()) == len(kern)
    assert all(old > 0 and new > 0 for *_, old, new in res["pairs"])
    assert ds.read_text() == before  # the dataset is not written


def test_recheck_rows_without_models(tmp_path):
    ds = tmp_path / "d.jsonl"
    ds.write_text("")
    r = CliRunner().invoke(main, [str(ds), "--models", str(tmp_path), "--prefix", "famC"])
    assert r.exit_code != 0
    assert str(r.exception) == (
        f"recheck_rows: no workload of {str(ds)!r} (target 'host', board 'local', prefix "
        f"'famC') has its model in {str(tmp_path)!r} as <model>.onnx")
