"""Links: the token bucket, link emulation in the transport, and a real rate-limited loopback in
a private network namespace (``unshare -n`` + ``tc tbf``; skipped where not allowed)."""

import json
import os
import shutil
import subprocess
import sys

import numpy_halves as nh
import pytest
from splitc.runtime.device_agent import train
from splitc.runtime.transport import TokenBucket

HELPERS = os.path.join(os.path.dirname(__file__), "..", "helpers")


def test_token_bucket_debt_model():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    b = TokenBucket(1000.0, burst=100.0, clock=lambda: now[0], sleep=sleep)
    assert b.consume(100) == 0.0  # the burst
    assert b.consume(500) == 0.5  # 500 bytes of debt at 1000 B/s
    now[0] += 0.2  # idle time refills 200 bytes, capped at the 100-byte burst
    assert b.consume(300) == pytest.approx(0.2)  # 300 - 100 = 200 bytes of debt
    now[0] += 0.05  # 50 bytes refilled, below the burst
    assert b.consume(50) == 0.0
    assert slept == [0.5, pytest.approx(0.2)]


def test_link_rate_emulation_slows_steps_to_the_link(start_server, loader):
    srv = start_server(nh.NumpyServer())
    rate = 100e3  # 100 kB/s, so that the link, not compute, sets the step time
    res = train(nh.NumpyDevice(), srv.address, loader, max_steps=12, link_rate=rate, timeout_s=30)
    srv.stop()
    # Per step: FORWARD 2382 bytes up, GRADIENT 46 + meta + 2 * 80 + 8 + 2048 bytes down:
    # ~4.7 KB / 100 kB/s = 47 ms per step (burst 0: every message pays bytes / rate).
    per_step = (res.bytes_up + res.bytes_down) / 12
    assert 4500 < per_step < 4900
    total_link = sum(t.transfer_s for t in res.times)
    assert total_link >= 0.9 * 12 * per_step / rate
    assert res.link_wait_s > 0


# lo's 64 KiB MTU exceeds the 4 KiB (32 kbit) bucket: tbf would drop every full-size packet and
# TCP would stall (seen: connection timed out). An Ethernet MTU makes it a 100 Mbit/s link.
TC = (
    "ip link set lo up && ip link set lo mtu 1500 && tc qdisc add dev lo root tbf rate 100mbit "
    "burst 32kbit latency 50ms"
)


def _netns_ok() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("tc")):
        return False
    r = subprocess.run(["unshare", "-n", "sh", "-c", TC], capture_output=True, timeout=20)
    return r.returncode == 0


SCRIPT = r"""
import json, statistics, sys, threading
import numpy_halves as nh
from splitc.runtime.data import DataLoader, load_digits_split
from splitc.runtime.device_agent import train
from splitc.runtime.server_agent import ServerAgent
xtr, ytr, _, _ = load_digits_split()
server = nh.NumpyServer(batch=64, hidden=512)
stop = threading.Event()
agent = ServerAgent(server, "127.0.0.1:0", stop_event=stop)
t = threading.Thread(target=agent.run); t.start()
res = train(nh.NumpyDevice(batch=64, hidden=512), agent.address, DataLoader(xtr, ytr, 64),
            max_steps=15, timeout_s=60)
stop.set(); t.join()
times = res.times[2:]
print(json.dumps({"step": statistics.median(x.total_s for x in times),
                  "compute": statistics.median(x.compute_s + x.server_s for x in times),
                  "bytes": (res.bytes_up + res.bytes_down) / 15}))
"""


@pytest.mark.network
@pytest.mark.slow
def test_step_time_on_a_tc_limited_loopback():
    if not _netns_ok():
        pytest.skip("needs root with unshare -n and tc (private network namespace)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
    cmd = f'{TC} && {sys.executable} -c "$SCRIPT"'
    out = subprocess.run(
        ["unshare", "-n", "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env, SCRIPT=SCRIPT),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # Cut 64 x 512 float32 = 131072 bytes up and its gradient down, ~265 KB per step with headers
    # and labels; at 100 Mbit/s = 12.5 MB/s that is ~21 ms of link time per step.
    assert 262_000 < m["bytes"] < 268_000
    predicted = m["compute"] + m["bytes"] / 12.5e6
    assert 0.8 * predicted <= m["step"] <= 1.6 * predicted, (m, predicted)
