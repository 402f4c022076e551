"""Federated averaging (FedAvg) of the device halves, for the server agent.

Every ``fedavg_every`` steps each device sends FEDAVG_PUSH (step = the round ``r``) with its
device-half parameters. Round ``r`` completes when ``devices`` devices have pushed (default: every
live device, i.e. not said BYE and reachable), or ``timeout_s`` after its first push; then the
server averages each parameter in float64, casts it back to its dtype, and sends FEDAVG_PULL with
the average to every device that pushed. A push for a completed round (a device that resent after
a timeout) is answered from the kept average; completing round ``r`` forgets the rounds before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from splitc import TransportError
from splitc.runtime.wire import Kind, Message

if TYPE_CHECKING:
    from splitc.runtime.server_agent import _Session

__all__ = ["FedAvgRounds"]


class FedAvgRounds:
    """The open and completed rounds of one server; ``sessions`` is the agent's (shared) dict.

    ``send(peer, message)`` sends a reply; ``on_round(r, n)`` is called when round ``r`` completes
    with ``n`` devices, before the averages are sent.
    """

    def __init__(
        self,
        plan_id: str,
        sessions: dict[int, _Session],
        send: Callable[[bytes, Message], None],
        on_round: Callable[[int, int], None],
        devices: int | None = None,
        timeout_s: float = 60.0,
    ):
        self.plan_id, self.sessions, self.send, self.on_round = (
            plan_id,
            sessions,
            send,
            on_round,
        )
        self.devices, self.timeout_s = devices, timeout_s
        self.open: dict[int, dict] = {}  # round step -> {"t0", "push": {dev: tensors}}
        self.done: dict[int, list[np.ndarray]] = {}

    def push(self, sess: _Session, msg: Message) -> None:
        r = msg.step
        if r in self.done:
            return self._send(sess, r)
        rnd = self.open.setdefault(r, {"t0": time.monotonic(), "push": {}})
        first = next(iter(rnd["push"].values()), None)
        sig = [(t.shape, t.dtype) for t in msg.tensors]
        if first is not None and sig != [(t.shape, t.dtype) for t in first]:
            raise TransportError(
                f"Server: device {sess.device_id} pushed parameters {sig} for FedAvg round {r}, "
                f"others pushed another layout; all devices must run the same device half"
            )
        rnd["push"][sess.device_id] = [np.array(t) for t in msg.tensors]
        live = sum(1 for s in self.sessions.values() if not s.done and s.peer is not None)
        if len(rnd["push"]) >= (self.devices or live):
            self._complete(r)

    def timeouts(self) -> None:
        """Complete the rounds whose first push is older than ``timeout_s``."""
        now = time.monotonic()
        for r in [r for r, v in self.open.items() if now - v["t0"] > self.timeout_s]:
            self._complete(r)

    def _complete(self, r: int) -> None:
        push = self.open.pop(r)["push"]
        stacks = zip(*push.values())
        self.done[r] = [
            np.mean(np.stack(ts).astype(np.float64), axis=0).astype(ts[0].dtype) for ts in stacks
        ]
        for old in [k for k in self.done if k < r]:
            del self.done[old]
        self.on_round(r, len(push))
        for dev in push:
            self._send(self.sessions[dev], r)

    def _send(self, sess: _Session, r: int) -> None:
        if sess.peer is not None:
            self.send(
                sess.peer,
                Message(
                    Kind.FEDAVG_PULL,
                    self.plan_id,
                    r,
                    sess.device_id,
                    tensors=self.done[r],
                ),
            )
