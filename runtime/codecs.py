"""Link codecs: how a float tensor is turned into the bytes that cross the cut, and back.

Selected per run by a short spec string and recorded in the run (``TrainResult.codec``, the
server's events): ``"none"``, ``"fp16"``, ``"int8"`` (per-tensor scale, stochastic rounding),
``"topk:0.1"`` (keep the largest 10% by magnitude: values + indices), ``"zstd"`` /
``"zstd:3"`` and ``"lz4"`` (lossless). Only floating tensors are encoded; labels and integer
tensors always cross as ``none``.

Bounds (checked by tests/runtime/test_codecs.py):

- fp16: relative error <= 2**-11 per element (round to nearest), for |x| in fp16's normal range.
- int8: |x - decode(x)| <= scale = max|x| / 127 per element (stochastic rounding moves each
  element to one of the two neighbouring levels, unbiased in expectation).
- topk: the kept elements are exact, the rest are zero.

Stochastic rounding is seeded from ``(seed, step, index)`` so a replayed step encodes to the
same bytes (the resume guarantee needs that).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from splitc import InputError, TransportError

__all__ = ["CODEC_IDS", "Codec", "parse_codec"]

# Wire ids (runtime/wire.py carries them in every tensor header); never renumber.
CODEC_IDS = {"none": 0, "fp16": 1, "int8": 2, "topk": 3, "zstd": 4, "lz4": 5}
_NAMES = {v: k for k, v in CODEC_IDS.items()}


@dataclass(frozen=True)
class Codec:
    """A parsed codec spec. ``name`` is a key of ``CODEC_IDS``; ``param`` its option."""

    name: str = "none"
    param: float = 0.0
    seed: int = 0

    @property
    def id(self) -> int:
        return CODEC_IDS[self.name]

    @property
    def spec(self) -> str:
        if self.name == "topk":
            return f"topk:{self.param:g}"
        if self.name == "zstd" and self.param:
            return f"zstd:{int(self.param)}"
        return self.name

    @property
    def lossless(self) -> bool:
        return self.name in ("none", "zstd", "lz4")

    def applies_to(self, dtype: np.dtype) -> bool:
        return self.name != "none" and np.dtype(dtype).kind == "f"

    def max_encoded_bytes(self, shape: tuple[int, ...], dtype: str) -> int:
        """Upper bound of the encoded size, checked before a payload is touched."""
        n = int(np.prod(shape, dtype=np.int64))
        raw = n * np.dtype(dtype).itemsize
        if not self.applies_to(np.dtype(dtype)):
            return raw
        if self.name == "fp16":
            return n * 2
        if self.name == "int8":
            return 4 + n
        if self.name == "topk":
            return 4 + n * (4 + np.dtype(dtype).itemsize)
        # zstd/lz4 worst case on incompressible data: raw + a small frame overhead
        # (ZSTD_compressBound = n + n/256 + 64 rounded up; LZ4 = n + n/255 + 16).
        return raw + raw // 255 + 1024

    def encode(self, arr: np.ndarray, step: int = 0, index: int = 0):
        """Return a bytes-like payload (the array's own buffer for ``none``: zero copy)."""
        arr = np.ascontiguousarray(arr)
        if not self.applies_to(arr.dtype):
            return memoryview(arr).cast("B") if arr.size else b""
        if self.name == "fp16":
            return arr.astype(np.float16).tobytes()
        if self.name == "int8":
            return _int8_encode(arr, np.random.default_rng((self.seed, step, index)))
        if self.name == "topk":
            return _topk_encode(arr, self.param)
        if self.name == "zstd":
            import zstandard

            return zstandard.ZstdCompressor(level=int(self.param) or 3).compress(arr.tobytes())
        import lz4.frame

        return lz4.frame.compress(arr.tobytes())

    def decode(self, payload, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """Inverse of ``encode``; a payload that does not decode to ``shape`` raises."""
        if self.name == "none":  # the hot path: a view of the received bytes
            return np.frombuffer(payload, dtype=dtype, count=math.prod(shape)).reshape(shape)
        dt = np.dtype(dtype)
        n = math.prod(shape)
        if not self.applies_to(dt):
            return np.frombuffer(payload, dtype=dt, count=n).reshape(shape)
        try:
            if self.name == "fp16":
                return np.frombuffer(payload, np.float16, count=n).astype(dt).reshape(shape)
            if self.name == "int8":
                (scale,) = struct.unpack_from("<f", payload, 0)
                q = np.frombuffer(payload, np.int8, count=n, offset=4)
                return (q.astype(dt) * dt.type(scale)).reshape(shape)
            if self.name == "topk":
                return _topk_decode(payload, n, dt).reshape(shape)
            if self.name == "zstd":
                import zstandard

                raw = zstandard.ZstdDecompressor().decompress(
                    bytes(payload), max_output_size=n * dt.itemsize
                )
            else:
                import lz4.frame

                raw = lz4.frame.decompress(bytes(payload))
        except (ValueError, struct.error, RuntimeError) as e:  # zstd/lz4 raise their own
            raise TransportError(
                f"Codec: {self.name} payload does not decode ({e}); the peer uses another codec"
            ) from None
        except Exception as e:  # zstandard.ZstdError, lz4 LZ4FrameError
            raise TransportError(f"Codec: {self.name} payload does not decode ({e})") from None
        if len(raw) != n * dt.itemsize:
            raise TransportError(
                f"Codec: {self.name} payload decodes to {len(raw)} bytes, expected "
                f"{n * dt.itemsize}; the peer sent a different tensor"
            )
        return np.frombuffer(raw, dt).reshape(shape)


def _int8_encode(arr: np.ndarray, rng: np.random.Generator) -> bytes:
    amax = float(np.max(np.abs(arr))) if arr.size else 0.0
    scale = amax / 127.0 if amax > 0 else 1.0
    x = arr.astype(np.float64) / scale
    lo = np.floor(x)
    # Round up with probability equal to the fractional part: unbiased, |error| < 1 level.
    q = lo + (rng.random(x.shape) < (x - lo))
    q = np.clip(q, -127, 127).astype(np.int8)
    return struct.pack("<f", scale) + q.tobytes()


def _topk_encode(arr: np.ndarray, frac: float) -> bytes:
    flat = arr.reshape(-1)
    k = max(1, int(np.ceil(frac * flat.size))) if flat.size else 0
    idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k else np.zeros(0)
    idx = np.sort(idx).astype(np.uint32)
    return struct.pack("<I", k) + idx.tobytes() + flat[idx].tobytes()


def _topk_decode(payload, n: int, dt: np.dtype) -> np.ndarray:
    (k,) = struct.unpack_from("<I", payload, 0)
    if k > n or len(payload) != 4 + k * (4 + dt.itemsize):
        raise TransportError(f"Codec: topk payload of {len(payload)} bytes holds no {k} entries")
    idx = np.frombuffer(payload, np.uint32, count=k, offset=4)
    vals = np.frombuffer(payload, dt, count=k, offset=4 + 4 * k)
    if k and int(idx.max()) >= n:
        raise TransportError(f"Codec: topk index {int(idx.max())} out of range for {n} elements")
    out = np.zeros(n, dt)
    out[idx] = vals
    return out


def parse_codec(text: str | Codec, seed: int = 0) -> Codec:
    """``"none" | "fp16" | "int8" | "topk:FRAC" | "zstd[:LEVEL]" | "lz4"`` -> ``Codec``."""
    if isinstance(text, Codec):
        return text
    name, _, opt = str(text).strip().partition(":")
    if name not in CODEC_IDS:
        raise InputError(
            f"Codec: unknown codec {text!r}; use one of none, fp16, int8, topk:FRAC, zstd, lz4"
        )
    param = 0.0
    if name == "topk":
        try:
            param = float(opt)
        except ValueError:
            param = -1.0
        if not 0.0 < param <= 1.0:
            raise InputError(f"Codec: topk needs a fraction in (0, 1], got {text!r}; e.g. topk:0.1")
    elif name == "zstd" and opt:
        if not opt.isdigit() or not 1 <= int(opt) <= 22:
            raise InputError(f"Codec: zstd level must be 1..22, got {text!r}")
        param = float(opt)
    elif opt:
        raise InputError(f"Codec: {name} takes no option, got {text!r}")
    return Codec(name, param, seed)


def codec_by_id(codec_id: int, template: Codec) -> Codec:
    """The codec a header names; must be the session's codec (or none for non-float tensors)."""
    if codec_id not in _NAMES:
        raise TransportError(f"Codec: unknown codec id {codec_id}; the peer runs another version")
    return template if _NAMES[codec_id] == template.name else Codec(_NAMES[codec_id])
