"""Transport benchmark: throughput per tensor size vs a raw socket, per-step overhead, and
measured vs predicted step time under an emulated link.

    python -m splitc.tools.bench_transport [--sizes 1,4,16,64] [--repeat 10]

Prints markdown tables. Throughput pattern (both stacks): the sender sends one tensor, the
receiver reads all of it into memory and answers with a small ack (the request/reply shape of a
split-learning step), repeated; GB/s = bytes / median round trip. The receiver is a separate
process (fork) so neither side shares the GIL with the other.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import sys
import threading
import time

import click
import numpy as np

from splitc.cost_models.link import parse_rate
from splitc.runtime import wire
from splitc.runtime.halves import CutSpec
from splitc.runtime.transport import DeviceTransport, ServerTransport
from splitc.runtime.wire import Expect, Kind, Message, TensorSpec

PLAN = "bench00000000000"


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _recv_exact(conn: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = conn.recv_into(buf[got:])
        if not n:
            raise ConnectionError("peer closed")
        got += n


def raw_socket(nbytes: int, repeat: int) -> list[float]:
    """Round-trip seconds of ``nbytes`` over a plain TCP socket (8-byte length + payload)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    def server():
        conn, _ = lsock.accept()
        buf = memoryview(bytearray(nbytes))
        hdr = memoryview(bytearray(8))
        for _ in range(repeat + 1):
            _recv_exact(conn, hdr)
            _recv_exact(conn, buf[: struct.unpack("<Q", hdr)[0]])
            conn.sendall(b"k")
        conn.close()

    pid = _fork(server)
    lsock.close()
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = np.ones(nbytes // 4, np.float32)
    times = []
    for _ in range(repeat + 1):  # the first round warms up
        t0 = time.perf_counter()
        c.sendall(struct.pack("<Q", payload.nbytes))
        c.sendall(memoryview(payload).cast("B"))
        c.recv(1)
        times.append(time.perf_counter() - t0)
    c.close()
    os.waitpid(pid, 0)
    return times[1:]


def splitc_transport(nbytes: int, repeat: int) -> list[float]:
    """Round-trip seconds of one FORWARD-like message through wire + ZeroMQ transport, validated
    against the transport spec on receipt (as the server agent does)."""
    n = nbytes // 4
    spec = (TensorSpec("x", (n,), "float32"),)
    with socket.socket() as s:  # a free port; the child binds it (zmq contexts do not fork)
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"

    def server():
        srv = ServerTransport(addr, max_frame_bytes=wire.CHUNK)
        exp = Expect(PLAN, frozenset([Kind.FORWARD]), {Kind.FORWARD: spec})
        for _ in range(repeat + 1):
            got = srv.recv(60)
            peer, frames = got
            msg = wire.decode(frames, exp)
            srv.send(peer, wire.encode(Message(Kind.GRADIENT, PLAN, msg.step)))
        srv.close()

    pid = _fork(server)
    dev = DeviceTransport(addr)
    x = np.ones(n, np.float32)
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        dev.send(wire.encode(Message(Kind.FORWARD, PLAN, i, tensors=[x])))
        if dev.recv(60) is None:
            raise RuntimeError("no reply")
        times.append(time.perf_counter() - t0)
    dev.close()
    os.waitpid(pid, 0)
    return times[1:]


class _MLP:
    """Device/server halves whose cut is ``batch x hidden`` float32; compute is tiny on purpose
    (it is the transport being measured)."""

    def __init__(self, batch: int, hidden: int):
        self.plan_id = PLAN
        self.cut = (CutSpec("h", (batch, hidden), "float32", True),)
        self.h = np.ones((batch, hidden), np.float32)

    def forward(self, inputs):
        return [self.h]

    def backward(self, grads):
        pass

    def step(self, cut, labels):
        return 0.5, [cut[0]]

    def infer(self, x):
        return [self.h]

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass


def agent_steps(cut_bytes: int, steps: int, link_rate: float | None) -> tuple[float, float]:
    """(median measured step s, mean device+server compute s) over the real agents."""
    from splitc.runtime.data import DataLoader
    from splitc.runtime.device_agent import train
    from splitc.runtime.server_agent import ServerAgent

    batch = 16
    hidden = max(1, cut_bytes // (4 * batch))
    half = _MLP(batch, hidden)
    stop = threading.Event()
    agent = ServerAgent(half, stop_event=stop)
    t = threading.Thread(target=agent.run)
    t.start()
    data = DataLoader(np.zeros((batch, 1), np.float32), np.zeros(batch, np.int64), batch)
    res = train(half, agent.address, data, epochs=steps + 1, link_rate=link_rate)
    stop.set()
    t.join()
    times = res.times[1:]
    return (statistics.median(x.total_s for x in times),
            statistics.mean(x.compute_s + x.server_s for x in times))


@click.command()
@click.option("--sizes", default="1,4,16,64", help="tensor sizes in MB (1 MB = 2**20 bytes)")
@click.option("--repeat", default=10, show_default=True)
@click.option("--links", default="10Mbps,100Mbps,1Gbps", show_default=True)
def main(sizes: str, repeat: int, links: str) -> None:
    print(f"## Throughput, round trip of one tensor + ack, median of {repeat} (loopback)\n")
    print("| size | raw socket GB/s | splitc (zmq + wire) GB/s | ratio |")
    print("|---:|---:|---:|---:|")
    for mb in [int(s) for s in sizes.split(",")]:
        nbytes = mb << 20
        raw = nbytes / statistics.median(raw_socket(nbytes, repeat)) / 1e9
        spl = nbytes / statistics.median(splitc_transport(nbytes, repeat)) / 1e9
        print(f"| {mb} MB | {raw:.2f} | {spl:.2f} | {spl / raw:.0%} |")
    sys.stdout.flush()
    print("\n## Per-step overhead of the agents (tiny compute, 2 KB cut)\n")
    med, comp = agent_steps(2048, 200, None)
    print(f"median step {med * 1e6:.0f} us, of which compute {comp * 1e6:.0f} us: "
          f"overhead {(med - comp) * 1e6:.0f} us per step (HELLO/step/ack framing, validation, "
          f"two zmq hops)\n")
    print("## Emulated link (token bucket in the transport): measured vs predicted step time\n")
    print("| link | cut | predicted ms | measured ms | measured/predicted |")
    print("|---|---:|---:|---:|---:|")
    for link in links.split(","):
        rate = parse_rate(link)
        for cut in (64 << 10, 1 << 20):
            steps = 5 if rate < 5e6 and cut > 1e5 else 20
            med, comp = agent_steps(cut, steps, rate)
            # Bytes per step on the link: the cut up, its gradient down, each plus 46 + 80 of
            # headers and ~100 bytes of labels/meta: predicted = compute + 2 * bytes / rate.
            pred = comp + 2 * (cut + 46 + 80) / rate
            print(f"| {link} | {cut >> 10} KB | {pred * 1e3:.1f} | {med * 1e3:.1f} | "
                  f"{med / pred:.2f} |")


if __name__ == "__main__":
    main()
