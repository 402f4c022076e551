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


def _raw_server(lsock: socket.socket, nbytes: int, rounds: int) -> None:
    conn, _ = lsock.accept()
    buf = memoryview(bytearray(nbytes))  # preallocated once: the best case for a raw socket
    hdr = memoryview(bytearray(8))
    for _ in range(rounds):
        _recv_exact(conn, hdr)
        _recv_exact(conn, buf[: struct.unpack("<Q", hdr)[0]])
        conn.sendall(b"k")
    conn.close()


def _splitc_server(addr: str, nbytes: int, rounds: int) -> None:
    spec = (TensorSpec("x", (nbytes // 4,), "float32"),)
    srv = ServerTransport(addr, max_frame_bytes=wire.CHUNK)
    exp = Expect(PLAN, frozenset([Kind.FORWARD]), {Kind.FORWARD: spec})
    for _ in range(rounds):
        peer, frames = srv.recv(60)
        msg = wire.decode(frames, exp)  # validated against the spec, as the server agent does
        srv.send(peer, wire.encode(Message(Kind.GRADIENT, PLAN, msg.step)))
    srv.close()


def round_trips(nbytes: int, repeat: int) -> tuple[list[float], list[float]]:
    """Round-trip seconds of one ``nbytes`` tensor + ack over a raw TCP socket (8-byte length
    + payload) and over splitc (wire + ZeroMQ), on two open connections, rounds alternating so
    both see the same machine load. The first round of each warms up and is dropped."""
    rounds = repeat + 1
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    raw_pid = _fork(lambda: _raw_server(lsock, nbytes, rounds))
    raw_port = lsock.getsockname()[1]
    lsock.close()
    with socket.socket() as s:  # a free port; the child binds it (zmq contexts do not fork)
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    zmq_pid = _fork(lambda: _splitc_server(addr, nbytes, rounds))
    c = socket.create_connection(("127.0.0.1", raw_port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dev = DeviceTransport(addr)
    x = np.ones(nbytes // 4, np.float32)
    raw, spl = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        c.sendall(struct.pack("<Q", x.nbytes))
        c.sendall(memoryview(x).cast("B"))
        c.recv(1)
        t1 = time.perf_counter()
        dev.send(wire.encode(Message(Kind.FORWARD, PLAN, i, tensors=[x])))
        if dev.recv(60) is None:
            raise RuntimeError("no reply from the splitc server")
        t2 = time.perf_counter()
        raw.append(t1 - t0)
        spl.append(t2 - t1)
    c.close()
    dev.close()
    os.waitpid(raw_pid, 0)
    os.waitpid(zmq_pid, 0)
    return raw[1:], spl[1:]


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
    return (
        statistics.median(x.total_s for x in times),
        statistics.mean(x.compute_s + x.server_s for x in times),
    )


def _halves(package):
    from splitc.runtime.tvm_halves import load_device_half, load_server_half

    return load_device_half(package), load_server_half(package)


def _serve_train(dev, srv, loader, epochs, codec="none"):
    from splitc.runtime.device_agent import train
    from splitc.runtime.server_agent import ServerAgent

    stop = threading.Event()
    agent = ServerAgent(srv, stop_event=stop)
    t = threading.Thread(target=agent.run)
    t.start()
    try:
        return agent, train(dev, agent.address, loader, epochs=epochs, codec=codec)
    finally:
        stop.set()
        t.join()


def compiled_overhead(package, steps: int) -> tuple[float, float]:
    """(median in-process step s, median split-over-loopback step s) for compiled halves: the
    same three calls (device forward, server step, device backward) with and without the link."""
    from splitc.runtime.data import DataLoader, load_digits_split

    dev, srv = _halves(package)
    bs = int(dev.manifest["inputs"][0]["shape"][0])
    xtr, ytr, _, _ = load_digits_split()
    loader = DataLoader(xtr, ytr, bs)
    local = []
    for i in range(steps):
        x, y = loader.batch(i)
        t0 = time.perf_counter()
        _, grads = srv.step(dev.forward([x]), y)
        dev.backward(grads)
        local.append(time.perf_counter() - t0)
    dev, srv = _halves(package)
    _, res = _serve_train(dev, srv, loader, epochs=-(-steps // loader.batches_per_epoch))
    return statistics.median(local[2:]), statistics.median(t.total_s for t in res.times[2:])


def codec_effects(package, epochs: int) -> list[tuple[str, float, float, float]]:
    """(codec, bytes up per step, bytes down per step, test accuracy) on digits."""
    from splitc.runtime.data import DataLoader, load_digits_split
    from splitc.runtime.device_agent import evaluate

    xtr, ytr, xte, yte = load_digits_split()
    rows = []
    for codec in ["none", "fp16", "int8", "topk:0.1", "zstd", "lz4"]:
        dev, srv = _halves(package)
        bs = int(dev.manifest["inputs"][0]["shape"][0])
        stop = threading.Event()
        from splitc.runtime.device_agent import train
        from splitc.runtime.server_agent import ServerAgent

        agent = ServerAgent(srv, stop_event=stop)
        t = threading.Thread(target=agent.run)
        t.start()
        try:
            res = train(dev, agent.address, DataLoader(xtr, ytr, bs), epochs=epochs, codec=codec)
            acc = evaluate(dev, agent.address, xte, yte, batch_size=bs)
        finally:
            stop.set()
            t.join()
        n = len(res.steps)
        rows.append((codec, res.bytes_up / n, res.bytes_down / n, acc))
    return rows


@click.command()
@click.option("--sizes", default="1,4,16,64", help="tensor sizes in MB (1 MB = 2**20 bytes)")
@click.option("--repeat", default=10, show_default=True)
@click.option("--links", default="10Mbps,100Mbps,1Gbps", show_default=True)
@click.option(
    "--package",
    type=click.Path(exists=True),
    default=None,
    help="a split.tar (e.g. of tools/models/demo_cnn.onnx): compiled-step overhead "
    "and codec effects on bytes and accuracy",
)
@click.option("--epochs", default=10, show_default=True, help="per codec, with --package")
def main(sizes: str, repeat: int, links: str, package: str | None, epochs: int) -> None:
    if package:
        local, split = compiled_overhead(package, 60)
        print("## Compiled halves: in-process step vs split over loopback (median)\n")
        print(
            f"in-process {local * 1e3:.2f} ms, split {split * 1e3:.2f} ms: transport overhead "
            f"{(split - local) * 1e3:.2f} ms per step\n"
        )
        print(f"## Codecs on digits ({epochs} epochs, both directions)\n")
        print("| codec | bytes up/step | bytes down/step | test accuracy |")
        print("|---|---:|---:|---:|")
        for codec, up, down, acc in codec_effects(package, epochs):
            print(f"| {codec} | {up:.0f} | {down:.0f} | {acc:.2%} |")
        print()
        sys.stdout.flush()
    print(f"## Throughput, round trip of one tensor + ack, {repeat} rounds each (loopback)\n")
    print("Raw and splitc rounds alternate on two open connections so both see the same")
    print("machine load; best and median GB/s.\n")
    print(
        "| size | raw socket best / median | splitc (zmq + wire) best / median | ratio of medians |"
    )
    print("|---:|---:|---:|---:|")
    for mb in [int(s) for s in sizes.split(",")]:
        nbytes = mb << 20
        r, z = round_trips(nbytes, repeat)
        rb, rm = nbytes / min(r) / 1e9, nbytes / statistics.median(r) / 1e9
        zb, zm = nbytes / min(z) / 1e9, nbytes / statistics.median(z) / 1e9
        print(f"| {mb} MB | {rb:.2f} / {rm:.2f} | {zb:.2f} / {zm:.2f} | {zm / rm:.0%} |")
    sys.stdout.flush()
    print("\n## Per-step overhead of the agents (tiny compute, 2 KB cut)\n")
    med, comp = agent_steps(2048, 200, None)
    print(
        f"median step {med * 1e6:.0f} us, of which compute {comp * 1e6:.0f} us: "
        f"overhead {(med - comp) * 1e6:.0f} us per step (HELLO/step/ack framing, validation, "
        f"two zmq hops)\n"
    )
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
            print(
                f"| {link} | {cut >> 10} KB | {pred * 1e3:.1f} | {med * 1e3:.1f} | "
                f"{med / pred:.2f} |"
            )


if __name__ == "__main__":
    main()
