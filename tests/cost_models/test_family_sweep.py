"""cost_models/family_sweep.py: random one-block models per kernel family (training data)."""

import numpy as np
import pytest
from splitc import InputError
from splitc.cost_models.family_sweep import (
    _MAX_FLOPS,
    FAMILY_KINDS,
    _conv_flops,
    _draw,
    family_block,
)


def _largest_flops(kind: str, cfg: dict) -> float:
    """The forward FLOPs of the block's largest conv or matmul, from its configuration."""
    if kind in ("conv", "pool"):
        o = (cfg["hw"] + cfg["s"] - 1) // cfg["s"]
        second = _conv_flops(cfg["n"], cfg["cout"], cfg["cout"], o, 3, 1) if cfg["second"] else 0
        return max(_conv_flops(cfg["n"], cfg["cin"], cfg["cout"], cfg["hw"], cfg["k"], cfg["s"]),
                   second)
    if kind == "dwconv":
        return _conv_flops(cfg["n"], cfg["ch"], cfg["ch"] * cfg["e"], cfg["hw"], 1, 1)
    if kind == "dense":
        rows = cfg["b"] * (cfg["seq"] or 1)
        return max(2.0 * rows * a * b for a, b in zip(cfg["dims"], cfg["dims"][1:]))
    return 2.0 * cfg["b"] * cfg["s"] * cfg["d"] ** 2 * cfg["r"]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_draws_are_seeded_and_capped(kind):
    draws = [_draw(kind, np.random.default_rng([0, i, 2])) for i in range(40)]
    assert draws == [_draw(kind, np.random.default_rng([0, i, 2])) for i in range(40)]
    assert all(_largest_flops(kind, c) <= _MAX_FLOPS for c in draws)
    # a grid, not one shape: the 40 draws differ
    assert len({repr(sorted(c.items())) for c in draws}) >= 30


def test_conv_flops_exact():
    # 2 x n x cout x out_h x out_w x cin x k x k: 2 x 2 x 8 x 4 x 4 x 3 x 3 x 3 (8x8 stride 2)
    assert _conv_flops(2, 3, 8, 8, 3, 2) == 2 * 2 * 8 * 16 * 27
    # depthwise: groups = channels, one input channel per output
    assert _conv_flops(1, 16, 16, 4, 3, 1, groups=16) == 2 * 16 * 16 * 9


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_blocks_train_like_classifiers(kind):
    torch = pytest.importorskip("torch")
    for i in range(3):
        model, shape, bn, _ = family_block(kind, np.random.default_rng([0, i, 2]))
        y = model(torch.randn(*shape))
        assert tuple(y.shape) == (shape[0], 10)
        y.sum().backward()  # every block has gradients for its weights (a training step)
        assert all(p.grad is not None for p in model.parameters())
        assert bn == any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_family_is_refused():
    with pytest.raises(InputError, match=r"^Calibrate: unknown family block 'lstm'; use one "
                       r"of conv, dense, dwconv, attention, pool$"):
        _draw("lstm", np.random.default_rng(0))
