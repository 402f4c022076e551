"""cost_models/sampling.py: kernels and the whole step are sampled in rounds, in turn, the
minimum over all rounds kept, and rounds go on until one ran on a quiet machine."""

import contextlib
import os

import pytest
from splitc.cost_models import sampling
from splitc.cost_models.sampling import QUIET, Probe, time_rounds


class FakeRunner:
    """Records the order of samples; kernel k's i-th sample lasts ``times[k][i]`` seconds."""

    dev = None

    def __init__(self, times):
        self.times = {k: iter(v) for k, v in times.items()}
        self.log = []
        self.pins = 0

    @contextlib.contextmanager
    def pinned(self):
        self.pins += 1
        self.log.append("pin")
        yield 0
        self.log.append("unpin")

    def sample_kernel(self, lib, sym, args, repeats, number, min_repeat_ms):
        self.log.append((sym, repeats))
        return [next(self.times[sym]) for _ in range(repeats)]

    def sample_vm(self, vm, name, args, repeats, number, min_repeat_ms):
        self.log.append((name, repeats))
        return [next(self.times[name]) for _ in range(repeats)]


@pytest.fixture
def no_arrays(monkeypatch):
    monkeypatch.setattr(sampling, "random_args", lambda specs, dev, seed=0: [])


LIB = {"a": lambda: None, "b": lambda: None}
VM = {"step": lambda: None}


def test_rounds_interleave_kernels_and_step_and_keep_the_minimum(no_arrays):
    # 2 samples a round (repeats 6 / 3 rounds); the step, cheap and what the plan is judged
    # on, gets max(6, 15) = 15 every round
    r = FakeRunner({"a": [5, 4, 3, 9, 1.5, 8], "b": [2, 2, 7, 7, 0.5, 9],
                    "step": [10] * 15 + [11] * 14 + [9] + [20] * 15})
    ks, fs, info = time_rounds(r, LIB, [("a", []), ("b", [])], VM, {"step": []}, repeats=6,
                               number=1, min_repeat_ms=1, budget_s=1e9, rounds=3, max_rounds=3)
    assert [t.seconds for t in ks] == [1.5, 0.5] and fs["step"].seconds == 9
    assert [t.repeats for t in ks] == [6, 6] and fs["step"].repeats == 45
    one_round = [("a", 2), ("b", 2), ("step", 15)]
    assert r.log == ["pin", *one_round * 3, "unpin"]  # in turn, never one kernel's run
    assert info == {"rounds": 3, "quiet": None, "probe": [1.0, 1.0, 1.0, 1.0]}


def test_rounds_go_on_until_a_quiet_round(no_arrays):
    readings = iter([1.3, 1.2, 1.0, 1.2, 1.0, 1.01, 1.5])
    r = FakeRunner({"a": [1.0] * 20})
    ks, fs, info = time_rounds(r, LIB, [("a", [])], None, {}, repeats=3, number=1,
                               min_repeat_ms=1, budget_s=1e9, rounds=3, max_rounds=8,
                               probe=lambda: next(readings))
    # rounds 1-4 each have a reading >= 1.05 at one end; round 5 ran between 1.0 and 1.01
    assert info == {"rounds": 5, "quiet": True, "probe": [1.3, 1.2, 1.0, 1.2, 1.0, 1.01]}
    assert ks[0].repeats == 5 and fs == {}


def test_rounds_stop_at_max_rounds_on_a_busy_machine(no_arrays):
    r = FakeRunner({"a": [1.0] * 20})
    _, _, info = time_rounds(r, LIB, [("a", [])], None, {}, repeats=3, number=1,
                             min_repeat_ms=1, budget_s=1e9, rounds=2, max_rounds=4,
                             probe=lambda: QUIET + 0.1)
    assert info["rounds"] == 4 and info["quiet"] is False


def test_kernel_arguments_are_allocated_afresh_every_round(monkeypatch):
    made = []
    monkeypatch.setattr(sampling, "random_args", lambda specs, dev, seed=0: made.append(seed)
                        or [])
    r = FakeRunner({"a": [1.0] * 9, "b": [1.0] * 9})
    time_rounds(r, LIB, [("a", []), ("b", [])], None, {}, repeats=9, number=1,
                min_repeat_ms=1, budget_s=1e9, rounds=3, max_rounds=3)
    assert made == [0, 1] * 3  # the same values (seeds) each round, at new addresses


def test_slow_kernels_get_fewer_samples_but_two_a_round(monkeypatch, no_arrays):
    clock = iter([0.0, 0.5])  # the warm-up call takes 0.5 s
    monkeypatch.setattr(sampling.time, "perf_counter", lambda: next(clock))
    r = FakeRunner({"a": [0.5] * 20})
    ks, _, _ = time_rounds(r, LIB, [("a", [])], None, {}, repeats=30, number=1,
                           min_repeat_ms=1, budget_s=0.06, rounds=3, max_rounds=3)
    assert ks[0].repeats == 6  # 0.06 s budget / 0.5 s a call -> the floor, 2 a round


def test_runner_pins_only_a_one_thread_local_runner(monkeypatch):
    from splitc.cost_models.rpc import Runner

    r = Runner("llvm")
    before = os.sched_getaffinity(0)
    try:
        monkeypatch.setattr(Runner, "threads", property(lambda self: 1))
        with r.pinned() as cpu:
            assert os.sched_getaffinity(0) == {cpu}
        assert os.sched_getaffinity(0) == before
        monkeypatch.setattr(Runner, "threads", property(lambda self: 2))
        with r.pinned():  # a thread pool's workers would inherit the pin: none
            assert os.sched_getaffinity(0) == before
    finally:
        r.close()


def test_probe_reads_relative_to_its_best():
    from splitc.cost_models.rpc import Runner

    r = Runner("llvm")
    try:
        p = Probe(r, "llvm")
        assert p() == 1.0  # the first reading is the best so far
        assert p() >= 1.0 and all(0 < b < 1 for b in p.best.values())
        # an earlier process's best carried in: a reading is measured against it
        fast = Probe(r, "llvm", {k: v / 4 for k, v in p.best.items()})
        assert fast() >= 2.0 and fast.best == {k: v / 4 for k, v in p.best.items()}
    finally:
        r.close()
