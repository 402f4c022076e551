"""Device profiles: the constants a roofline cost model needs, with where they came from.

A profile is a data file (``cost_models/profiles/<name>.json``) or ``local-cpu``, measured on
the spot by ``cost_models/microbench.py``. Bundled GPU profiles are published specifications
(``provenance.status == "prior"``); a calibration run replaces them with measured numbers
(``"calibrated"``) and says so in the file.

JSON schema (every field required except ``provenance.notes``)::

    {"name": "a100", "kind": "gpu" | "cpu",
     "peak_flops": {"float32": 1.95e13, "float16": ...},   # FLOP/s per dtype
     "mem_bandwidth": 2.039e12,                             # bytes/s
     "kernel_overhead": 5e-6,                               # seconds per kernel launch
     "provenance": {"status": "prior" | "calibrated" | "measured", "source": "...",
                    "date": "YYYY-MM", "notes": "..."}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from splitc import InputError

__all__ = ["LOCAL_CPU", "PROFILE_DIR", "DeviceProfile", "list_profiles", "load_profile"]

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
LOCAL_CPU = "local-cpu"
_STATUSES = ("prior", "calibrated", "measured")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str  # "cpu" | "gpu"
    peak_flops: dict[str, float]  # FLOP/s per dtype; "float32" always present
    mem_bandwidth: float  # bytes/s
    kernel_overhead: float  # seconds per kernel
    provenance: dict = field(default_factory=dict)
    # A calibrated profile's learned cost model (``cost_models/learned.py``), plain JSON;
    # empty for priors. Optional key "learned" in the file: older files load unchanged.
    learned: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"Profile {self.name!r}"
        if self.kind not in ("cpu", "gpu"):
            raise InputError(f"{where}: kind {self.kind!r} must be 'cpu' or 'gpu'")
        if "float32" not in self.peak_flops:
            raise InputError(f"{where}: peak_flops needs a 'float32' entry")
        if not all(v > 0 for v in self.peak_flops.values()) or not self.mem_bandwidth > 0:
            raise InputError(f"{where}: peak_flops and mem_bandwidth must be > 0")
        if not self.kernel_overhead >= 0:
            raise InputError(f"{where}: kernel_overhead must be >= 0")
        if self.provenance.get("status") not in _STATUSES or not self.provenance.get("source"):
            raise InputError(f"{where}: provenance needs a status ({'|'.join(_STATUSES)}) and "
                             "a source")

    def peak(self, dtype: str) -> float:
        """FLOP/s for ``dtype``; dtypes without their own entry run at the float32 rate."""
        return self.peak_flops.get(dtype, self.peak_flops["float32"])

    @property
    def is_prior(self) -> bool:
        return self.provenance.get("status") == "prior"

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "peak_flops": dict(self.peak_flops),
                "mem_bandwidth": self.mem_bandwidth, "kernel_overhead": self.kernel_overhead,
                "provenance": dict(self.provenance),
                **({"learned": self.learned} if self.learned else {})}

    @classmethod
    def from_json(cls, d: dict) -> DeviceProfile:
        try:
            return cls(str(d["name"]), str(d["kind"]),
                       {str(k): float(v) for k, v in d["peak_flops"].items()},
                       float(d["mem_bandwidth"]), float(d["kernel_overhead"]),
                       dict(d["provenance"]), dict(d.get("learned") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"Profile: malformed profile data ({type(e).__name__}: {e}); "
                             "see cost_models/profiles.py for the schema") from None


def list_profiles() -> list[str]:
    """Bundled profile names plus ``local-cpu``."""
    return sorted([p.stem for p in PROFILE_DIR.glob("*.json")] + [LOCAL_CPU])


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A bundled profile by name, ``local-cpu`` (measured once per process), or a JSON path."""
    s = str(name_or_path)
    if s == LOCAL_CPU:
        from splitc.cost_models.microbench import local_cpu_profile

        return local_cpu_profile()
    path = PROFILE_DIR / f"{s}.json"
    if not path.exists():
        path = Path(s)
        if not (s.endswith(".json") or path.is_file()):
            raise InputError(f"Profile: unknown profile {s!r}; use one of "
                             f"{', '.join(list_profiles())} or a path to a profile .json file")
        if not path.is_file():
            raise InputError(f"Profile: profile file {s!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"Profile: cannot read {str(path)!r} as JSON ({type(e).__name__}); "
                         "see cost_models/profiles.py for the schema") from None
    if not isinstance(data, dict):
        raise InputError(f"Profile: {str(path)!r} must hold a JSON object")
    return DeviceProfile.from_json(data)
