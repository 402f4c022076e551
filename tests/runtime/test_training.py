"""Split training over loopback: equals unsplit training, codecs, evaluation, FedAvg, 8 devices."""

import threading

import numpy as np
import numpy_halves as nh
import pytest
from splitc.runtime.data import DataLoader
from splitc.runtime.device_agent import evaluate, train

pytestmark = pytest.mark.network

STEPS = 40


def test_split_equals_unsplit_step_by_step(start_server, loader):
    server = nh.NumpyServer()
    srv = start_server(server)
    dev = nh.NumpyDevice()
    seen = []
    res = train(
        dev, srv.address, loader, epochs=1, max_steps=STEPS, on_progress=seen.append, timeout_s=20
    )
    result = srv.stop()
    ref_dev, ref_srv = nh.NumpyDevice(), nh.NumpyServer()
    ref = nh.train_unsplit(ref_dev, ref_srv, loader, STEPS)
    # Codec none: the same float32 arithmetic on the same bytes, so equality is exact.
    assert res.losses == ref and res.steps == list(range(1, STEPS + 1))
    assert nh.params_equal(dev.state_dict(), ref_dev.state_dict())
    assert nh.params_equal(server.state_dict(), ref_srv.state_dict())
    assert result.steps_applied == STEPS and result.errors == [] and result.devices == {0: STEPS}
    assert [p.step for p in seen] == res.steps
    assert seen[-1].bytes_up == res.bytes_up - 46  # all but the 46-byte BYE
    t = res.times[0]
    assert t.total_s >= t.compute_s and t.transfer_s >= 0 and t.server_s > 0
    rows = res.vs_prediction(
        {
            "device": 1e-3,
            "uplink": 2e-3,
            "downlink": 3e-3,
            "fixed": 0.0,
            "server": 4e-3,
            "total": 1e-2,
        }
    )
    assert [r[:2] for r in rows] == [
        ("device", 1e-3),
        ("link", 5e-3),
        ("server", 4e-3),
        ("total", 1e-2),
    ]
    med = res.median_time()
    assert [r[2] for r in rows] == [med.compute_s, med.transfer_s, med.server_s, med.total_s]
    assert med.total_s == float(np.median([x.total_s for x in res.times]))
    assert med.server_s == float(np.median([x.server_s for x in res.times]))
    # Per FORWARD: 46 header + 2 * 80 tensor headers + h 16*32*4 = 2048 + labels 16*8 = 128
    # = 2382 bytes; plus HELLO (46 + meta) and BYE (46).
    per_step = 46 + 2 * 80 + 2048 + 128
    hello = 46 + len(b'{"codec":"none","label":[[16],"int64"]}')
    assert res.bytes_up == hello + STEPS * per_step + 46


@pytest.mark.parametrize(
    "codec,h_bytes,spec_len",
    [
        ("fp16", 16 * 32 * 2, 4),  # 512 elements * 2 bytes
        ("int8", 4 + 16 * 32, 4),  # float32 scale + 512 bytes
        ("topk:0.1", 4 + 52 * 8, 8),  # ceil(0.1 * 512) = 52 (uint32 index + float32 value each)
    ],
)
def test_codec_bytes_up_exact(start_server, loader, codec, h_bytes, spec_len):
    srv = start_server(nh.NumpyServer())
    res = train(nh.NumpyDevice(), srv.address, loader, max_steps=10, codec=codec, timeout_s=20)
    srv.stop()
    assert res.codec == codec
    hello = 46 + len(b'{"codec":"","label":[[16],"int64"]}') + spec_len
    assert res.bytes_up == hello + 10 * (46 + 2 * 80 + h_bytes + 128) + 46


@pytest.mark.slow
def test_codec_accuracy_effect(start_server, digits):
    """Lossy codecs on both directions still train the MLP; none reaches >= 90% on digits."""
    xtr, ytr, xte, yte = digits
    acc = {}
    for codec in ["none", "fp16", "int8", "topk:0.25", "zstd"]:
        srv = start_server(nh.NumpyServer())
        dev = nh.NumpyDevice()
        train(
            dev, srv.address, DataLoader(xtr, ytr, 16, seed=3), epochs=3, codec=codec, timeout_s=20
        )
        acc[codec] = evaluate(dev, srv.address, xte, yte, batch_size=16, timeout_s=20)
        srv.stop()
    assert acc["none"] >= 0.9
    assert acc["zstd"] == acc["none"]  # lossless: the same run
    assert all(acc[c] >= acc["none"] - 0.05 for c in acc), acc


def test_evaluate_pads_last_batch(start_server, digits):
    xtr, ytr, xte, yte = digits
    server, dev = nh.NumpyServer(), nh.NumpyDevice()
    srv = start_server(server)
    acc = evaluate(dev, srv.address, xte[:37], yte[:37], batch_size=16, timeout_s=20)
    srv.stop()
    # 37 = 2 full batches + 5 padded rows; the same as inferring locally.
    logits = server.infer(dev.infer([xte[:37]]))[0]
    assert acc == np.mean(np.argmax(logits, 1) == yte[:37])


def test_fedavg_two_devices(start_server, digits):
    xtr, ytr, _, _ = digits
    srv = start_server(nh.NumpyServer(), fedavg_every=5, fedavg_devices=2)
    devs = [nh.NumpyDevice(seed=10), nh.NumpyDevice(seed=20)]
    out = {}

    def run(i):
        out[i] = train(
            devs[i],
            srv.address,
            DataLoader(xtr, ytr, 16, seed=i),
            max_steps=20,
            device_id=i,
            fedavg_every=5,
            timeout_s=20,
        )

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    result = srv.stop()
    assert result.fedavg_rounds == 4 and out[0].fedavg_rounds == 4  # 20 steps / every 5
    # Step 20 ends with an average: both device halves hold the same parameters.
    assert nh.params_equal(devs[0].state_dict(), devs[1].state_dict())
    assert result.steps_applied == 40


def test_eight_devices_nothing_lost(start_server, digits):
    xtr, ytr, _, _ = digits
    srv = start_server(nh.NumpyServer())
    out, errs = {}, []

    def run(i):
        try:
            out[i] = train(
                nh.NumpyDevice(seed=i),
                srv.address,
                DataLoader(xtr, ytr, 16, seed=i),
                max_steps=25,
                device_id=i,
                timeout_s=30,
            )
        except Exception as e:  # surfaced below
            errs.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in ts]
    [t.join(90) for t in ts]
    result = srv.stop()
    assert errs == []
    assert result.steps_applied == 8 * 25 and result.errors == [] and result.replays == 0
    assert result.devices == {i: 25 for i in range(8)}
    assert all(out[i].steps == list(range(1, 26)) for i in range(8))
    step_events = [(e.device_id, e.step) for e in srv.events if e.kind == "step"]
    assert sorted(step_events) == [(i, s) for i in range(8) for s in range(1, 26)]
