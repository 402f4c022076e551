"""ZeroMQ transport behind one small interface: the device a DEALER, the server a ROUTER.

Measured on loopback (tools/bench_transport.py) ZeroMQ keeps within reach of a raw socket for
1-64 MB tensors; gRPC and asyncio streams did not (shared/ARCHITECTURE.md, issue 4).

ZeroMQ traps handled here:

- High-water marks count messages, not bytes, and a ROUTER drops silently at its limit:
  ``ROUTER_MANDATORY`` turns both an unknown peer and a full queue into errors, and ``SNDTIMEO``
  bounds how long a stuck peer can block the server (``send`` returns False: drop the session).
- ``LINGER=0`` can drop the last gradient on close: a bounded linger (2 s) flushes it without
  letting ``close`` hang on a dead peer.
- ``MAXMSGSIZE`` on the server: a frame larger than any legal one disconnects that peer inside
  libzmq before it is buffered in full (legal-but-wrong sizes get an ERROR reply from the agent).
- Every receive has a timeout (``poll``): no loop here can hang.

Link emulation: ``link_rate`` (bytes/s) on the device runs a token bucket per direction, so a
step over loopback takes as long as it would over that link (bytes / rate, plus the burst).
"""

from __future__ import annotations

import time

import zmq
from splitc import InputError, TransportError
from splitc.runtime import security
from zmq.utils.monitor import recv_monitor_message

__all__ = ["DeviceTransport", "ServerTransport", "TokenBucket", "endpoint"]

LINGER_MS = 2000
SEND_TIMEOUT_MS = 10_000


def endpoint(addr: str) -> str:
    """``"127.0.0.1:5555"`` -> ``"tcp://127.0.0.1:5555"``; tcp:// and ipc:// pass through."""
    if "://" in addr:
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not (port.isdigit() or port == "*"):
        raise InputError(f"Transport: bad address {addr!r}; use HOST:PORT such as 127.0.0.1:5555")
    return f"tcp://{host}:{port}"


def _nbytes(frames) -> int:
    return sum(memoryview(f).nbytes if not hasattr(f, "buffer") else len(f.buffer) for f in frames)


class TokenBucket:
    """Token bucket in bytes: ``consume(n)`` sleeps until ``n`` bytes fit the rate.

    Debt model: tokens refill at ``rate`` up to ``burst``; a message larger than the tokens left
    drives them negative and the caller sleeps the debt off: with the default burst 0 a 1 MB
    message at 1 MB/s waits 1 s, and back-to-back messages queue behind each other.
    """

    def __init__(
        self, rate: float, burst: float | None = None, clock=time.monotonic, sleep=time.sleep
    ):
        if rate <= 0:
            raise InputError(f"Transport: link rate must be positive, got {rate}")
        self.rate = float(rate)
        # Default burst 0: every message pays its serialisation time bytes / rate, as on a real
        # link. A burst (even tc's 4 KiB) lets one direction's bucket refill while the other
        # sends, which halves a request/reply step: measured 4.8 ms for a 10.5 ms link step
        # with a 125 KB burst.
        self.burst = float(burst if burst is not None else 0.0)
        self.tokens = self.burst
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def consume(self, nbytes: int) -> float:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate) - nbytes
        self._last = now
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / self.rate
        self._sleep(wait)
        return wait


class ServerTransport:
    """ROUTER socket: ``recv`` -> (peer routing id, frames); ``send(peer, frames)``."""

    def __init__(
        self,
        listen: str,
        *,
        curve: security.CurveServer | None = None,
        hwm: int = 1000,
        max_frame_bytes: int = -1,
    ):
        self.ctx = zmq.Context()
        self.auth = security.start_authenticator(self.ctx, curve) if curve else None
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.LINGER, LINGER_MS)
        s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        # HWMs count messages: 1000 queued multipart messages per peer, each a step's tensors.
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        if curve:
            security.apply_server(s, curve)
        addr = endpoint(listen)
        try:
            if addr.startswith("tcp://") and addr.endswith(":0"):
                s.bind(addr[:-2] + ":*")
            else:
                s.bind(addr)
        except zmq.ZMQError as e:
            s.close(0)
            self._term()
            raise TransportError(f"Transport: cannot listen on {listen} ({e}); pick a free port")
        self.sock = s
        self.endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = self.endpoint.split("://", 1)[1]
        self.bytes_in = self.bytes_out = 0

    def recv(self, timeout_s: float):
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart(copy=False)
        self.bytes_in += _nbytes(frames[1:])
        return frames[0].bytes, frames[1:]

    def send(self, peer: bytes, frames) -> bool:
        """Send; False when the peer is gone or its queue stays full for SNDTIMEO."""
        try:
            self.sock.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise TransportError(f"Transport: send failed ({e})") from None
        self.bytes_out += _nbytes(frames)
        return True

    def _term(self):
        if self.auth:
            self.auth.stop()
        self.ctx.term()

    def close(self) -> None:
        self.sock.close(LINGER_MS)
        self._term()


class DeviceTransport:
    """DEALER socket to one server, with optional link emulation and CurveZMQ."""

    def __init__(
        self,
        connect: str,
        *,
        curve: security.CurveClient | None = None,
        link_rate: float | None = None,
        hwm: int = 64,
    ):
        self.ctx = zmq.Context()
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, LINGER_MS)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        # While the server is down there is no pipe and send blocks: give up after 1 s, the
        # agent's resend loop tries again until its own deadline.
        s.setsockopt(zmq.SNDTIMEO, 1000)
        if curve:
            security.apply_client(s, curve)
        # Handshake failures are the only sign of a refused key; completed handshakes after a
        # disconnect tell the agent that a message in flight may be lost (resend it then).
        self._mon = s.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
        )
        self.connections = 0  # completed handshakes so far (1 + reconnects)
        s.connect(endpoint(connect))
        self.sock = s
        self._poller = zmq.Poller()
        self._poller.register(s, zmq.POLLIN)
        self._poller.register(self._mon, zmq.POLLIN)
        self.connect_to = connect
        self.up = TokenBucket(link_rate) if link_rate else None
        self.down = TokenBucket(link_rate) if link_rate else None
        self.bytes_up = self.bytes_down = 0
        self.link_wait_s = 0.0

    def send(self, frames) -> bool:
        """Queue a message; False if no connection took it within 1 s (server down: retry)."""
        n = _nbytes(frames)
        if self.up:
            self.link_wait_s += self.up.consume(n)
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            raise TransportError(f"Transport: cannot send to {self.connect_to} ({e})") from None
        self.bytes_up += n
        return True

    def check_events(self) -> None:
        """Count (re)connections; raise if the security handshake failed (a refused key,
        mismatched settings)."""
        while self._mon.poll(0):
            ev = recv_monitor_message(self._mon)
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connections += 1
                continue
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                continue
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise TransportError(
                    f"Transport: the server at {self.connect_to} refused this device's key; add "
                    f"its public key to the server's allow-list"
                )
            raise TransportError(
                f"Transport: security handshake with {self.connect_to} failed; both ends "
                f"need matching CurveZMQ settings"
            )

    def recv(self, timeout_s: float):
        """Frames of the next message, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        poller = self._poller
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = dict(poller.poll(min(left, 0.5) * 1000))
            if self._mon in ready:
                self.check_events()
            if self.sock in ready:
                frames = self.sock.recv_multipart(copy=False)
                n = _nbytes(frames)
                self.bytes_down += n
                if self.down:
                    self.link_wait_s += self.down.consume(n)
                return frames

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)
        self.sock.close(LINGER_MS)
        self.ctx.term()
