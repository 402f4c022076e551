"""cost_models/fresh.py: each workload of a calibration timed in a fresh process; what the
parent says when that process fails or dies (real children: test_calibrate.py, and the
last test here)."""

import io
import json

import pytest
from splitc import BuildError, InputError
from splitc.cost_models import fresh
from splitc.cost_models.calibrate import CalibrateConfig

JOBS = []  # what each fake child read on stdin


class FakeChild:
    """A child that reads its job and prints ``lines``, then exits with ``rc``."""

    def __init__(self, lines, rc):
        self.lines, self.rc = lines, rc

    def __call__(self, cmd, stdin, stdout, text):
        assert cmd[1:] == ["-m", "splitc.cost_models.fresh"] and text
        self.stdin = io.StringIO()
        self.stdin.close = lambda: JOBS.append(json.loads(self.stdin.getvalue()))
        self.stdout = io.StringIO("".join(ln + "\n" for ln in self.lines))
        return self

    def wait(self):
        return self.rc


def _run(monkeypatch, tmp_path, lines, rc=0):
    msgs = []
    monkeypatch.setattr(fresh.subprocess, "Popen", FakeChild(lines, rc))
    cfg = CalibrateConfig(output=tmp_path / "cal.json", repeats=2)
    return fresh.time_fresh(cfg, (tmp_path / "m.onnx", 4), {"probe_mm": 1e-6}, msgs.append), msgs


def test_the_job_goes_in_and_the_probe_best_comes_back(monkeypatch, tmp_path):
    best, msgs = _run(monkeypatch, tmp_path, [
        "round 1: 3 kernels", fresh._RESULT + json.dumps(
            {"error": None, "probe_best": {"probe_mm": 5e-7, "probe_add": 1e-4}})])
    assert best == {"probe_mm": 5e-7, "probe_add": 1e-4} and msgs == ["round 1: 3 kernels"]
    job = JOBS[-1]
    assert job["workload"] == [str(tmp_path / "m.onnx"), 4]
    assert job["probe_best"] == {"probe_mm": 1e-6}
    assert job["dataset"] == str(tmp_path / "cal.jsonl")
    assert job["cfg"]["repeats"] == 2 and job["cfg"]["tuning_records"] is None


def test_a_process_that_dies(monkeypatch, tmp_path):
    with pytest.raises(BuildError) as e:
        _run(monkeypatch, tmp_path, ["round 1: 3 kernels"], rc=-9)
    assert str(e.value) == (f"Calibrate: the process timing {tmp_path / 'm.onnx'} exited with "
                            f"-9; the rows it finished are in {tmp_path / 'cal.jsonl'}: run "
                            "again to resume")


def test_a_workload_that_fails_in_the_child(monkeypatch, tmp_path):
    res = {"error": {"message": "Traceback\n  x\nAssertionError: bad layout", "class": None},
           "probe_best": {}}
    with pytest.raises(BuildError) as e:
        _run(monkeypatch, tmp_path, [fresh._RESULT + json.dumps(res)], rc=0)
    assert str(e.value) == (f"Calibrate: compiling the training step of {tmp_path / 'm.onnx'} "
                            "failed (AssertionError: bad layout); leave this model out of "
                            "--models")
    res["error"] = {"message": "Calibrate: target 'cuda' is not a CPU", "class": "InputError"}
    with pytest.raises(InputError, match="^Calibrate: target 'cuda' is not a CPU$"):
        _run(monkeypatch, tmp_path, [fresh._RESULT + json.dumps(res)], rc=0)


def test_a_generated_workload_that_fails_is_reported_not_left_out():
    from splitc.cost_models.calibrate import failed_message

    assert failed_message("s/syn0_001_cnn.onnx", "x\nValueError: no", "synthetic") == (
        "Calibrate: compiling the training step of s/syn0_001_cnn.onnx failed (ValueError: "
        "no); this generated training model should build: please report it")
    assert failed_message("a.onnx", "", None).endswith("failed (error); leave this model out "
                                                       "of --models")


def test_a_real_child_hands_back_its_error(tmp_path):
    """No board from the tracker (nothing listens there): the child's SplitcError, raised
    again in the parent with its class and message."""
    import socket

    from splitc import SplitcError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = CalibrateConfig(output=tmp_path / "cal.json", rpc_tracker=f"127.0.0.1:{port}",
                          rpc_key="k")
    with pytest.raises(SplitcError, match=r"^Calibrate: cannot get a board with key 'k' from "
                                          rf"the RPC tracker 127\.0\.0\.1:{port} "):
        fresh.time_fresh(cfg, ("sweep", None), {}, lambda m: None)
