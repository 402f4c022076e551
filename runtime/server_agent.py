"""The server agent: one ServerHalf shared by one or many devices (split federated learning).

Per FORWARD message (step ``s`` of device ``d``): validate against the transport spec, run
``server_half.step``, reply GRADIENT (loss + gradients of the grad=True cut tensors).

Exactly-once steps, across device and server restarts
-----------------------------------------------------
Every device message carries its step ``s`` and ``ack`` (the device's last durable checkpoint).
The server keeps, per device, the last applied step and the replies of the steps after ``ack``:

- ``s == applied + 1``: apply, cache the reply (with a hash of the inputs), reply.
- ``s <= applied``: a replay (the device restarted from checkpoint ``ack``, or resent after a
  timeout): the cached reply is sent again and nothing is applied twice. Replayed inputs must
  hash to the same digest (deterministic halves and data), else ERROR.
- ``s > applied + 1``: the server is behind (it restarted from its checkpoint): REWIND; the
  device says HELLO again and reloads its newest checkpoint at or before ``applied``.

The server's checkpoint holds its half, each device's ``applied``/``ack`` and the cached replies
after ``ack``; each reply tells the device the ``ack`` recorded in the server's newest durable
checkpoint (``durable``), and the device keeps its checkpoints from there on. So a device restart
replays from cache, a server restart rewinds the device to a checkpoint whose later steps the
server holds, and both end in the same parameters as an uninterrupted run (single device; with
several devices the order of steps across devices is whatever arrived first).

A message that breaks the spec gets an ERROR reply and its peer is dropped (later messages from
that socket are ignored); the server keeps serving the others. FedAvg rounds of the device halves
(FEDAVG_PUSH/FEDAVG_PULL) are in ``fedavg.py``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from splitc import InputError, SplitcError, TransportError
from splitc.runtime import checkpoint, wire
from splitc.runtime.codecs import Codec, parse_codec
from splitc.runtime.fedavg import FedAvgRounds
from splitc.runtime.halves import ServerHalf
from splitc.runtime.security import CurveServer
from splitc.runtime.transport import ServerTransport
from splitc.runtime.wire import Expect, Kind, Message, TensorSpec

__all__ = ["Event", "ServeResult", "ServerAgent", "serve"]

MAX_LABEL_BYTES = 16 << 20


@dataclass(frozen=True)
class Event:
    """What the server reports to ``on_event`` (the CLI renders these)."""

    kind: str  # hello, step, replay, rewind, error, checkpoint, fedavg, bye
    device_id: int = 0
    step: int = 0
    loss: float | None = None
    seconds: float = 0.0
    message: str = ""


@dataclass
class ServeResult:
    steps_applied: int = 0
    replays: int = 0
    errors: list[str] = field(default_factory=list)
    checkpoints: int = 0
    fedavg_rounds: int = 0
    devices: dict[int, int] = field(default_factory=dict)  # device id -> last applied step


@dataclass
class _Session:
    device_id: int
    applied: int
    codec: Codec
    label: TensorSpec
    ack: int = -1
    durable: int = -1
    peer: bytes | None = None
    done: bool = False
    cache: dict[int, tuple[str, list[np.ndarray]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "applied": self.applied,
            "ack": self.ack,
            "codec": self.codec.spec,
            "label": [list(self.label.shape), self.label.dtype],
            "cache": {str(s): d for s, (d, _) in self.cache.items()},
        }


def _digest(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(memoryview(np.ascontiguousarray(t)).cast("B"))
    return h.hexdigest()


class ServerAgent:
    """Bind on construction (``.address`` is the real HOST:PORT), then ``run()``."""

    def __init__(
        self,
        server_half: ServerHalf,
        listen: str = "127.0.0.1:0",
        *,
        checkpoint_dir=None,
        checkpoint_every: int = 0,
        resume: bool = False,
        allow_keys: CurveServer | None = None,
        max_steps: int | None = None,
        stop_event: threading.Event | None = None,
        codec: str | None = None,
        fedavg_every: int = 0,
        fedavg_devices: int | None = None,
        fedavg_timeout_s: float = 60.0,
        on_event=None,
        label_spec: TensorSpec | None = None,
        max_message_bytes: int = 256 << 20,
        max_cached_steps: int = 1024,
        poll_s: float = 0.05,
    ):
        self.half = server_half
        self.plan_id = server_half.plan_id
        self.cut = tuple(TensorSpec.of(c) for c in server_half.cut)
        self.grads = tuple(TensorSpec.of(c) for c in server_half.cut if c.grad)
        hl = label_spec or getattr(server_half, "labels", None)
        self.label_spec = (
            TensorSpec.of(hl) if hl is not None and not isinstance(hl, TensorSpec) else hl
        )
        self.codec = parse_codec(codec) if codec else None
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.max_steps, self.stop_event = max_steps, stop_event or threading.Event()
        self.fedavg_every, self.fedavg_devices = fedavg_every, fedavg_devices
        self.on_event = on_event or (lambda e: None)
        self.max_bytes, self.max_cached, self.poll_s = max_message_bytes, max_cached_steps, poll_s
        self.sessions: dict[int, _Session] = {}
        self.banned: set[bytes] = set()
        self.result = ServeResult()
        self.fedavg = FedAvgRounds(
            self.plan_id,
            self.sessions,
            self._send,
            self._fedavg_round,
            fedavg_devices,
            fedavg_timeout_s,
        )
        self._since_ckpt = 0
        if resume and checkpoint_dir:
            self._restore()
        # No legal frame exceeds a payload chunk (4 MiB) or the meta limit (64 KiB).
        frame_limit = max(wire.MAX_META, min(wire.CHUNK, max_message_bytes))
        self.transport = ServerTransport(listen, curve=allow_keys, max_frame_bytes=frame_limit)
        self.address = self.transport.address

    # ----- persistence -----
    def _restore(self) -> None:
        got = checkpoint.load(self.checkpoint_dir)
        if got is None:
            return
        step, arrays, meta = got
        if meta.get("plan_id") != self.plan_id:
            raise InputError(
                f"Server: checkpoint in {self.checkpoint_dir} is for plan {meta.get('plan_id')!r}, "
                f"this half is {self.plan_id!r}; use another --checkpoint-dir or drop --resume"
            )
        self.half.load_state_dict({k[5:]: v for k, v in arrays.items() if k.startswith("half/")})
        self.result.steps_applied = step
        for dev, s in meta["sessions"].items():
            shape, dtype = s["label"]
            sess = _Session(
                int(dev),
                s["applied"],
                parse_codec(s["codec"]),
                TensorSpec("labels", tuple(shape), dtype),
                s["ack"],
                s["ack"],
            )
            for st, dg in s["cache"].items():
                n = int(meta["cache_len"][dev][st])
                sess.cache[int(st)] = (dg, [arrays[f"cache/{dev}/{st}/{i}"] for i in range(n)])
            self.sessions[int(dev)] = sess

    def _checkpoint(self) -> None:
        arrays = {f"half/{k}": v for k, v in self.half.state_dict().items()}
        cache_len: dict[str, dict[str, int]] = {}
        for dev, sess in self.sessions.items():
            cache_len[str(dev)] = {}
            for st, (_, tensors) in sess.cache.items():
                cache_len[str(dev)][str(st)] = len(tensors)
                for i, t in enumerate(tensors):
                    arrays[f"cache/{dev}/{st}/{i}"] = t
        meta = {
            "plan_id": self.plan_id,
            "cache_len": cache_len,
            "sessions": {str(d): s.to_json() for d, s in self.sessions.items()},
        }
        checkpoint.save(self.checkpoint_dir, self.result.steps_applied, arrays, meta)
        checkpoint.prune(self.checkpoint_dir, self.result.steps_applied, keep_last=2)
        for sess in self.sessions.values():
            sess.durable = sess.ack
        self.result.checkpoints += 1
        self._since_ckpt = 0
        self.on_event(Event("checkpoint", step=self.result.steps_applied))

    # ----- replies -----
    def _send(self, peer: bytes, msg: Message, codec: Codec = Codec()) -> None:
        if not self.transport.send(peer, wire.encode(msg, codec)):
            for s in self.sessions.values():
                if s.peer == peer:
                    s.peer = None

    def _error(self, peer: bytes, frames, err: str) -> None:
        kind, dev = wire.peek(frames)
        self.banned.add(peer)
        self.result.errors.append(err)
        self.on_event(Event("error", dev, message=err))
        self._send(peer, Message(Kind.ERROR, self.plan_id, 0, dev, meta={"message": err}))

    def _expect(self, sess: _Session | None) -> Expect:
        tensors = {
            Kind.HELLO: (),
            Kind.BYE: (),
            Kind.FEDAVG_PUSH: None,
            Kind.INFER: self.cut,
            Kind.FORWARD: self.cut
            + (sess.label if sess else TensorSpec("labels", None, None, MAX_LABEL_BYTES),),
        }
        return Expect(
            self.plan_id,
            frozenset(tensors),
            tensors,
            sess.codec if sess else (self.codec or Codec()),
            self.max_bytes,
        )

    # ----- the loop -----
    def run(self) -> ServeResult:
        try:
            while not self.stop_event.is_set():
                if self.max_steps is not None and self.result.steps_applied >= self.max_steps:
                    break
                got = self.transport.recv(self.poll_s)
                self.fedavg.timeouts()
                if got is None:
                    continue
                peer, frames = got
                if peer in self.banned:
                    continue
                try:
                    self._handle(peer, frames)
                except SplitcError as e:  # a bad peer (or its bad request): refuse, keep serving
                    self._error(peer, frames, str(e))
            if self.checkpoint_dir and self._since_ckpt:
                self._checkpoint()
        finally:
            self.transport.close()
        self.result.devices = {d: s.applied for d, s in self.sessions.items()}
        return self.result

    def _handle(self, peer: bytes, frames) -> None:
        _, dev = wire.peek(frames)
        sess = self.sessions.get(dev)
        msg = wire.decode(frames, self._expect(sess))
        if msg.kind == Kind.HELLO:
            return self._hello(peer, msg)
        if msg.kind == Kind.INFER:
            out = [np.asarray(o) for o in self.half.infer(msg.tensors)]
            reply = Message(Kind.INFER_RESULT, self.plan_id, msg.step, dev, tensors=out)
            return self._send(peer, reply)
        if sess is None:  # a restarted server that never saw this device: HELLO first
            return self._send(peer, Message(Kind.REWIND, self.plan_id, msg.step, dev))
        sess.peer = peer
        if msg.kind == Kind.BYE:
            sess.done = True
            self.on_event(Event("bye", dev, sess.applied))
            return self._send(peer, Message(Kind.BYE, self.plan_id, msg.step, dev))
        if msg.kind == Kind.FEDAVG_PUSH:
            return self.fedavg.push(sess, msg)
        self._forward(sess, msg)

    def _hello(self, peer: bytes, msg: Message) -> None:
        dev, meta = msg.device_id, msg.meta
        codec = parse_codec(meta.get("codec", "none"))
        if self.codec is not None and codec.spec != self.codec.spec:
            raise TransportError(
                f"Server: device {dev} uses codec {codec.spec}, this server {self.codec.spec}; "
                f"start both with the same --codec"
            )
        label = self._label_spec(meta.get("label"))
        sess = self.sessions.get(dev)
        if sess is None:
            # First contact: the device's state is the start (step 0, or its own checkpoint).
            sess = self.sessions[dev] = _Session(dev, msg.step, codec, label)
        sess.codec, sess.label, sess.peer, sess.done = codec, label, peer, False
        self.on_event(Event("hello", dev, msg.step, message=codec.spec))
        self._send(
            peer, Message(Kind.WELCOME, self.plan_id, msg.step, dev, meta=self._status(sess))
        )

    def _label_spec(self, label) -> TensorSpec:
        if self.label_spec is not None:
            return self.label_spec
        try:
            shape, dtype = tuple(int(d) for d in label[0]), str(np.dtype(label[1]))
        except (TypeError, ValueError, IndexError):
            raise TransportError(
                f"Server: HELLO lacks a label spec [shape, dtype], got {label!r}"
            ) from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if np.dtype(dtype).kind not in "iuf" or nbytes > MAX_LABEL_BYTES:
            raise TransportError(
                f"Server: labels {dtype}{list(shape)} are not int/float or too big"
            )
        return TensorSpec("labels", shape, dtype)

    def _status(self, sess: _Session) -> dict:
        return {
            "applied": sess.applied,
            "durable": sess.durable,
            "persistent": bool(self.checkpoint_dir),
        }

    def _forward(self, sess: _Session, msg: Message) -> None:
        s, dev = msg.step, sess.device_id
        sess.ack = max(sess.ack, msg.ack)
        if s <= sess.applied:
            if s not in sess.cache:
                raise TransportError(
                    f"Server: device {dev} step {s} was applied and its reply is no longer cached "
                    f"(device checkpoint {msg.ack}); resume the device from a newer checkpoint"
                )
            digest, reply = sess.cache[s]
            if digest != _digest(msg.tensors):
                raise TransportError(
                    f"Server: device {dev} replayed step {s} with different inputs than applied; "
                    f"its checkpoint does not belong to this server's run"
                )
            self.result.replays += 1
            self.on_event(Event("replay", dev, s))
            return self._reply(sess, s, reply, 0.0)
        if s > sess.applied + 1:
            self.on_event(Event("rewind", dev, s, message=f"server holds step {sess.applied}"))
            return self._send(
                sess.peer, Message(Kind.REWIND, self.plan_id, s, dev, meta=self._status(sess))
            )
        t0 = time.perf_counter()
        try:
            loss, grads = self.half.step(list(msg.tensors[:-1]), msg.tensors[-1])
        except SplitcError as e:
            raise TransportError(f"Server: step {s} of device {dev} failed: {e}") from None
        dt = time.perf_counter() - t0
        # Copies: the reply is cached and sent zero-copy, and a compiled half may reuse buffers.
        reply = [np.asarray(loss, np.float64).reshape(())] + [np.array(g) for g in grads]
        sess.cache[s] = (_digest(msg.tensors), reply)
        sess.applied = s
        for old in [k for k in sess.cache if k <= sess.ack or k <= s - self.max_cached]:
            if old != s:
                del sess.cache[old]
        self.result.steps_applied += 1
        self._since_ckpt += 1
        if (
            self.checkpoint_dir
            and self.checkpoint_every
            and (self._since_ckpt >= self.checkpoint_every)
        ):
            self._checkpoint()
        self.on_event(Event("step", dev, s, float(loss), dt))
        self._reply(sess, s, reply, dt)

    def _reply(self, sess: _Session, s: int, reply, dt: float) -> None:
        meta = {"server_s": dt, **self._status(sess)}
        self._send(
            sess.peer,
            Message(Kind.GRADIENT, self.plan_id, s, sess.device_id, meta=meta, tensors=reply),
            sess.codec,
        )

    def _fedavg_round(self, r: int, n_devices: int) -> None:
        self.result.fedavg_rounds += 1
        self.on_event(Event("fedavg", step=r, message=f"{n_devices} devices"))


def serve(server_half: ServerHalf, listen: str = "127.0.0.1:0", **kwargs) -> ServeResult:
    """Serve until ``stop_event`` is set or ``max_steps`` steps are applied (blocking).

    Keyword arguments are those of ``ServerAgent``: checkpoint_dir, checkpoint_every, resume,
    allow_keys, max_steps, stop_event, codec, fedavg_every, fedavg_devices, on_event, ...
    """
    return ServerAgent(server_half, listen, **kwargs).run()
