"""cost_models/family_sweep.py: random one-block models per kernel family (training data)."""

import itertools

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
        stem = _conv_flops(cfg["n"], cfg["cin"], cfg["cin"], cfg["hw"], 1, 1)
        return max(_conv_flops(cfg["n"], cfg["cin"], cfg["cout"], cfg["hw"], cfg["k"], cfg["s"]),
                   second, stem)
    if kind == "dwconv":
        return _conv_flops(cfg["n"], cfg["ch"], cfg["ch"] * cfg["e"], cfg["hw"], 1, 1)
    if kind == "dense":
        rows = cfg["b"] * (cfg["seq"] or 1)
        dims = [cfg["dims"][0], *cfg["dims"]]  # the stem: width to width
        return max(2.0 * rows * a * b for a, b in itertools.pairwise(dims))
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


@pytest.mark.parametrize("kind", ["conv", "dense", "dwconv", "pool"])
def test_first_layer_gets_a_data_gradient(kind):
    # the stem makes the block's first conv / linear read a tensor with a gradient, so the
    # compiled step runs that layer's data gradient (with the stem's ReLU / ReLU6 mask)
    torch = pytest.importorskip("torch")
    model, shape, _, cfg = family_block(kind, np.random.default_rng([0, 0, 2]))
    first = {"conv": lambda m: m.c1[0], "pool": lambda m: m.c1[0], "dwconv": lambda m: m.f[0],
             "dense": lambda m: m.fc[0]}[kind](model)
    seen = []
    first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    model(torch.randn(*shape))
    assert seen[0].requires_grad and seen[0].grad_fn is not None
    assert type(model.stem[1]).__name__ == {"relu": "ReLU", "relu6": "ReLU6"}[cfg["stem"]]


def test_unknown_family_is_refused():
    with pytest.raises(InputError, match=r"^Calibrate: unknown family block 'lstm'; use one "
                       r"of conv, dense, dwconv, attention, pool$"):
        _draw("lstm", np.random.default_rng(0))


def test_dwconv_blocks_draw_bias_free_convs():
    # MobileNetV2's convs have no bias (batch norm follows): the sweep draws both kinds, and
    # all three convs of a block follow its draw
    torch = pytest.importorskip("torch")
    draws = [_draw("dwconv", np.random.default_rng([0, i, 2])) for i in range(20)]
    assert {c["bias"] for c in draws} == {True, False}
    for i in range(4):
        model, _, _, cfg = family_block("dwconv", np.random.default_rng([0, i, 2]))
        convs = [m for m in model.f if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 3 and all((m.bias is not None) == cfg["bias"] for m in convs)


def test_family_models_only_exports_the_kinds_asked(tmp_path):
    pytest.importorskip("torch")
    from splitc.cost_models.family_sweep import PREFIX, family_models

    paths = family_models(tmp_path, 10, only=("pool",))
    # blocks 4 and 9 are the pool ones (FAMILY_KINDS in turn); nothing else is exported
    assert [p.name for p in paths] == [f"{PREFIX}0_004_pool.onnx", f"{PREFIX}0_009_pool.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]


@pytest.mark.parametrize("kind", ["conv", "pool"])
def test_flatten_heads_read_the_whole_feature_map(kind):
    # a third of the conv and pool blocks flatten into the head (wide_cnn's 64 x 16 x 16 ->
    # 10), capped at _MAX_FLAT inputs; the others mean-pool into a head of cout inputs
    torch = pytest.importorskip("torch")
    from splitc.cost_models.family_sweep import _MAX_FLAT

    heads = []
    for i in range(30):
        model, shape, _, cfg = family_block(kind, np.random.default_rng([0, i, 2]))
        heads.append(cfg["head"])
        if cfg["head"] == "flatten" or i < 3:
            seen = []
            model.head.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(inp[0]))
            y = model(torch.randn(*shape))
            assert tuple(y.shape) == (shape[0], 10)
            want = seen[0].shape[1] if cfg["head"] == "flatten" else cfg["cout"]
            assert model.head.in_features == want <= _MAX_FLAT
    assert set(heads) == {"mean", "flatten"}
