"""Wire format: round trips and every rejection, with exact messages."""

import re

import numpy as np
import pytest
from splitc import TransportError
from splitc.runtime import wire
from splitc.runtime.codecs import Codec, parse_codec
from splitc.runtime.wire import Expect, Kind, Message, TensorSpec

PLAN = "0123456789abcdef"
SPECS = (TensorSpec("h", (4, 3), "float32"), TensorSpec("labels", (4,), "int64"))


def _msg(**kw):
    base = dict(
        kind=Kind.FORWARD,
        plan_id=PLAN,
        step=7,
        device_id=3,
        ack=5,
        meta={"k": "v"},
        tensors=[np.arange(12, dtype=np.float32).reshape(4, 3), np.arange(4)],
    )
    base.update(kw)
    return Message(**base)


def _expect(codec=Codec(), specs=SPECS, max_bytes=1 << 20):
    return Expect(PLAN, frozenset([Kind.FORWARD]), {Kind.FORWARD: specs}, codec, max_bytes)


def _frames(msg=None, codec=Codec()):
    return [bytes(f) for f in wire.encode(msg or _msg(), codec)]


def test_header_sizes():
    # 4 magic + 1 version + 1 kind + 2 flags + 16 plan + 8 step + 8 ack + 4 device + 2 count = 46
    assert wire.MSG_HEADER.size == 46
    # 2 index + 1 dtype + 1 ndim + 1 codec + 3 pad + 8 bytes + 8 * 8 shape = 80
    assert wire.TENSOR_HEADER.size == 80


def test_round_trip_is_exact_and_zero_copy():
    msg = _msg()
    frames = wire.encode(msg)
    # 2 + 2 tensors * 2 frames; the float payload is the array's own buffer (no copy).
    assert len(frames) == 6
    assert np.shares_memory(np.frombuffer(frames[3], np.float32), msg.tensors[0])
    got = wire.decode(frames, _expect())
    assert (got.kind, got.plan_id, got.step, got.device_id, got.ack, got.meta) == (
        Kind.FORWARD,
        PLAN,
        7,
        3,
        5,
        {"k": "v"},
    )
    for a, b in zip(got.tensors, msg.tensors):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    # Received tensors are views of the received frames.
    assert not got.tensors[0].flags.owndata


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk:0.5", "zstd", "lz4"])
def test_round_trip_with_codecs_keeps_labels_exact(codec):
    c = parse_codec(codec)
    got = wire.decode(_frames(codec=c), _expect(c))
    assert got.tensors[0].dtype == np.float32 and got.tensors[0].shape == (4, 3)
    assert np.array_equal(got.tensors[1], np.arange(4))  # int labels always cross raw


def _reject(frames, match, expect=None):
    with pytest.raises(TransportError, match=match):
        wire.decode(frames, expect or _expect())


def test_rejects_malformed_header():
    f = _frames()
    _reject(
        [f[0][:10]] + f[1:],
        re.escape("Wire: malformed header (10 bytes, expected 46); the peer is not a splitc agent"),
    )
    _reject(
        [b"XXXX" + f[0][4:]] + f[1:],
        re.escape("Wire: bad magic b'XXXX'; the peer is not a splitc agent"),
    )
    bad_version = f[0][:4] + bytes([9]) + f[0][5:]
    _reject([bad_version] + f[1:], "Wire: protocol version 9, expected 1; run the same splitc")
    _reject(
        f[:-1], re.escape("Wire: 5 frames for 2 tensors, expected at least 6; message truncated")
    )
    _reject(f + [b"x"], re.escape("Wire: 7 frames, the headers account for 6; message malformed"))
    _reject(f[:1] + [b"[1, 2]"] + f[2:], re.escape("Wire: meta is not a JSON object"))


def test_large_tensors_cross_in_chunks():
    # 10 MiB float32 = 2 full 4 MiB chunks + one of 2 MiB; labels one frame.
    x = np.arange(10 * 2**20 // 4, dtype=np.float32)
    frames = wire.encode(_msg(tensors=[x, np.arange(4)]))
    assert [memoryview(f).nbytes for f in frames[3:6]] == [4 << 20, 4 << 20, 2 << 20]
    spec = (TensorSpec("x", x.shape, "float32"), SPECS[1])
    got = wire.decode(frames, _expect(specs=spec, max_bytes=1 << 30))
    assert np.array_equal(got.tensors[0], x)
    # The receive buffer is pooled but never reused while a decoded tensor still uses it.
    again = wire.decode(frames, _expect(specs=spec, max_bytes=1 << 30)).tensors[0]
    assert not np.shares_memory(again, got.tensors[0])
    kept = got.tensors[0].copy()
    del got
    third = wire.decode(frames, _expect(specs=spec, max_bytes=1 << 30)).tensors[0]
    assert np.array_equal(third, kept)
    # A chunk that is not full before the last one: rejected before anything is copied.
    bad = frames[:3] + [bytes(frames[3])[:-4], bytes(frames[4]) + b"\0" * 4] + frames[5:]
    with pytest.raises(
        TransportError,
        match=re.escape("Wire: tensor 0 (x) chunks are not 4194304 bytes each but the last"),
    ):
        wire.decode(bad, _expect(specs=spec, max_bytes=1 << 30))


def test_rejects_wrong_plan_and_kind():
    _reject(
        _frames(_msg(plan_id="ffffffffffffffff")),
        re.escape(
            "Wire: plan id 'ffffffffffffffff' does not match '0123456789abcdef'; both agents must "
            "load halves of the same split.tar"
        ),
    )
    _reject(
        _frames(_msg(kind=Kind.GRADIENT)),
        re.escape("Wire: unexpected message kind 4; expected one of FORWARD"),
    )


def test_rejects_wrong_dtype_shape_count_order():
    _reject(
        _frames(_msg(tensors=[np.zeros((4, 3), np.float64), np.arange(4)])),
        re.escape("Wire: tensor 0 (h) has dtype float64, expected float32"),
    )
    _reject(
        _frames(_msg(tensors=[np.zeros((3, 4), np.float32), np.arange(4)])),
        re.escape("Wire: tensor 0 (h) has shape (3, 4), expected (4, 3)"),
    )
    _reject(
        _frames(_msg(tensors=[np.zeros((4, 3), np.float32)])),
        re.escape("Wire: FORWARD carries 1 tensors, expected 2 (h, labels)"),
    )
    f = _frames()
    swapped = f[:2] + [f[4], f[5], f[2], f[3]]
    _reject(swapped, re.escape("Wire: tensor 1 arrived in position 0; order is fixed"))


def test_rejects_byte_count_lies_and_oversize():
    f = _frames()
    # Header says 48 bytes (4*3 float32) but the payload frame carries 52.
    _reject(
        f[:3] + [f[3] + b"\0\0\0\0"] + f[4:],
        re.escape("Wire: tensor 0 (h) payload is 52 bytes, header says 48"),
    )
    hdr = bytearray(f[2])
    hdr[8:16] = (96).to_bytes(8, "little")  # declare 96 bytes for a 48-byte float32[4, 3]
    _reject(
        f[:2] + [bytes(hdr)] + f[3:],
        re.escape("Wire: tensor 0 (h) declares 96 bytes for float32[4, 3], which is 48 bytes"),
    )
    big = (TensorSpec("x", None, None),)
    exp = Expect(PLAN, frozenset([Kind.FORWARD]), {Kind.FORWARD: big}, Codec(), max_bytes=1000)
    _reject(
        _frames(_msg(tensors=[np.zeros(1000, np.float32)])),
        re.escape("Wire: tensor 0 (x) is oversized: 4000 bytes, limit 1000"),
        exp,
    )


def test_rejects_codec_mismatch():
    _reject(
        _frames(codec=parse_codec("fp16")),
        re.escape(
            "Wire: tensor 0 uses codec fp16, the session uses none; start both agents with the "
            "same --codec"
        ),
    )


def test_encode_refuses_what_cannot_cross():
    with pytest.raises(
        TransportError,
        match=re.escape("Wire: dtype complex64 cannot cross the link; cast it first"),
    ):
        wire.encode(_msg(tensors=[np.zeros(2, np.complex64)]))
    with pytest.raises(TransportError, match="longer than 16 bytes"):
        wire.encode(_msg(plan_id="x" * 17))


def test_peek_and_plan_of_tolerate_garbage():
    assert wire.peek([b"junk"]) == (0, 0)
    assert wire.plan_of([]) == ""
    assert wire.peek(_frames()) == (int(Kind.FORWARD), 3)
    assert wire.plan_of(_frames()) == PLAN
