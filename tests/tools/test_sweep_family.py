"""tools/sweep_family.py: the family sweep alone, resumable, as --train-rows data."""

import io
import json

import pytest
from click.testing import CliRunner
from splitc.cost_models.family_sweep import PREFIX
from splitc.tools.sweep_family import main


def test_sweep_family_times_training_rows_and_resumes(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "fam"
    # blocks 0-4 are conv, dense, dwconv, attention, pool; --kinds pool keeps the 5th only
    # the block is timed in a fresh process of its own (the default)
    r = CliRunner().invoke(main, [str(out), "5", "--kinds", "pool"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == (f"1 blocks timed into {out / 'fam.jsonl'}, each in a "
                                         "fresh process")
    assert "round 1: " in r.output  # the child's progress, passed on
    rows = [json.loads(line) for line in (out / "fam.jsonl").read_text().splitlines()]
    kern = [x for x in rows if x["type"] == "kernel"]
    assert kern and all(x["train_only"] and x["model"] == f"{PREFIX}0_004_pool" for x in kern)
    assert [x["type"] for x in rows].count("done") == 1
    # again: the block is done, nothing is timed twice and no process is started for it
    r = CliRunner().invoke(main, [str(out), "5", "--kinds", "pool"])
    assert r.exit_code == 0, r.output
    assert "1 blocks already measured" in r.output and "block 1/" not in r.output
    assert len((out / "fam.jsonl").read_text().splitlines()) == len(rows)
    # --start skips blocks: from the 4th on, with no kind filter, the attention block (the
    # pool block is done), timed in this process
    r = CliRunner().invoke(main, [str(out), "5", "--start", "3", "--in-process"])
    assert r.exit_code == 0, r.output
    assert f"block 1/1: {PREFIX}0_003_attention.onnx" in r.output
    assert r.output.splitlines()[-1] == f"1 blocks timed into {out / 'fam.jsonl'} in this process"
    rows = [json.loads(line) for line in (out / "fam.jsonl").read_text().splitlines()]
    assert [x["model"] for x in rows if x["type"] == "done"] == [
        f"{PREFIX}0_004_pool", f"{PREFIX}0_003_attention"]
    # --blocks: that sweep's pool block timed again into another dataset, nothing drawn
    again = tmp_path / "again"
    r = CliRunner().invoke(main, [str(again), "5", "--kinds", "pool", "--in-process",
                                  "--blocks", str(out / "family")])
    assert r.exit_code == 0, r.output
    assert f"block 1/1: {PREFIX}0_004_pool.onnx" in r.output and not (again / "family").exists()
    new = [json.loads(line) for line in (again / "fam.jsonl").read_text().splitlines()]
    assert {x["model"] for x in new} == {f"{PREFIX}0_004_pool"}


def test_sweep_family_goes_on_past_a_process_that_dies(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from splitc.cost_models import fresh

    class Dead:  # a timing process killed by a signal before it printed its result
        def __init__(self, cmd, **kw):
            self.stdin, self.stdout = io.StringIO(), io.StringIO("round 1: ...\n")

        def wait(self):
            return -9

    monkeypatch.setattr(fresh.subprocess, "Popen", Dead)
    out = tmp_path / "fam"
    r = CliRunner().invoke(main, [str(out), "5", "--kinds", "dwconv,pool"])
    assert r.exit_code == 0, r.output
    for name in (f"{PREFIX}0_002_dwconv.onnx", f"{PREFIX}0_004_pool.onnx"):
        assert (f"FAILED {name}: BuildError: Calibrate: the process timing "
                f"{out / 'family' / name} exited with -9; the rows it finished are in "
                f"{out / 'fam.jsonl'}: run again to resume") in r.output
    assert r.output.splitlines()[-1] == (f"0 blocks timed into {out / 'fam.jsonl'}, 2 failed, "
                                         "each in a fresh process")


def test_sweep_family_unknown_kind():
    r = CliRunner().invoke(main, ["/tmp/never-made", "5", "--kinds", "conv,lstm"])
    assert r.exit_code != 0
    assert "sweep_family: unknown kind 'lstm'; use conv, dense, dwconv, attention, pool" in \
        str(r.exception)
