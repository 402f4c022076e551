"""cost_models/link.py: link rates and latencies as users write them."""

import re

import pytest
from splitc import InputError
from splitc.cost_models.link import Link, parse_duration, parse_rate


@pytest.mark.parametrize("text,bps", [
    ("100Mbps", 12.5e6),      # 100e6 bit/s / 8
    ("1Gbps", 125e6),         # 1e9 / 8
    ("20MB/s", 20e6),         # bytes already
    ("2.5 kbit/s", 312.5),    # 2500 / 8
    ("1e3Bps", 1e3),
])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "100", "100Mb", "-5Mbps"])
def test_parse_rate_rejects(text):
    with pytest.raises(InputError, match=re.escape(
            f"Link: cannot parse rate {text!r}; use forms like '100Mbps', '1Gbps' or '20MB/s'")):
        parse_rate(text)


def test_zero_rate_and_durations():
    with pytest.raises(InputError, match=re.escape("Link: rate '0Mbps' must be positive")):
        parse_rate("0Mbps")
    assert parse_duration("5ms") == 0.005 and parse_duration("200us") == pytest.approx(2e-4)
    assert parse_duration("0.002") == 0.002


def test_link_times_and_json():
    link = Link.parse("100Mbps", "1Gbps", "5ms")
    assert (link.uplink, link.downlink, link.latency) == (12.5e6, 125e6, 0.005)
    # 1.25 MB up at 12.5 MB/s = 0.1 s; down at 125 MB/s = 0.01 s
    assert link.up_time(1_250_000) == 0.1 and link.down_time(1_250_000) == 0.01
    assert Link.from_json(link.to_json()) == link
    assert Link.parse("10Mbps").downlink == 1.25e6  # downlink defaults to the uplink
