"""Checkpoints (atomic, hashed, pickle-free) and the deterministic data loader."""

import re

import numpy as np
import pytest
from splitc import InputError
from splitc.runtime import checkpoint
from splitc.runtime.data import DataLoader


def test_save_load_round_trip(tmp_path):
    arrays = {"half/W": np.arange(6, dtype=np.float32).reshape(2, 3), "half/n": np.int64(4)}
    checkpoint.save(tmp_path, 3, arrays, {"cursor": 3})
    checkpoint.save(tmp_path, 7, {"half/W": np.ones(2, np.float32)}, {"cursor": 7})
    assert checkpoint.steps(tmp_path) == [3, 7]
    step, got, meta = checkpoint.load(tmp_path, 3)
    assert step == 3 and meta == {"cursor": 3}
    assert np.array_equal(got["half/W"], arrays["half/W"]) and got["half/n"] == 4
    assert checkpoint.load(tmp_path)[0] == 7  # latest by default
    assert checkpoint.load(tmp_path / "missing") is None
    # No temporary files are left behind after a completed save.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.json",
        "ckpt-00000003.npz",
        "ckpt-00000007.json",
        "ckpt-00000007.npz",
    ]


def test_npz_without_manifest_is_not_a_checkpoint(tmp_path):
    # A crash between the npz rename and the manifest rename leaves an orphan npz: ignored.
    checkpoint.save(tmp_path, 1, {"a": np.zeros(1)}, {})
    (tmp_path / "ckpt-00000002.npz").write_bytes(b"partial")
    assert checkpoint.steps(tmp_path) == [1]


def test_corruption_is_detected(tmp_path):
    checkpoint.save(tmp_path, 5, {"a": np.arange(100.0)}, {})
    p = tmp_path / "ckpt-00000005.npz"
    data = bytearray(p.read_bytes())
    data[-30] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(
        InputError,
        match=re.escape(
            f"Checkpoint: {tmp_path}/ckpt-00000005.npz does not match its manifest hash"
        ),
    ):
        checkpoint.load(tmp_path)


def test_object_arrays_are_refused(tmp_path):
    checkpoint.save(tmp_path, 1, {"a": np.array([{"x": 1}], dtype=object)}, {})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        checkpoint.load(tmp_path)


def test_prune_keeps_from_and_last(tmp_path):
    for s in [0, 3, 6, 9]:
        checkpoint.save(tmp_path, s, {"a": np.zeros(1)}, {})
    checkpoint.prune(tmp_path, keep_from=6)
    assert checkpoint.steps(tmp_path) == [6, 9]
    checkpoint.prune(tmp_path, keep_from=100, keep_last=1)
    assert checkpoint.steps(tmp_path) == [9]


def test_loader_is_a_pure_function_of_seed_and_step():
    x = np.arange(50, dtype=np.float32)[:, None]
    y = np.arange(50)
    a = DataLoader(x, y, batch_size=8, seed=1)
    b = DataLoader(x, y, batch_size=8, seed=1)
    assert a.batches_per_epoch == 6  # 50 // 8, the last 2 samples dropped (static batch)
    seq = [a.batch(i)[1] for i in range(12)]
    # Resuming at batch 9 (epoch 1, batch 3) gives the same batch as the uninterrupted run.
    assert np.array_equal(b.batch(9)[1], seq[9])
    # Each epoch is a permutation: 48 distinct samples, and epochs differ in order.
    assert len(set(np.concatenate(seq[:6]).tolist())) == 48
    assert not np.array_equal(np.concatenate(seq[:6]), np.concatenate(seq[6:]))
    assert np.array_equal(a.batch(0)[0][:, 0], a.batch(0)[1].astype(np.float32))


def test_loader_errors():
    with pytest.raises(InputError, match="DataLoader: 3 inputs but 2 labels"):
        DataLoader(np.zeros((3, 1)), np.zeros(2), 1)
    with pytest.raises(InputError, match=re.escape("DataLoader: batch size 5 must be in 1..3")):
        DataLoader(np.zeros((3, 1)), np.zeros(3), 5)


def test_digits_split(digits):
    xtr, ytr, xte, yte = digits
    # 1797 samples, 25% test: sklearn rounds the test size up to 450, train 1347.
    assert (xtr.shape, xte.shape) == ((1347, 1, 8, 8), (450, 1, 8, 8))
    assert xtr.dtype == np.float32 and ytr.dtype == np.int64
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    assert sorted(set(yte.tolist())) == list(range(10))
