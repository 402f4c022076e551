"""The device agent: training loop of one device half against a server agent, and evaluation.

Per step ``s`` (1-based over all epochs; batch ``s - 1`` of the DataLoader): ``forward`` ->
FORWARD (cut tensors + labels, step ``s``, ack = last durable checkpoint) -> GRADIENT (loss +
gradients) -> ``backward``. A request is sent again when the connection to the server was
re-established after it was sent (a server restart; the server applies each step once) or, if
set, every ``retry_s`` without a reply, until ``timeout_s``; replies to other steps are stale
duplicates and are dropped. REWIND from a restarted server: HELLO again and reload the newest
checkpoint at or before the server's step (see server_agent.py for the protocol). Checkpoint 0
is the initial state, so a run can always rewind to its start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from splitc import InputError, TransportError
from splitc.runtime import checkpoint, wire
from splitc.runtime.codecs import Codec, parse_codec
from splitc.runtime.data import DataLoader
from splitc.runtime.halves import DeviceHalf
from splitc.runtime.security import CurveClient
from splitc.runtime.transport import DeviceTransport
from splitc.runtime.wire import Expect, Kind, Message, TensorSpec

__all__ = ["Progress", "StepTime", "TrainResult", "evaluate", "train"]


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step: device compute (forward + backward), time on the link (round trip
    minus the server's reported compute, including link emulation), server compute."""

    compute_s: float
    transfer_s: float
    server_s: float
    total_s: float


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float
    time: StepTime
    bytes_up: int
    bytes_down: int


@dataclass
class TrainResult:
    codec: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    times: list[StepTime] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    link_wait_s: float = 0.0
    resumed_from: int = 0
    rewinds: int = 0
    fedavg_rounds: int = 0

    def median_time(self) -> StepTime:
        """Median of each part over the steps (to print next to the plan's prediction)."""
        if not self.times:
            return StepTime(0.0, 0.0, 0.0, 0.0)
        return StepTime(
            *(
                float(np.median([getattr(t, f) for t in self.times]))
                for f in ("compute_s", "transfer_s", "server_s", "total_s")
            )
        )

    def vs_prediction(self, breakdown: dict) -> list[tuple[str, float, float]]:
        """(part, predicted s, measured median s) rows against plan.json's ``breakdown``.

        The link row compares the plan's uplink + downlink + fixed latency with the measured
        transfer time (round trip minus the server's reported compute)."""
        m = self.median_time()
        link = breakdown["uplink"] + breakdown["downlink"] + breakdown.get("fixed", 0.0)
        return [
            ("device", breakdown["device"], m.compute_s),
            ("link", link, m.transfer_s),
            ("server", breakdown["server"], m.server_s),
            ("total", breakdown["total"], m.total_s),
        ]

    def _drop_after(self, step: int) -> None:
        keep = [i for i, s in enumerate(self.steps) if s <= step]
        self.steps = [self.steps[i] for i in keep]
        self.losses = [self.losses[i] for i in keep]
        self.times = [self.times[i] for i in keep]


class _Client:
    """Request/reply with resend and stale-reply filtering over a DeviceTransport."""

    def __init__(
        self,
        transport: DeviceTransport,
        plan_id: str,
        device_id: int,
        timeout_s: float,
        retry_s: float | None,
    ):
        self.t, self.plan_id, self.device_id = transport, plan_id, device_id
        self.timeout_s, self.retry_s = timeout_s, retry_s

    def request(self, msg: Message, expect: Expect, codec: Codec = Codec()) -> Message:
        """Send ``msg``; return the reply for its step. ZeroMQ delivers in order on a live
        connection, so the message is sent again only when the connection was re-established
        after the send (the copy in flight may be lost) or, if ``retry_s`` is set, after that
        long without a reply. Replies to other steps or of other kinds are stale duplicates of
        resent requests and are dropped."""
        frames = wire.encode(msg, codec)
        deadline = time.monotonic() + self.timeout_s
        while True:
            conn = self.t.connections
            resend_at = deadline if self.retry_s is None else time.monotonic() + self.retry_s
            sent = self.t.send(frames)  # False: not even queued (server down), retry below
            if not sent:
                self.t.check_events()
            while sent and (now := time.monotonic()) < min(resend_at, deadline):
                if self.t.connections > max(conn, 1):
                    break  # reconnected since the send: resend
                got = self.t.recv(min(resend_at, deadline, now + 0.25) - now)
                if got is None:
                    continue
                kind, _ = wire.peek(got)
                if kind == Kind.ERROR:
                    err = wire.decode(
                        got, Expect(wire.plan_of(got), frozenset([Kind.ERROR]), {Kind.ERROR: ()})
                    )
                    raise TransportError(
                        f"Device: the server refused {msg.kind.name} step {msg.step}: "
                        f"{err.meta.get('message', '')}"
                    )
                if kind not in expect.kinds:
                    continue  # a late duplicate of an earlier exchange
                reply = wire.decode(got, expect)
                if reply.step == msg.step:
                    return reply
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"Device: no reply to {msg.kind.name} step {msg.step} from "
                    f"{self.t.connect_to} within {self.timeout_s:g} s; is the server running?"
                )


def _check_cut(outs, cut: tuple[TensorSpec, ...]) -> None:
    """The device half's outputs must be the transport spec, or the server would refuse them."""
    got = [(tuple(np.shape(o)), np.asarray(o).dtype.name) for o in outs]
    want = [(c.shape, c.dtype) for c in cut]
    if got != want:
        raise TransportError(
            f"Device: forward returned {got}, the transport spec is {want}; the device half does "
            f"not match plan.json"
        )


def _label_spec(data: DataLoader) -> list:
    return [[data.batch_size, *data.y.shape[1:]], str(data.y.dtype)]


def train(
    device_half: DeviceHalf,
    connect: str,
    data: DataLoader,
    epochs: int = 1,
    *,
    device_id: int = 0,
    max_steps: int | None = None,
    checkpoint_dir=None,
    checkpoint_every: int = 0,
    resume: bool = False,
    codec: str = "none",
    link_rate: float | None = None,
    curve: CurveClient | None = None,
    fedavg_every: int = 0,
    on_progress=None,
    timeout_s: float = 120.0,
    retry_s: float | None = None,
) -> TrainResult:
    """Train ``device_half`` against the server at ``connect``; return losses, bytes, times."""
    codec_ = parse_codec(codec, seed=device_id)
    plan_id = device_half.plan_id
    total = epochs * data.batches_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    cut = tuple(TensorSpec.of(c) for c in device_half.cut)
    gspecs = (TensorSpec("loss", (), "float64"),) + tuple(
        TensorSpec.of(c) for c in device_half.cut if c.grad
    )
    exp_step = Expect(
        plan_id,
        frozenset([Kind.GRADIENT, Kind.REWIND]),
        {Kind.GRADIENT: gspecs, Kind.REWIND: ()},
        codec_,
    )
    exp_welcome = Expect(plan_id, frozenset([Kind.WELCOME]), {Kind.WELCOME: ()})
    exp_avg = Expect(plan_id, frozenset([Kind.FEDAVG_PULL]), {Kind.FEDAVG_PULL: None})
    res = TrainResult(codec=codec_.spec)
    ack = -1

    def save(step: int) -> None:
        nonlocal ack
        checkpoint.save(
            checkpoint_dir,
            step,
            {f"half/{k}": v for k, v in device_half.state_dict().items()},
            {
                "plan_id": plan_id,
                "device_id": device_id,
                "codec": codec_.spec,
                "data": {"seed": data.seed, "batch_size": data.batch_size, "cursor": step},
            },
        )
        ack = step

    def load(step: int | None) -> int:
        got = checkpoint.load(checkpoint_dir, step)
        if got is None:
            return 0
        s, arrays, meta = got
        if meta.get("plan_id") != plan_id:
            raise InputError(
                f"Device: checkpoint in {checkpoint_dir} is for plan {meta.get('plan_id')!r}, "
                f"this half is {plan_id!r}; use another --checkpoint-dir or drop --resume"
            )
        device_half.load_state_dict({k[5:]: v for k, v in arrays.items() if k.startswith("half/")})
        return s

    step = 0
    if checkpoint_dir is not None:
        if resume:
            step = res.resumed_from = load(None)
        if not checkpoint.steps(checkpoint_dir) or not resume:
            save(0)
        ack = step
    transport = DeviceTransport(connect, curve=curve, link_rate=link_rate)
    client = _Client(transport, plan_id, device_id, timeout_s, retry_s)

    def hello(step: int) -> int:
        """Say HELLO; return the step to continue from (after a rewind if the server is behind)."""
        meta = {"codec": codec_.spec, "label": _label_spec(data)}
        w = client.request(Message(Kind.HELLO, plan_id, step, device_id, ack, meta), exp_welcome)
        applied = w.meta["applied"]
        if applied >= step:
            return step  # the server holds our later steps in its reply cache: replay them
        older = [
            s for s in (checkpoint.steps(checkpoint_dir) if checkpoint_dir else []) if s <= applied
        ]
        if not older:
            raise TransportError(
                f"Device: the server holds step {applied} of device {device_id}, this device is "
                f"at {step} with no checkpoint at or before {applied}; restart both without "
                f"--resume"
            )
        res.rewinds += 1
        return load(older[-1])

    try:
        step = hello(step)
        res._drop_after(step)
        while step < total:
            s = step + 1
            x, y = data.batch(s - 1)
            t0 = time.perf_counter()
            outs = device_half.forward([x])
            t1 = time.perf_counter()
            _check_cut(outs, cut)
            reply = client.request(
                Message(Kind.FORWARD, plan_id, s, device_id, ack, tensors=[*outs, y]),
                exp_step,
                codec_,
            )
            t2 = time.perf_counter()
            if reply.kind == Kind.REWIND:
                step = hello(step)
                res._drop_after(step)
                continue
            device_half.backward(list(reply.tensors[1:]))
            t3 = time.perf_counter()
            if fedavg_every and s % fedavg_every == 0:
                _fedavg(device_half, client, plan_id, device_id, s, exp_avg)
                res.fedavg_rounds += 1
            if checkpoint_dir is not None and checkpoint_every and s % checkpoint_every == 0:
                save(s)
                durable = reply.meta.get("durable", -1)
                if reply.meta.get("persistent"):
                    # Keep what a restarted server may rewind us to (durable = its ack).
                    checkpoint.prune(checkpoint_dir, max(durable, 0), keep_last=1)
                else:
                    checkpoint.prune(checkpoint_dir, s, keep_last=1)
            server_s = float(reply.meta.get("server_s", 0.0))
            st = StepTime((t1 - t0) + (t3 - t2), max(0.0, (t2 - t1) - server_s), server_s, t3 - t0)
            res.steps.append(s)
            res.losses.append(float(reply.tensors[0]))
            res.times.append(st)
            step = s
            if on_progress:
                on_progress(
                    Progress(s, total, res.losses[-1], st, transport.bytes_up, transport.bytes_down)
                )
        try:  # best effort: the server forgets this device's session
            client.timeout_s = min(timeout_s, 2.0)
            client.request(
                Message(Kind.BYE, plan_id, step, device_id, ack),
                Expect(plan_id, frozenset([Kind.BYE]), {Kind.BYE: ()}),
            )
        except TransportError:
            pass
    finally:
        res.bytes_up, res.bytes_down = transport.bytes_up, transport.bytes_down
        res.link_wait_s = transport.link_wait_s
        transport.close()
    return res


def _fedavg(
    half: DeviceHalf, client: _Client, plan_id: str, device_id: int, s: int, expect: Expect
) -> None:
    state = half.state_dict()
    keys = sorted(k for k, v in state.items() if np.asarray(v).dtype.kind == "f")
    msg = Message(
        Kind.FEDAVG_PUSH,
        plan_id,
        s,
        device_id,
        meta={"keys": keys},
        tensors=[np.asarray(state[k]) for k in keys],
    )
    avg = client.request(msg, expect)
    if len(avg.tensors) != len(keys):
        raise TransportError(
            f"Device: FedAvg reply has {len(avg.tensors)} tensors, sent {len(keys)}"
        )
    state.update({k: np.array(t) for k, t in zip(keys, avg.tensors)})
    half.load_state_dict(state)


def evaluate(
    device_half: DeviceHalf,
    connect: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    device_id: int = 0,
    curve: CurveClient | None = None,
    timeout_s: float = 60.0,
) -> float:
    """Test accuracy of the split model: ``infer`` on both halves (INFER messages).

    The halves have a static batch: the last partial batch is padded with zeros and the padded
    rows are ignored.
    """
    plan_id = device_half.plan_id
    exp = Expect(plan_id, frozenset([Kind.INFER_RESULT]), {Kind.INFER_RESULT: None})
    transport = DeviceTransport(connect, curve=curve)
    client = _Client(transport, plan_id, device_id, timeout_s, timeout_s)
    correct = 0
    try:
        for i, lo in enumerate(range(0, len(x), batch_size)):
            xb = x[lo : lo + batch_size]
            n = len(xb)
            if n < batch_size:
                xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
            cut = device_half.infer([np.ascontiguousarray(xb)])
            out = client.request(Message(Kind.INFER, plan_id, i + 1, device_id, tensors=cut), exp)
            pred = np.argmax(out.tensors[0][:n], axis=1)
            correct += int(np.sum(pred == y[lo : lo + n]))
    finally:
        transport.close()
    return correct / len(x)
