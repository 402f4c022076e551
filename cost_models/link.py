"""The network link between device and server: rates and per-message latency.

Rates are parsed tvmc-style from strings such as ``"100Mbps"``, ``"1Gbps"``, ``"20MB/s"``:
bit units (``bps``) are decimal bits per second, byte units (``B/s``) decimal bytes per second.
Everything is stored in bytes per second.

>>> parse_rate("100Mbps")
12500000.0
>>> parse_rate("20MB/s")
20000000.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from splitc import InputError

__all__ = ["Link", "parse_duration", "parse_rate"]

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKMGT]?)(bps|bit/s|B/s|Bps)\s*$")
_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us|ns)?\s*$")
_TIME_UNIT = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, None: 1.0}


def parse_rate(text: str) -> float:
    """Parse a link rate into bytes per second; raise ``InputError`` on anything else."""
    m = _RATE.match(str(text))
    if not m:
        raise InputError(
            f"Link: cannot parse rate {text!r}; use forms like '100Mbps', '1Gbps' or '20MB/s'"
        )
    value = float(m.group(1)) * _PREFIX[m.group(2)]
    if m.group(3) in ("bps", "bit/s"):
        value /= 8.0
    if value <= 0:
        raise InputError(f"Link: rate {text!r} must be positive")
    return value


def parse_duration(text: str) -> float:
    """Parse a latency such as ``"5ms"`` or ``"0.002"`` (seconds) into seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise InputError(f"Link: cannot parse latency {text!r}; use forms like '5ms' or '200us'")
    return float(m.group(1)) * _TIME_UNIT[m.group(2)]


@dataclass(frozen=True)
class Link:
    """Uplink (device -> server) and downlink rates in bytes/s, and latency per message in s."""

    uplink: float
    downlink: float
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not (self.uplink > 0 and self.downlink > 0 and self.latency >= 0):
            raise InputError(f"Link: rates must be > 0 and latency >= 0, got {self}")

    @classmethod
    def parse(cls, uplink: str, downlink: str | None = None, latency: str = "0") -> Link:
        up = parse_rate(uplink)
        return cls(up, parse_rate(downlink) if downlink else up, parse_duration(latency))

    def up_time(self, nbytes: int) -> float:
        return nbytes / self.uplink

    def down_time(self, nbytes: int) -> float:
        return nbytes / self.downlink

    def to_json(self) -> dict:
        return {"uplink_Bps": self.uplink, "downlink_Bps": self.downlink, "latency_s": self.latency}

    @classmethod
    def from_json(cls, d: dict) -> Link:
        return cls(d["uplink_Bps"], d["downlink_Bps"], d.get("latency_s", 0.0))
