"""Faults: killed device / server resumed exactly; bad messages and keys refused while another
device keeps training. Killed agents are forked processes (SIGKILL, no cleanup at all)."""

import os
import re
import signal
import threading
import time

import numpy as np
import numpy_halves as nh
import pytest
import zmq
from splitc import TransportError
from splitc.runtime import checkpoint, security, wire
from splitc.runtime.device_agent import train
from splitc.runtime.server_agent import ServerAgent
from splitc.runtime.wire import Kind, Message

pytestmark = [pytest.mark.network]

STEPS = 60


def _fork(fn):
    """Run ``fn`` in a forked child that never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _kill(pid):
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _reference(loader, steps=STEPS):
    d, s = nh.NumpyDevice(), nh.NumpyServer()
    losses = nh.train_unsplit(d, s, loader, steps)
    return d.state_dict(), s.state_dict(), losses


def test_device_killed_mid_run_resumes_exactly(start_server, loader, tmp_path):
    server = nh.NumpyServer()
    srv = start_server(server)
    ckpt = tmp_path / "dev"

    def slow_device():  # 10 ms per step so the kill lands mid-run
        train(
            nh.NumpyDevice(),
            srv.address,
            loader,
            max_steps=STEPS,
            checkpoint_dir=ckpt,
            checkpoint_every=4,
            on_progress=lambda p: time.sleep(0.01),
            timeout_s=20,
        )

    pid = _fork(slow_device)
    _wait(lambda: any(e.kind == "step" and e.step >= 15 for e in srv.events))
    _kill(pid)
    time.sleep(0.3)  # a FORWARD already in the server's socket is still applied: let it land
    applied_at_kill = srv.agent.sessions[0].applied
    assert 15 <= applied_at_kill < STEPS
    dev = nh.NumpyDevice()
    res = train(
        dev,
        srv.address,
        loader,
        max_steps=STEPS,
        checkpoint_dir=ckpt,
        checkpoint_every=4,
        resume=True,
        timeout_s=20,
    )
    result = srv.stop()
    ref_dev, ref_srv, ref_losses = _reference(loader)
    # The device resumed from its last checkpoint (a multiple of 4) and replayed the steps the
    # server had applied since from the server's reply cache: none applied twice, none lost.
    assert res.resumed_from % 4 == 0 and res.resumed_from <= applied_at_kill
    assert result.replays == applied_at_kill - res.resumed_from
    assert result.steps_applied == STEPS
    assert res.losses == ref_losses[res.resumed_from :]
    assert nh.params_equal(dev.state_dict(), ref_dev)
    assert nh.params_equal(server.state_dict(), ref_srv)


def test_server_killed_mid_run_resumes_exactly(start_server, loader, tmp_path, port):
    sdir, ddir = tmp_path / "srv", tmp_path / "dev"
    addr = f"127.0.0.1:{port}"

    def server_proc():
        ServerAgent(nh.NumpyServer(), addr, checkpoint_dir=sdir, checkpoint_every=5).run()

    pid = _fork(server_proc)
    killed = threading.Event()
    out = {}

    def on_progress(p):
        time.sleep(0.01)
        if p.step == 23 and not killed.is_set():
            _kill(pid)  # the server dies between two steps of the device; its state is lost
            killed.set()

    def device():
        out["res"] = train(
            nh.NumpyDevice(),
            addr,
            loader,
            max_steps=STEPS,
            checkpoint_dir=ddir,
            checkpoint_every=3,
            on_progress=on_progress,
            timeout_s=30,
        )

    t = threading.Thread(target=device)
    t.start()
    _wait(killed.is_set)
    server_ckpt = checkpoint.steps(sdir)[-1]
    assert server_ckpt == 20  # checkpoints every 5 applied steps; step 23 was the last
    server = nh.NumpyServer()
    srv = start_server(server, listen=addr, checkpoint_dir=sdir, checkpoint_every=5, resume=True)
    t.join(60)
    assert not t.is_alive()
    result = srv.stop()
    res = out["res"]
    ref_dev, ref_srv, ref_losses = _reference(loader)
    # The restarted server holds step 20; the device was at 23: it rewound to its checkpoint
    # 18 (multiple of 3, <= 20), got 19-20 from the server's restored reply cache, then 21..60.
    assert res.rewinds == 1
    assert result.replays == 2 and result.steps_applied == STEPS
    assert res.steps == list(range(1, STEPS + 1)) and res.losses == ref_losses
    assert nh.params_equal(server.state_dict(), ref_srv)
    assert checkpoint.load(ddir)[0] == STEPS  # latest device checkpoint: step 60


class _Raw:
    """A bare DEALER speaking raw frames, for hostile messages."""

    def __init__(self, address):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect("tcp://" + address)

    def ask(self, frames, timeout=5.0):
        self.s.send_multipart(frames)
        if not self.s.poll(int(timeout * 1000)):
            return None
        got = self.s.recv_multipart()
        reply = wire.decode(got, wire.Expect(wire.plan_of(got), frozenset(Kind), {}))
        return reply.meta.get("message", reply.kind.name)

    def close(self):
        self.s.close()
        self.ctx.term()


def _fwd(plan=nh.PLAN_ID, h=None, labels=None, dev=99, step=1):
    h = np.zeros((16, 32), np.float32) if h is None else h
    labels = np.zeros(16, np.int64) if labels is None else labels
    return [
        bytes(f) for f in wire.encode(Message(Kind.FORWARD, plan, step, dev, tensors=[h, labels]))
    ]


def test_bad_messages_rejected_while_another_device_trains(start_server, loader):
    server = nh.NumpyServer()
    srv = start_server(server, max_message_bytes=1 << 20)
    dev = nh.NumpyDevice()
    out = {}
    t = threading.Thread(
        target=lambda: out.update(
            res=train(
                dev,
                srv.address,
                loader,
                max_steps=STEPS,
                on_progress=lambda p: time.sleep(0.005),
                timeout_s=30,
            )
        )
    )
    t.start()
    _wait(lambda: srv.agent.sessions.get(0) is not None)
    hello = [
        bytes(f)
        for f in wire.encode(
            Message(Kind.HELLO, nh.PLAN_ID, 0, 99, meta={"codec": "none", "label": [[16], "int64"]})
        )
    ]
    cases = [
        (
            [b"junk"],
            "Wire: malformed header (4 bytes, expected 46); the peer is not a splitc agent",
        ),
        (
            _fwd(plan="ffffffffffffffff"),
            "Wire: plan id 'ffffffffffffffff' does not match '0123456789abcdef'; both agents must "
            "load halves of the same split.tar",
        ),
        (
            _fwd(h=np.zeros((16, 33), np.float32)),
            "Wire: tensor 0 (h) has shape (16, 33), expected (16, 32)",
        ),
        (
            _fwd(labels=np.zeros(16, np.float32)),
            "Wire: tensor 1 (labels) has dtype float32, expected int64",
        ),
        # Two 600 000-byte float32 tensors in one FedAvg push: 1 200 000 > 1 MiB = 1 048 576.
        (
            [
                bytes(f)
                for f in wire.encode(
                    Message(
                        Kind.FEDAVG_PUSH,
                        nh.PLAN_ID,
                        5,
                        99,
                        tensors=[np.zeros(150_000, np.float32)] * 2,
                    )
                )
            ],
            "Wire: message is oversized: 1200000 bytes in tensors 0..1, limit 1048576",
        ),
    ]
    for frames, expected in cases:
        raw = _Raw(srv.address)
        assert raw.ask(hello) == "WELCOME"  # a session for device 99, labels int64[16]
        msg = raw.ask(frames)
        assert msg == expected
        # The peer is dropped: a valid message from it now gets no answer at all.
        assert raw.ask(_fwd(), timeout=0.3) is None
        raw.close()
    # A frame above MAXMSGSIZE (1 MiB) is cut off inside libzmq: no reply, no harm.
    raw = _Raw(srv.address)
    assert raw.ask(_fwd()[:3] + [b"\0" * (2 << 20)] + _fwd()[4:], timeout=0.5) is None
    raw.close()
    t.join(60)
    result = srv.stop()
    ref_dev, ref_srv, ref_losses = _reference(loader)
    assert out["res"].losses == ref_losses
    assert nh.params_equal(server.state_dict(), ref_srv)
    assert len(result.errors) == len(cases)


def test_unknown_curve_key_refused_while_allowed_device_trains(start_server, loader, tmp_path):
    spub, ssec = security.generate_keys(tmp_path, "server")
    apub, asec = security.generate_keys(tmp_path, "alice")
    _, msec = security.generate_keys(tmp_path, "mallory")
    server = nh.NumpyServer()
    srv = start_server(server, allow_keys=security.CurveServer.from_files(ssec, [apub]))
    out = {}
    t = threading.Thread(
        target=lambda: out.update(
            res=train(
                nh.NumpyDevice(),
                srv.address,
                loader,
                max_steps=STEPS,
                curve=security.CurveClient.from_files(asec, spub),
                on_progress=lambda p: time.sleep(0.005),
                timeout_s=30,
            )
        )
    )
    t.start()
    with pytest.raises(
        TransportError,
        match=re.escape(
            f"Transport: the server at {srv.address} refused this device's key; add its public "
            f"key to the server's allow-list"
        ),
    ):
        train(
            nh.NumpyDevice(),
            srv.address,
            loader,
            max_steps=5,
            device_id=7,
            curve=security.CurveClient.from_files(msec, spub),
            timeout_s=10,
        )
    with pytest.raises(
        TransportError,
        match=re.escape(
            f"Transport: security handshake with {srv.address} failed; both ends need matching "
            f"CurveZMQ settings"
        ),
    ):
        # Plain TCP against a CURVE server: the handshake fails.
        train(
            nh.NumpyDevice(),
            srv.address,
            loader,
            max_steps=5,
            device_id=8,
            timeout_s=1.5,
            retry_s=0.5,
        )
    t.join(60)
    srv.stop()
    assert out["res"].steps == list(range(1, STEPS + 1))
    assert 7 not in srv.agent.sessions and 8 not in srv.agent.sessions
    assert nh.params_equal(server.state_dict(), _reference(loader)[1])


def test_replay_with_different_inputs_is_refused(start_server, loader):
    srv = start_server(nh.NumpyServer())
    train(nh.NumpyDevice(), srv.address, loader, max_steps=3, timeout_s=10)
    raw = _Raw(srv.address)
    # Step 3 again (still cached as the latest reply) but with other activations.
    msg = raw.ask(_fwd(dev=0, step=3, h=np.ones((16, 32), np.float32)))
    raw.close()
    srv.stop()
    assert msg == (
        "Server: device 0 replayed step 3 with different inputs than applied; its "
        "checkpoint does not belong to this server's run"
    )
