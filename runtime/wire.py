"""The message format on the link: struct-packed fixed headers and raw tensor bytes, never pickle.

One message is a ZeroMQ multipart message::

    frame 0      message header  (46 bytes, MSG_HEADER)
    frame 1      meta            (UTF-8 JSON object, <= 64 KiB, b"" for {}; control data only)
    then per tensor i:
      tensor header i (80 bytes, TENSOR_HEADER)
      payload i in ceil(bytes / CHUNK) frames (at least one), all CHUNK bytes but the last
      (raw little-endian bytes, as encoded by the codec)

Why 4 MiB chunks: one 64 MiB ZeroMQ frame crossed loopback at 0.3 GB/s here, the same bytes in
4 MiB frames at 1.3-2.3 GB/s (median/best, /tmp bench in the runtime report); a chunked tensor
costs one memcpy on receipt, a single-frame one none.

    MSG_HEADER    "<4sBBH16sQqIH": magic b"SPLC", version, kind, flags, plan id (16 ASCII
                  bytes, plan.json's "plan_id"), step, ack (the sender's last durable
                  checkpoint step, -1 for none), device id, tensor count
    TENSOR_HEADER "<HBBB3xQ8Q": index, dtype code, ndim, codec id, payload bytes, shape (ndim
                  used entries of 8)

Payloads go to zmq as the array's own buffer (``send_multipart(copy=False)``: zero copy above
pyzmq's 64 KiB copy threshold) and come back as ``np.frombuffer`` views of the received frame.

``decode`` checks every message against an ``Expect`` (the transport spec of plan.json) before
touching a payload: magic, version, frame count, kind, plan id, then per tensor its order,
dtype, shape, codec and byte count. Anything else raises ``TransportError``.
"""

from __future__ import annotations

import enum
import json
import math
import struct
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
from splitc import TransportError
from splitc.runtime.codecs import Codec, codec_by_id

__all__ = [
    "MAGIC",
    "MSG_HEADER",
    "TENSOR_HEADER",
    "VERSION",
    "Expect",
    "Kind",
    "Message",
    "TensorSpec",
    "decode",
    "encode",
    "peek",
    "plan_of",
]

MAGIC = b"SPLC"
VERSION = 1
MSG_HEADER = struct.Struct("<4sBBH16sQqIH")
TENSOR_HEADER = struct.Struct("<HBBB3xQ8Q")
MAX_NDIM = 8
MAX_META = 64 * 1024
CHUNK = 4 << 20

# Wire dtype codes; never renumber (a version bump is needed to change them).
DTYPES = {
    "float32": 1,
    "float16": 2,
    "float64": 3,
    "int64": 4,
    "int32": 5,
    "uint8": 6,
    "int8": 7,
    "bool": 8,
    "uint32": 9,
    "int16": 10,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: np.dtype(k).itemsize for k in DTYPES}


class Kind(enum.IntEnum):
    HELLO = 1  # device -> server: plan, codec, label spec; server answers WELCOME
    WELCOME = 2  # server -> device: last step applied for this device, durable ack
    FORWARD = 3  # device -> server: cut tensors + labels of one training step
    GRADIENT = 4  # server -> device: loss (float64 scalar) + gradients of grad=True cut tensors
    INFER = 5  # device -> server: cut tensors for inference
    INFER_RESULT = 6  # server -> device: the server half's outputs
    FEDAVG_PUSH = 7  # device -> server: device-half parameters for averaging
    FEDAVG_PULL = 8  # server -> device: the average
    REWIND = 9  # server -> device: "I hold state after step N": resume from a checkpoint <= N
    ERROR = 10  # either way: meta["message"]; the session is dropped
    BYE = 11  # device -> server: done (server drops the session); server acks with BYE


_KIND_VALUES = frozenset(int(k) for k in Kind)
_NONE = Codec()


@dataclass
class Message:
    kind: Kind
    plan_id: str
    step: int = 0
    device_id: int = 0
    ack: int = -1
    meta: dict = field(default_factory=dict)
    tensors: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor must look like. ``shape=None``: any shape within ``max_bytes``."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str | None
    max_bytes: int = 0

    @classmethod
    def of(cls, spec) -> TensorSpec:
        return cls(spec.name, tuple(spec.shape), str(np.dtype(spec.dtype)))


@dataclass(frozen=True)
class Expect:
    """The receiver's side of the transport spec for one message."""

    plan_id: str
    kinds: frozenset[Kind]
    tensors: dict[Kind, tuple[TensorSpec, ...] | None]  # None: any tensors, each <= max_bytes
    codec: Codec = Codec()
    max_bytes: int = 1 << 30


def _plan_bytes(plan_id: str) -> bytes:
    b = plan_id.encode("ascii")
    if len(b) > 16:
        raise TransportError(f"Wire: plan id {plan_id!r} longer than 16 bytes; use plan.json's id")
    return b.ljust(16, b"\0")


def encode(msg: Message, codec: Codec = Codec()) -> list:
    """Message -> list of frames (bytes or memoryviews of the tensors' own buffers)."""
    meta = json.dumps(msg.meta, separators=(",", ":")).encode() if msg.meta else b""
    if len(meta) > MAX_META:
        raise TransportError(f"Wire: meta of {len(meta)} bytes exceeds {MAX_META}")
    frames = [
        MSG_HEADER.pack(
            MAGIC,
            VERSION,
            int(msg.kind),
            0,
            _plan_bytes(msg.plan_id),
            msg.step,
            msg.ack,
            msg.device_id,
            len(msg.tensors),
        ),
        meta,
    ]
    for i, arr in enumerate(msg.tensors):
        arr = np.asarray(arr)
        name = arr.dtype.name
        if name not in DTYPES:
            raise TransportError(f"Wire: dtype {name} cannot cross the link; cast it first")
        if arr.ndim > MAX_NDIM:
            raise TransportError(f"Wire: tensor {i} has {arr.ndim} dims, at most {MAX_NDIM}")
        if codec.name != "none" and arr.dtype.kind == "f":
            c, mv = codec, memoryview(codec.encode(arr, msg.step, i)).cast("B")
        else:  # the hot path: the array's own buffer, no copy
            c = _NONE
            mv = memoryview(np.ascontiguousarray(arr)).cast("B") if arr.size else memoryview(b"")
        shape = list(arr.shape) + [0] * (MAX_NDIM - arr.ndim)
        frames.append(TENSOR_HEADER.pack(i, DTYPES[name], arr.ndim, c.id, mv.nbytes, *shape))
        if mv.nbytes <= CHUNK:
            frames.append(mv)
        else:
            frames.extend(mv[o : o + CHUNK] for o in range(0, mv.nbytes, CHUNK))
    return frames


def _chunks(nbytes: int) -> int:
    return max(1, -(-nbytes // CHUNK))


def _buf(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


_POOL = threading.local()


def _buffer(nbytes: int) -> np.ndarray:
    """A reusable receive buffer: fresh 64 MiB allocations are mmapped and page-fault on every
    message (a join into a new buffer ran at 0.2-1.2 GB/s here, into a reused one ~5x faster).
    A pooled buffer is reused only when nothing references it any more (refcount check), so a
    half that keeps a received tensor keeps its own copy safe."""
    pool = getattr(_POOL, "bufs", None)
    if pool is None:
        pool = _POOL.bufs = {}
    bufs = pool.setdefault(nbytes, [])
    for b in bufs:
        if sys.getrefcount(b) == 3:  # the pool list, ``b`` and getrefcount's argument
            return b
    b = np.empty(nbytes, np.uint8)
    if len(bufs) < 4:
        bufs.append(b)
    return b


def _join(parts) -> memoryview:
    """One buffer for a payload: the frame itself (zero copy) or its chunks copied together."""
    if len(parts) == 1:
        return _buf(parts[0])
    out = _buffer(sum(len(_buf(f)) for f in parts))
    o = 0
    for f in parts:
        b = np.frombuffer(_buf(f), np.uint8)
        out[o : o + b.size] = b
        o += b.size
    return memoryview(out)


def peek(frames) -> tuple[int, int]:
    """(kind, device id) of a message with a well-formed header, else (0, 0): for error replies."""
    try:
        _, _, kind, _, _, _, _, dev, _ = MSG_HEADER.unpack(_buf(frames[0]))
        return kind, dev
    except (struct.error, IndexError):
        return 0, 0


def plan_of(frames) -> str:
    """Plan id of a message with a well-formed header (to read a peer's ERROR), else ""."""
    try:
        return MSG_HEADER.unpack(_buf(frames[0]))[4].rstrip(b"\0").decode("ascii", "replace")
    except (struct.error, IndexError):
        return ""


def decode(frames, expect: Expect) -> Message:
    """Validate ``frames`` against ``expect``, then build the ``Message`` (payloads zero copy).

    Kept lean (one memoryview per frame, no numpy calls before the payload): it runs on every
    message, ~20 us for a one-tensor FORWARD."""
    frames = [_buf(f) for f in frames]
    if not frames or len(frames[0]) != MSG_HEADER.size:
        raise TransportError(
            f"Wire: malformed header ({len(frames[0]) if frames else 0} bytes, expected "
            f"{MSG_HEADER.size}); the peer is not a splitc agent"
        )
    magic, version, kind, _, plan, step, ack, dev, n = MSG_HEADER.unpack(frames[0])
    if magic != MAGIC:
        raise TransportError(f"Wire: bad magic {magic!r}; the peer is not a splitc agent")
    if version != VERSION:
        raise TransportError(
            f"Wire: protocol version {version}, expected {VERSION}; run the same splitc on both "
            f"ends"
        )
    if len(frames) < 2 + 2 * n:
        raise TransportError(
            f"Wire: {len(frames)} frames for {n} tensors, expected at least {2 + 2 * n}; message "
            f"truncated"
        )
    if kind not in _KIND_VALUES or Kind(kind) not in expect.kinds:
        names = ", ".join(sorted(k.name for k in expect.kinds))
        raise TransportError(f"Wire: unexpected message kind {kind}; expected one of {names}")
    kind = Kind(kind)
    plan_id = plan.rstrip(b"\0").decode("ascii", "replace")
    if plan_id != expect.plan_id:
        raise TransportError(
            f"Wire: plan id {plan_id!r} does not match {expect.plan_id!r}; both agents must load "
            f"halves of the same split.tar"
        )
    meta_buf = frames[1]
    if len(meta_buf) > MAX_META:
        raise TransportError(f"Wire: meta of {len(meta_buf)} bytes exceeds {MAX_META}")
    try:
        meta = json.loads(bytes(meta_buf)) if len(meta_buf) else {}
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise TransportError(f"Wire: meta is not a JSON object ({e})") from None
    specs = expect.tensors.get(kind)
    if specs is not None and n != len(specs):
        raise TransportError(
            f"Wire: {kind.name} carries {n} tensors, expected {len(specs)} "
            f"({', '.join(s.name for s in specs)})"
        )
    heads = []
    total, pos = 0, 2
    for i in range(n):
        if pos >= len(frames):
            raise TransportError(f"Wire: message truncated before tensor {i}")
        hb = frames[pos]
        if len(hb) != TENSOR_HEADER.size:
            raise TransportError(f"Wire: malformed tensor header {i} ({len(hb)} bytes)")
        idx, dcode, ndim, cid, nbytes, *dims = TENSOR_HEADER.unpack(hb)
        if idx != i:
            raise TransportError(f"Wire: tensor {idx} arrived in position {i}; order is fixed")
        if dcode not in _DTYPE_NAMES or ndim > MAX_NDIM:
            raise TransportError(f"Wire: tensor {i} has unknown dtype code {dcode} or ndim {ndim}")
        dtype, shape = _DTYPE_NAMES[dcode], tuple(dims[:ndim])
        codec = codec_by_id(cid, expect.codec)
        if codec.name != "none" and codec != expect.codec:
            raise TransportError(
                f"Wire: tensor {i} uses codec {codec.name}, the session uses "
                f"{expect.codec.spec}; start both agents with the same --codec"
            )
        spec = specs[i] if specs is not None else TensorSpec(f"#{i}", None, None, expect.max_bytes)
        if spec.dtype is not None and dtype != spec.dtype:
            raise TransportError(
                f"Wire: tensor {i} ({spec.name}) has dtype {dtype}, expected {spec.dtype}"
            )
        if spec.shape is not None and shape != spec.shape:
            raise TransportError(
                f"Wire: tensor {i} ({spec.name}) has shape {shape}, expected {spec.shape}"
            )
        raw = math.prod(shape) * _ITEMSIZE[dtype]
        if codec.name == "none" and nbytes != raw:
            raise TransportError(
                f"Wire: tensor {i} ({spec.name}) declares {nbytes} bytes for {dtype}"
                f"{list(shape)}, which is {raw} bytes"
            )
        if codec.name != "none" and not dtype.startswith("float"):
            raise TransportError(
                f"Wire: tensor {i} ({spec.name}) is {dtype}, codecs are for floats"
            )
        bound = raw if codec.name == "none" else codec.max_encoded_bytes(shape, dtype)
        limit = spec.max_bytes or expect.max_bytes
        if nbytes > bound or nbytes > limit:
            raise TransportError(
                f"Wire: tensor {i} ({spec.name}) is oversized: {nbytes} bytes, limit "
                f"{min(bound, limit)}"
            )
        if total + nbytes > expect.max_bytes:
            raise TransportError(
                f"Wire: message is oversized: {total + nbytes} bytes in tensors 0..{i}, limit "
                f"{expect.max_bytes}"
            )
        parts = frames[pos + 1 : pos + 1 + _chunks(nbytes)]
        got = sum(len(f) for f in parts)
        if got != nbytes:
            raise TransportError(
                f"Wire: tensor {i} ({spec.name}) payload is {got} bytes, header says {nbytes}"
            )
        if any(len(f) != CHUNK for f in parts[:-1]):
            raise TransportError(
                f"Wire: tensor {i} ({spec.name}) chunks are not {CHUNK} bytes each but the last"
            )
        pos += 1 + len(parts)
        total += nbytes
        heads.append((shape, dtype, codec, parts))
    if pos != len(frames):
        raise TransportError(
            f"Wire: {len(frames)} frames, the headers account for {pos}; message malformed"
        )
    tensors = [c.decode(_join(parts), shape, dtype) for shape, dtype, c, parts in heads]
    return Message(kind, plan_id, step, dev, ack, meta, tensors)
