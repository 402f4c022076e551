"""Every other refusal of the agents, transport and security, with its exact message."""

import re
import socket

import numpy as np
import numpy_halves as nh
import pytest
from splitc import InputError, TransportError
from splitc.runtime import security
from splitc.runtime.device_agent import train
from splitc.runtime.server_agent import ServerAgent
from splitc.runtime.transport import DeviceTransport, ServerTransport, TokenBucket, endpoint

pytestmark = pytest.mark.network


def test_addresses_and_rates():
    assert endpoint("127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert endpoint("ipc:///tmp/x") == "ipc:///tmp/x"
    with pytest.raises(
        InputError,
        match=re.escape("Transport: bad address 'localhost'; use HOST:PORT such as 127.0.0.1:5555"),
    ):
        endpoint("localhost")
    with pytest.raises(InputError, match="Transport: link rate must be positive, got 0"):
        TokenBucket(0)


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(
            TransportError,
            match=re.escape(
                f"Transport: cannot listen on 127.0.0.1:{port} (Address already in use"
            ),
        ):
            ServerTransport(f"127.0.0.1:{port}")


def test_no_server_times_out(loader, port):
    with pytest.raises(
        TransportError,
        match=re.escape(
            f"Device: no reply to HELLO step 0 from 127.0.0.1:{port} within 0.5 s; is the server "
            f"running?"
        ),
    ):
        train(
            nh.NumpyDevice(), f"127.0.0.1:{port}", loader, max_steps=1, timeout_s=0.5, retry_s=0.2
        )


def test_unknown_peer_is_a_failed_send_not_a_silent_drop():
    srv = ServerTransport("127.0.0.1:0")
    try:
        # ROUTER_MANDATORY: routing to a peer that never connected fails loudly.
        assert srv.send(b"nobody", [b"x"]) is False
    finally:
        srv.close()


def test_device_half_that_breaks_the_spec(start_server, loader):
    srv = start_server(nh.NumpyServer())
    dev = nh.NumpyDevice()
    dev.forward = lambda inputs: [np.zeros((16, 31), np.float32)]
    with pytest.raises(
        TransportError,
        match=re.escape(
            "Device: forward returned [((16, 31), 'float32')], the transport spec is "
            "[((16, 32), 'float32')]; the device half does not match plan.json"
        ),
    ):
        train(dev, srv.address, loader, max_steps=2, timeout_s=10)


def test_codec_mismatch_with_a_pinned_server_codec(start_server, loader):
    srv = start_server(nh.NumpyServer(), codec="fp16")
    with pytest.raises(
        TransportError,
        match=re.escape(
            "Device: the server refused HELLO step 0: Server: device 0 uses codec int8, this "
            "server fp16; start both with the same --codec"
        ),
    ):
        train(nh.NumpyDevice(), srv.address, loader, max_steps=2, codec="int8", timeout_s=10)


def test_wrong_plan_device_is_refused(start_server, loader):
    srv = start_server(nh.NumpyServer())
    with pytest.raises(
        TransportError,
        match=re.escape(
            "Device: the server refused HELLO step 0: Wire: plan id 'ffffffffffffffff' does not "
            "match '0123456789abcdef'"
        ),
    ):
        train(
            nh.NumpyDevice(plan_id="ffffffffffffffff"),
            srv.address,
            loader,
            max_steps=2,
            timeout_s=10,
        )


def test_restarted_device_without_resume_is_refused(start_server, loader):
    srv = start_server(nh.NumpyServer(), max_cached_steps=2)
    train(nh.NumpyDevice(), srv.address, loader, max_steps=5, timeout_s=10)
    # Same device id from scratch: step 1 was applied long ago and only 4..5 are cached.
    with pytest.raises(
        TransportError,
        match=re.escape(
            "Device: the server refused FORWARD step 1: Server: device 0 step 1 was applied and "
            "its reply is no longer cached (device checkpoint -1); resume the device from a newer "
            "checkpoint"
        ),
    ):
        train(nh.NumpyDevice(), srv.address, loader, max_steps=5, timeout_s=10)


def test_checkpoints_of_another_plan(tmp_path, loader, start_server):
    srv = start_server(nh.NumpyServer())
    train(
        nh.NumpyDevice(),
        srv.address,
        loader,
        max_steps=2,
        checkpoint_dir=tmp_path / "d",
        checkpoint_every=1,
        timeout_s=10,
    )
    with pytest.raises(
        InputError,
        match=re.escape(
            f"Device: checkpoint in {tmp_path / 'd'} is for plan '0123456789abcdef', this half "
            f"is 'ffffffffffffffff'; use another --checkpoint-dir or drop --resume"
        ),
    ):
        train(
            nh.NumpyDevice(plan_id="ffffffffffffffff"),
            srv.address,
            loader,
            max_steps=2,
            checkpoint_dir=tmp_path / "d",
            resume=True,
            timeout_s=10,
        )
    srv.stop()
    # The server writes a final checkpoint on a clean stop; another plan cannot resume from it.
    a = ServerAgent(nh.NumpyServer(), checkpoint_dir=tmp_path / "s", checkpoint_every=1)
    a.stop_event.set()
    a._since_ckpt = 1
    a.run()
    with pytest.raises(
        InputError,
        match=re.escape(
            f"Server: checkpoint in {tmp_path / 's'} is for plan '0123456789abcdef', this half "
            f"is 'ffffffffffffffff'; use another --checkpoint-dir or drop --resume"
        ),
    ):
        ServerAgent(
            nh.NumpyServer(plan_id="ffffffffffffffff"), checkpoint_dir=tmp_path / "s", resume=True
        )


def test_key_files(tmp_path):
    pub, sec = security.generate_keys(tmp_path, "dev")
    with pytest.raises(
        InputError, match=re.escape(f"Security: {pub} holds no secret key; pass NAME.key_secret")
    ):
        security.CurveClient.from_files(pub, pub)
    with pytest.raises(
        InputError, match=re.escape(f"Security: cannot read key file {tmp_path / 'missing.key'}")
    ):
        security.CurveServer.from_files(sec, [tmp_path / "missing.key"])
    c = security.CurveClient.from_files(sec, pub)
    assert len(c.public) == 40 and len(c.secret) == 40  # z85 of 32-byte keys


def test_device_transport_counts_bytes(start_server):
    srv = start_server(nh.NumpyServer())
    t = DeviceTransport(srv.address)
    try:
        assert t.send([b"x" * 10, b"yy"]) is True
        assert t.bytes_up == 12
    finally:
        t.close()


def test_hello_with_an_unknown_codec_is_refused_and_the_server_keeps_serving(start_server, loader):
    srv = start_server(nh.NumpyServer())
    t = DeviceTransport(srv.address)
    try:
        from splitc.runtime import wire
        from splitc.runtime.wire import Kind, Message

        t.send(wire.encode(Message(Kind.HELLO, nh.PLAN_ID, 0, 5, meta={"codec": "gzip"})))
        got = t.recv(10)
        err = wire.decode(got, wire.Expect(nh.PLAN_ID, frozenset([Kind.ERROR]), {Kind.ERROR: ()}))
        assert err.meta["message"] == (
            "Codec: unknown codec 'gzip'; use one of none, fp16, int8, topk:FRAC, zstd, lz4"
        )
    finally:
        t.close()
    res = train(nh.NumpyDevice(), srv.address, loader, max_steps=3, timeout_s=10)
    assert res.steps == [1, 2, 3]
