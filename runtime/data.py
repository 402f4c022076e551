"""Deterministic data for the device agent: seeded shuffling and a resumable cursor.

Batch ``i`` (0-based, counted over all epochs) is a pure function of ``(seed, i)``: epoch
``i // batches_per_epoch`` uses the permutation ``default_rng((seed, epoch))``. A resumed run
therefore only needs the step number to pick up exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from splitc import InputError

__all__ = ["DataLoader", "load_digits_split"]


@dataclass
class DataLoader:
    """Mini-batches over numpy arrays ``x`` (inputs) and ``y`` (labels), same first dimension.

    ``drop_last=True`` by default: compiled halves have a static batch dimension.
    """

    x: np.ndarray
    y: np.ndarray
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise InputError(f"DataLoader: {len(self.x)} inputs but {len(self.y)} labels")
        if self.batch_size <= 0 or self.batch_size > len(self.x):
            raise InputError(
                f"DataLoader: batch size {self.batch_size} must be in 1..{len(self.x)} samples"
            )
        self._perm_epoch, self._perm = -1, None

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.x)
            self._perm = (
                np.random.default_rng((self.seed, epoch)).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._perm_epoch = epoch
        return self._perm

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``i`` counted from the start of epoch 0."""
        epoch, j = divmod(i, self.batches_per_epoch)
        idx = self._order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return np.ascontiguousarray(self.x[idx]), np.ascontiguousarray(self.y[idx])

    def __iter__(self):
        for i in range(self.batches_per_epoch):
            yield self.batch(i)


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes; no download).

    Returns ``(x_train, y_train, x_test, y_test)``: x float32 of shape (N, 1, 8, 8) scaled to
    [0, 1] (pixel values are 0..16), y int64; the split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return xtr, ytr, xte, yte
