"""`splitc` end to end through click's CliRunner (and real processes for serve/train)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from fractions import Fraction

import pytest
from click.testing import CliRunner
from splitc.cost_models.link import Link
from splitc.passes.opgraph import OpGraph
from splitc.passes.plan import Placement, evaluate
from splitc.tools.cli import cli
from splitc.tools.session import DEMO_MODEL

PRIORS = ["--device", "jetson-orin-nano", "--server", "a100"]


def _run(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    return r


def test_plan_json_is_independently_checkable(tmp_path):
    out = tmp_path / "plan.json"
    r = _run(["plan", str(DEMO_MODEL), "--batch-size", "32", "--uplink", "10Mbps", *PRIORS,
              "--json", str(out), "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    plan, graph = doc["plan"], OpGraph.from_json(doc["graph"])
    # Re-cost the placement from the JSON alone: same exact breakdown as the plan claims.
    link = Link.from_json(plan["link"])
    bd = evaluate(graph, Placement.of(plan["device_ops"]), link, plan["objective"])
    exact = {k: Fraction(v) for k, v in plan["breakdown"]["exact"].items()}
    assert {k: getattr(bd, k) for k in exact} == exact
    assert sum(exact.values()) == bd.total  # total == sum of its parts, exactly
    # The chosen plan is never worse than any baseline the report lists.
    totals = {k: Fraction(sum(Fraction(x) for x in v["breakdown"]["exact"].values()))
              for k, v in doc["comparison"].items()}
    assert all(totals["mincut"] <= t for t in totals.values())
    # 10 Mbps up: uplink = (logits 32*10*4 B + labels 32*8 B) * 8 / 1e7 s when cut at logits
    assert set(doc["comparison"]) >= {"mincut", "blockwise", "layerwise", "device-only",
                                      "server-only", "exhaustive"}


def test_plan_dot_colours_the_cut(tmp_path):
    dot, js = tmp_path / "g.dot", tmp_path / "p.json"
    r = _run(["plan", str(DEMO_MODEL), "--batch-size", "8", *PRIORS, "--dot", str(dot), "-q",
              "--json", str(js), "--no-baselines", "--pin", "lv11=server"])
    assert r.exit_code == 0, r.output
    plan = json.loads(js.read_text())["plan"]
    cut = {c["name"] for c in plan["cut"]}
    assert cut and "lv11" not in plan["device_ops"]  # the pin moved the dense layers up
    text = dot.read_text()
    assert text.startswith("digraph splitc {")
    assert '"lv11" [fillcolor="#ffe5cc"' in text  # server ops orange
    for line in text.splitlines():
        if "tooltip=" in line:
            tensor = line.split('tooltip="')[1].split('"')[0]
            assert ("color=red" in line) == (tensor in cut), line


def test_plan_pin_matching_no_op_is_one_line_error():
    r = CliRunner().invoke(cli, ["plan", str(DEMO_MODEL), "--batch-size", "8", *PRIORS,
                                 "--pin", "nosuchop=server", "-q"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: Partition: pin 'nosuchop'")


def test_plan_rejects_corrupt_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(DEMO_MODEL.read_bytes()[:1000])
    r = CliRunner().invoke(cli, ["plan", str(bad), "--batch-size", "8", "-q"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().startswith("error: Frontend:")


def test_compile_rejects_bad_target_before_compiling(tmp_path):
    r = CliRunner().invoke(cli, ["compile", str(DEMO_MODEL), "--batch-size", "8", *PRIORS,
                                 "--device-target", "cuda -arch=sm_99x", "-o",
                                 str(tmp_path / "s.tar"), "-q"])
    assert r.exit_code == 5, r.output
    assert r.stderr.strip().startswith("error: ")
    assert not (tmp_path / "s.tar").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.network
def test_serve_and_train_processes(tmp_path):
    """Real `splitc serve` and `splitc train` processes over loopback, with checkpoints."""
    tar = tmp_path / "s.tar"
    r = _run(["compile", str(DEMO_MODEL), "--batch-size", "64", *PRIORS, "--pin", "lv11=server",
              "--optimizer", "adam", "--lr", "0.003", "-o", str(tar), "-q"])
    assert r.exit_code == 0, r.output
    port = _free_port()
    steps = 3 * 21  # three epochs of 1347 digits at batch 64
    server = subprocess.Popen(
        [sys.executable, "-m", "splitc.tools.cli", "serve", str(tar), "--listen",
         f"127.0.0.1:{port}", "--checkpoint-dir",
         str(tmp_path / "ckpt"), "--checkpoint-every", "10", "-q"])
    try:
        out = subprocess.run(
            [sys.executable, "-m", "splitc.tools.cli", "train", str(tar), "--connect",
             f"127.0.0.1:{port}", "--epochs", "3", "--json", "-q"],
            check=False, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["steps"] == steps
        # cut = lv9, [64, 512] float32 = 131,072 B up and down per step (+ 64*8 B labels up)
        assert summary["bytes_down"] >= steps * 131072
        assert summary["test_accuracy"] > 0.8
        server.terminate()  # SIGTERM: a clean stop with a final checkpoint
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    assert any((tmp_path / "ckpt").iterdir())


@pytest.mark.slow
def test_demo_reaches_95_percent(tmp_path):
    r = _run(["demo", "--workdir", str(tmp_path), "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["accuracy"] >= 0.95
    assert out["steps"] == 15 * (1347 // 32)


@pytest.mark.slow
def test_calibrate_then_plan_with_the_learned_profile(tmp_path):
    prof = tmp_path / "cal.json"
    r = _run(["calibrate", "--models", str(DEMO_MODEL), "--batch-size", "16", "--no-sweep",
              "--repeats", "2", "-o", str(prof), "-q", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["profile"] == str(prof) and summary["dataset"] == str(tmp_path / "cal.jsonl")
    assert summary["provenance"]["status"] == "calibrated"
    assert (tmp_path / "cal.jsonl").read_text().count("\n") > 0  # the dataset, with provenance
    out = tmp_path / "p.json"
    r = _run(["plan", str(DEMO_MODEL), "--batch-size", "16", "--device", str(prof),
              "--server", "a100", "--no-baselines", "--json", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["graph"]["cost_model"].startswith("device=learned:cal(")
    # `splitc profiles FILE --json` lists it after the bundled ones, with its provenance
    r = _run(["profiles", str(prof), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert rows[-1]["name"] == str(prof) and rows[-1]["learned"]
    assert rows[-1]["provenance"]["status"] == "calibrated"
    assert {"a100", "local-cpu"} <= {row["name"] for row in rows}


def test_calibrate_passes_the_synthetic_model_counts(tmp_path, monkeypatch):
    import splitc.cost_models.calibrate as cal

    seen = []
    monkeypatch.setattr(cal, "calibrate", lambda cfg: seen.append(cfg) or cfg.output)
    rows = tmp_path / "old.jsonl"
    rows.write_text("")
    r = _run(["calibrate", "--synthetic", "3", "--synthetic-large", "2", "--family-sweep", "4",
              "--train-rows", str(rows), "-q", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    c = seen[0]
    assert (c.synthetic, c.synthetic_large, c.family_sweep, c.train_rows) == (3, 2, 4, (rows,))
    assert c.base_profile == "local-cpu"  # the roofline constants: this CPU, measured now
    assert c.fresh_processes  # each workload timed in a fresh process unless --in-process
    # pinned to another profile's (a board's with --rpc-tracker, or an earlier calibration's)
    r = _run(["calibrate", "--roofline-from", "jetson-orin-nano", "--in-process", "-q", "-o",
              str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert seen[1].base_profile == "jetson-orin-nano" and not seen[1].fresh_processes
    assert seen[1].fit and seen[1].jobs is None  # fitted, in one worker per CPU
    r = _run(["calibrate", "--no-fit", "--jobs", "3", "-q", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert not seen[2].fit and seen[2].jobs == 3
    assert r.output == f"timed into {tmp_path / 'p.json'}; run again without --no-fit to fit " \
        "the profile\n"
    r = _run(["calibrate", "--jobs", "0", "-q", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and len(seen) == 3
    # a bad name fails before anything is timed
    r = _run(["calibrate", "--roofline-from", str(tmp_path / "none.json"), "-q", "-o",
              str(tmp_path / "p.json")])
    assert r.exit_code == 2 and len(seen) == 3
    assert f"error: Profile: profile file {str(tmp_path / 'none.json')!r} does not exist" \
        in r.output


def test_profiles_names_a_missing_profile_file(tmp_path):
    missing = str(tmp_path / "none.json")
    r = _run(["profiles", missing])
    assert r.exit_code == 2
    assert f"error: Profile: profile file {missing!r} does not exist" in r.output


def test_profiles_summarises_held_out_accuracy():
    from splitc.tools.cli import _accuracy_summary

    acc = {"models": ["a", "b"], "kernels": 539,
           "roofline": {"within_10pct": 0.106, "mape_pct": 1082.2, "groups": {}},
           "family_trees+sched": {"within_10pct": 0.801, "mape_pct": 9.0, "groups": {}}}
    learned = {"kernel_regressor_name": "family_trees+sched", "accuracy": acc}
    assert _accuracy_summary(learned) == {
        "kernels": 539, "models": 2, "chosen": "family_trees+sched",
        "family_trees+sched": {"within_10pct": 0.801, "mape_pct": 9.0},
        "roofline": {"within_10pct": 0.106, "mape_pct": 1082.2}}
    assert _accuracy_summary({}) is None  # priors have no learned part
    # the table's line counts kernels: 485 of 539 is 89.98 %, not "90.0%"
    from splitc.tools.cli import _accuracy_line

    assert _accuracy_line({"kernels": 539, "chosen": "t/unscaled", "t/unscaled": {
        "within_10pct": 485 / 539, "mape_pct": 4.64}}) == (
        "held-out 485 of 539 kernels (89.98%) within 10% (t/unscaled, MAPE 4.6%)")
    # calibrated with --recheck: the two passes' agreement, and a warning when it is low
    quiet = {**learned, "accuracy": {**acc, "repeat": {"within_10pct": 0.972}}}
    assert _accuracy_summary(quiet)["repeat_within_10pct"] == 0.972
    assert "warning" not in _accuracy_summary(quiet)
    loaded = {**learned, "accuracy": {**acc, "repeat": {"within_10pct": 0.712}}}
    assert _accuracy_summary(loaded)["warning"] == (
        "the two timing passes agreed within 10% for only 71% of kernels (the machine was "
        "loaded while timing); recalibrate when it is quiet")
