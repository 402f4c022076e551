"""tools/bench_gpu.py without a GPU (``--arch cpu``): the build stage's manifest feeds the run
stage's PyTorch weights to the compiled step by name, the correctness check finds loss and
every updated parameter equal to PyTorch's, and the split package check reproduces its llvm
reference exactly. The GPU run itself needs a lent machine (README, "On a GPU")."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from splitc.tools.bench_gpu import main
from splitc.tools.session import DEMO_MODEL

pytestmark = pytest.mark.slow


def test_build_then_run_on_cpu(tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(
        main,
        [
            "build",
            "--models",
            "small_resnet",
            "--arch",
            "cpu",
            "--split",
            str(DEMO_MODEL),
            "-o",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    entry = man["models"][0]
    # running statistics are not trained; every norm layer keeps its own weights
    assert not any("running" in n for n in entry["params"])
    assert len(entry["params"]) == len(set(entry["params"])) == 26
    r = CliRunner().invoke(
        main,
        ["run", str(out), "--repeats", "1", "--json", str(tmp_path / "r.json")],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert "3 steps, 16 results vs the llvm server, worst rel err 0.0e+00" in r.output
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["loss_rel_err"] < 1e-5 and row["param_rel_err"] < 1e-5
    assert "| small_resnet | 32x3x32x32 |" in r.output
