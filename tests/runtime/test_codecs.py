"""Codecs: lossless ones exact, lossy ones within their stated bounds, sizes exact."""

import re

import numpy as np
import pytest
from splitc import InputError, TransportError
from splitc.runtime.codecs import Codec, parse_codec


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)


def _rt(codec, x, step=0):
    p = codec.encode(x, step, 0)
    return len(memoryview(p)), codec.decode(p, x.shape, "float32")


@pytest.mark.parametrize("name", ["none", "zstd", "zstd:9", "lz4"])
def test_lossless_round_trip_exact(name, x):
    n, y = _rt(parse_codec(name), x)
    assert np.array_equal(x, y)
    assert n <= parse_codec(name).max_encoded_bytes(x.shape, "float32")


def test_zstd_shrinks_redundant_tensors():
    relu = np.maximum(np.random.default_rng(1).standard_normal((256, 256)), 0).astype(np.float32)
    n, y = _rt(parse_codec("zstd"), relu)
    assert np.array_equal(y, relu)
    # Half the entries are exact zeros: well under the raw 256*256*4 = 262144 bytes.
    assert n < 0.75 * relu.nbytes


def test_fp16_bound(x):
    n, y = _rt(parse_codec("fp16"), x)
    assert n == x.size * 2  # 2048 elements * 2 bytes
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-11 + 2.0**-24)


def test_int8_bound_and_unbiased(x):
    c = parse_codec("int8")
    n, y = _rt(c, x)
    assert n == 4 + x.size  # float32 scale + one byte per element
    scale = np.abs(x).max() / 127
    assert np.max(np.abs(y - x)) <= scale * (1 + 1e-6)
    # Stochastic rounding is unbiased: the mean error over 2048 elements is far below a level.
    assert abs(float(np.mean(y - x))) < scale / 10
    # Seeded by (seed, step, index): a replayed step encodes to the same bytes, another differs.
    assert bytes(c.encode(x, 5, 0)) == bytes(c.encode(x, 5, 0))
    assert bytes(c.encode(x, 5, 0)) != bytes(c.encode(x, 6, 0))


def test_topk_keeps_largest_exactly(x):
    c = parse_codec("topk:0.25")
    n, y = _rt(c, x)
    k = 512  # ceil(0.25 * 2048)
    assert n == 4 + k * 4 + k * 4  # count + uint32 indices + float32 values
    kept = y != 0
    assert kept.sum() == k
    assert np.array_equal(y[kept], x[kept])
    assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()


def test_integer_tensors_pass_raw():
    y = np.arange(10, dtype=np.int64)
    for name in ["fp16", "int8", "topk:0.1", "zstd", "lz4"]:
        c = parse_codec(name)
        assert not c.applies_to(y.dtype)
        assert np.array_equal(c.decode(c.encode(y), y.shape, "int64"), y)


def test_parse_errors():
    with pytest.raises(
        InputError,
        match=re.escape(
            "Codec: unknown codec 'gzip'; use one of none, fp16, int8, topk:FRAC, zstd, lz4"
        ),
    ):
        parse_codec("gzip")
    with pytest.raises(
        InputError,
        match=re.escape("Codec: topk needs a fraction in (0, 1], got 'topk:2'; e.g. topk:0.1"),
    ):
        parse_codec("topk:2")
    with pytest.raises(InputError, match=re.escape("Codec: zstd level must be 1..22")):
        parse_codec("zstd:99")
    with pytest.raises(InputError, match=re.escape("Codec: fp16 takes no option")):
        parse_codec("fp16:3")
    assert parse_codec("topk:0.1").spec == "topk:0.1"
    assert parse_codec("zstd:5").spec == "zstd:5"


def test_corrupt_payloads_raise():
    with pytest.raises(TransportError, match="Codec: topk payload of 8 bytes holds no 5 entries"):
        Codec("topk", 0.5).decode(b"\x05\0\0\0\0\0\0\0", (10,), "float32")
    with pytest.raises(TransportError, match="Codec: zstd payload does not decode"):
        Codec("zstd").decode(b"not zstd", (10,), "float32")
    with pytest.raises(TransportError, match="Codec: lz4 payload does not decode"):
        Codec("lz4").decode(b"not lz4", (10,), "float32")
