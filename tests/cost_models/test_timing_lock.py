"""Processes timing on one machine take turns (``sampling.timing_lock``)."""

import threading
import time

from splitc.cost_models.sampling import LOCK_ENV, timing_lock


class _Local:
    remote = None


class _Remote:
    remote = object()  # a board behind RPC times there: no lock here


def test_a_second_timer_waits_for_the_first(tmp_path, monkeypatch):
    lock = tmp_path / "t.lock"
    monkeypatch.setenv(LOCK_ENV, str(lock))
    held, order, said = threading.Event(), [], []

    def first():
        with timing_lock(_Local()):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    t0 = time.perf_counter()
    with timing_lock(_Local(), said.append):  # a second open file: flock makes it wait
        order.append("second in")
        waited = time.perf_counter() - t0
    t.join()
    assert order == ["first done", "second in"] and waited > 0.3
    assert said == [f"waiting for another process's timing to end (lock {lock})"]
    with timing_lock(_Local(), said.append):  # free again: no wait, nothing said
        pass
    assert len(said) == 1


def test_no_lock_for_rpc_or_when_disabled(tmp_path, monkeypatch):
    lock = tmp_path / "t.lock"
    monkeypatch.setenv(LOCK_ENV, str(lock))
    with timing_lock(_Remote()):
        assert not lock.exists()
    monkeypatch.setenv(LOCK_ENV, "")
    with timing_lock(_Local()), timing_lock(_Local()):  # disabled: nested entry does not wait
        pass
