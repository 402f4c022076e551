"""Fixtures for runtime tests: numpy halves, digits data, a server agent in a thread.

All traffic is on 127.0.0.1 with ports picked by the OS; every wait is bounded.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "helpers"))

import numpy_halves
from splitc.runtime.data import DataLoader, load_digits_split
from splitc.runtime.server_agent import ServerAgent

BATCH = 16


@pytest.fixture(scope="session")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture
def loader(digits):
    xtr, ytr, _, _ = digits
    return DataLoader(xtr, ytr, BATCH, seed=3)


@pytest.fixture
def halves():
    return numpy_halves


class RunningServer:
    """A ServerAgent running in a daemon thread; ``stop()`` joins it (bounded)."""

    def __init__(self, half, listen="127.0.0.1:0", **kw):
        self.stop_event = threading.Event()
        self.events = []
        self.agent = ServerAgent(
            half, listen, stop_event=self.stop_event, on_event=self.events.append, **kw
        )
        self.address = self.agent.address
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.result = self.agent.run()

    def stop(self, timeout=10.0):
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server thread did not stop"
        return self.result


@pytest.fixture
def start_server():
    servers = []

    def start(half, **kw):
        s = RunningServer(half, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        if s.thread.is_alive():
            s.stop()


@pytest.fixture
def port():
    return numpy_halves.free_port()
