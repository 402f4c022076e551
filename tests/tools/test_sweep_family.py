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
    r = CliRunner().invoke(main, [str(out), "5", "--kinds", "pool"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"1 blocks timed into {out / 'fam.jsonl'}"
    rows = [json.loads(line) for line in (out / "fam.jsonl").read_text().splitlines()]
    kern = [x for x in rows if x["type"] == "kernel"]
    assert kern and all(x["train_only"] and x["model"] == f"{PREFIX}0_004_pool" for x in kern)
    assert [x["type"] for x in rows].count("done") == 1
    # again: the block is done, nothing is timed twice
    r = CliRunner().invoke(main, [str(out), "5", "--kinds", "pool"])
    assert r.exit_code == 0, r.output
    assert len((out / "fam.jsonl").read_text().splitlines()) == len(rows)
    # --start skips blocks: from the 5th on, with no kind filter, the pool block only
    r = CliRunner().invoke(main, [str(out), "5", "--start", "4"])
    assert r.exit_code == 0 and f"block 1/1: {PREFIX}0_004_pool.onnx" in r.output


def test_sweep_family_unknown_kind():
    r = CliRunner().invoke(main, ["/tmp/never-made", "5", "--kinds", "conv,lstm"])
    assert r.exit_code != 0
    assert "sweep_family: unknown kind 'lstm'; use conv, dense, dwconv, attention, pool" in \
        str(r.exception)
