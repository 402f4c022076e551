"""tools/sweep_family.py: the family sweep alone, resumable, as --train-rows data."""

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
    assert r.output.splitlines()[-1] == f"1 blocks timed into {out / 'fam.jsonl'} (1 a process)"
    rows = [json.loads(line) for line in (out / "fam.jsonl").read_text().splitlines()]
    kern = [x for x in rows if x["type"] == "kernel"]
    assert kern and all(x["train_only"] and x["model"] == f"{PREFIX}0_004_pool" for x in kern)
    assert [x["type"] for x in rows].count("done") == 1
    # again: the block is done, nothing is timed twice and no process is started for it
    r = CliRunner().invoke(main, [str(out), "5", "--kinds", "pool"])
    assert r.exit_code == 0, r.output
    assert "1 blocks already measured" in r.output and "block 1/1" not in r.output
    assert len((out / "fam.jsonl").read_text().splitlines()) == len(rows)
    # --start skips blocks: from the 5th on, with no kind filter, the pool block only; timed
    # in this process, which finds its rows
    r = CliRunner().invoke(main, [str(out), "5", "--start", "4", "--blocks-per-process", "0"])
    assert r.exit_code == 0 and f"block 1/1: {PREFIX}0_004_pool.onnx" in r.output
    assert "already measured" in r.output
    assert r.output.splitlines()[-1] == f"1 blocks timed into {out / 'fam.jsonl'}"


def test_sweep_family_process_that_dies(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import subprocess

    from splitc.tools import sweep_family

    monkeypatch.setattr(sweep_family.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, -9, ""))
    out = tmp_path / "fam"
    r = CliRunner().invoke(main, [str(out), "5", "--kinds", "dwconv,pool",
                                  "--blocks-per-process", "2"])
    assert r.exit_code == 0, r.output
    assert (f"FAILED {PREFIX}0_002_dwconv.onnx, {PREFIX}0_004_pool.onnx: the timing process "
            "exited with -9") in r.output
    assert r.output.splitlines()[-1] == (f"0 blocks timed into {out / 'fam.jsonl'}, 2 failed "
                                         "(2 a process)")


def test_sweep_family_carries_the_probe_best(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import subprocess

    from splitc.tools import sweep_family

    cmds, best = [], {"probe_mm": 1e-6, "probe_add": 2e-4}

    def run(cmd, **kw):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"failed": 0, "probe_best": best}))

    monkeypatch.setattr(sweep_family.subprocess, "run", run)
    r = CliRunner().invoke(main, [str(tmp_path / "fam"), "5", "--kinds", "dwconv,pool"])
    assert r.exit_code == 0, r.output
    # the first process starts with no reading; the next with the first one's best
    arg = [c[c.index("--probe-best") + 1] for c in cmds]
    assert [json.loads(a) for a in arg] == [{}, best]


def test_sweep_family_unknown_kind():
    r = CliRunner().invoke(main, ["/tmp/never-made", "5", "--kinds", "conv,lstm"])
    assert r.exit_code != 0
    assert "sweep_family: unknown kind 'lstm'; use conv, dense, dwconv, attention, pool" in \
        str(r.exception)
