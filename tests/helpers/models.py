"""Real models exported from PyTorch to ONNX for the tests.

Every builder makes a model with a fixed seed and exports it with the legacy TorchScript
exporter (``dynamo=False``, opset 17): it is deterministic, needs no onnxscript rewriting and
takes ~1 s for the small models and ~5-15 s for the full ones on one core. Models with batch
norm are exported with ``training=TrainingMode.TRAINING, do_constant_folding=False``: the
Relax import then holds ``R.nn.batch_norm(..., training=True)`` with gamma, beta and the
running statistics as function parameters, which is what split training needs.

Exports are cached on disk (``$SPLITC_TEST_MODEL_CACHE`` or ``~/.cache/splitc/test-models``)
under a key made of the model name, the export settings, this file's code (its syntax tree
without the module docstring: comments and docs do not count) and the torch version, so a
change to a builder re-exports and an unchanged one costs nothing (the full set takes ~70 s
to export on 2 cores).

Models (``MODELS``):
- ``tiny_cnn``: conv-bn-relu, residual conv, global mean, linear. x[2,3,8,8] -> [2,10]
- ``mbv2_block``: one MobileNetV2 inverted residual (expand 1x1, depthwise 3x3, project 1x1,
  ReLU6, skip). x[2,16,8,8] -> [2,16,8,8]
- ``tiny_transformer``: one pre-LN encoder block (multi-head attention, layer norm, GELU MLP)
  + mean pool + linear head. x[2,8,32] -> [2,10]
- ``resnet50`` (25.6 M params), ``mobilenet_v2`` (3.5 M): hand-written (no torchvision here),
  x[1,3,224,224] -> [1,1000]
- ``vit`` (ViT-Base/16 config, 86 M), ``bert`` (bert-base, 110 M, input_ids +
  attention_mask [1,32]), ``gpt2`` (124 M, input_ids + attention_mask [1,32], tied wte /
  lm_head), from transformers configs with random weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["MODELS", "cache_dir", "export_model", "model_path"]

OPSET = 17


# -- small models -----------------------------------------------------------------------------
def _tiny_cnn():
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = y + self.conv2(y)
            return self.fc(y.mean((2, 3)))

    return TinyCNN(), {"x": (2, 3, 8, 8)}, True


class _InvertedResidual:  # namespace for the torch module, built lazily (torch import is slow)
    @staticmethod
    def make(inp: int, out: int, stride: int, expand: int):
        from torch import nn

        class InvertedResidual(nn.Module):
            def __init__(self):
                super().__init__()
                hidden = inp * expand
                layers = []
                if expand != 1:
                    layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                               nn.ReLU6()]
                layers += [
                    nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                    nn.BatchNorm2d(hidden), nn.ReLU6(),
                    nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out),
                ]
                self.conv = nn.Sequential(*layers)
                self.skip = stride == 1 and inp == out

            def forward(self, x):
                return x + self.conv(x) if self.skip else self.conv(x)

        return InvertedResidual()


def _mbv2_block():
    return _InvertedResidual.make(16, 16, 1, 6), {"x": (2, 16, 8, 8)}, True


def _tiny_transformer():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=32, heads=4):
            super().__init__()
            self.heads = heads
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 4 * d)
            self.fc2 = nn.Linear(4 * d, d)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            b, s, d = x.shape
            h = self.heads
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q = q.reshape(b, s, h, d // h).transpose(1, 2)
            k = k.reshape(b, s, h, d // h).transpose(1, 2)
            v = v.reshape(b, s, h, d // h).transpose(1, 2)
            att = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, s, d)
            x = x + self.proj(y)
            x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
            return self.head(x.mean(1))

    return Block(), {"x": (2, 8, 32)}, False


# -- full CNNs --------------------------------------------------------------------------------
def _resnet50():
    from splitc.tools.bench_models import resnet50

    return resnet50(), {"x": (1, 3, 224, 224)}, True


def _mobilenet_v2():
    from torch import nn

    def cbr(i, o, k, s):
        return [nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU6()]

    layers = cbr(3, 32, 3, 2)
    inp = 32
    # (expansion t, channels c, repeats n, stride s) from Sandler et al. 2018, Table 2.
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(_InvertedResidual.make(inp, c, s if i == 0 else 1, t))
            inp = c
    layers += cbr(inp, 1280, 1, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000)]
    return nn.Sequential(*layers), {"x": (1, 3, 224, 224)}, True


# -- transformers -----------------------------------------------------------------------------
class _Logits:
    @staticmethod
    def wrap(model, names):
        from torch import nn

        class Logits(nn.Module):  # by keyword: GPT-2's second positional is past_key_values
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return self.model(**dict(zip(names, args)), return_dict=False)[0]

        return Logits()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(num_labels=10, attn_implementation="eager")
    model = _Logits.wrap(ViTForImageClassification(cfg), ["pixel_values"])
    return model, {"pixel_values": (1, 3, 224, 224)}, False


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_labels=2, attn_implementation="eager")
    shapes = {"input_ids": (1, 32), "attention_mask": (1, 32)}
    return _Logits.wrap(BertForSequenceClassification(cfg), list(shapes)), shapes, False


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(use_cache=False, attn_implementation="eager")
    # An explicit attention mask: without one, transformers 5 probes for packed sequences with
    # aten::diff, which has no ONNX export.
    shapes = {"input_ids": (1, 32), "attention_mask": (1, 32)}
    return _Logits.wrap(GPT2LMHeadModel(cfg), list(shapes)), shapes, False


# name -> builder returning (module, {input name: shape}, has batch norm)
MODELS = {
    "tiny_cnn": _tiny_cnn,
    "mbv2_block": _mbv2_block,
    "tiny_transformer": _tiny_transformer,
    "resnet50": _resnet50,
    "mobilenet_v2": _mobilenet_v2,
    "vit": _vit,
    "bert": _bert,
    "gpt2": _gpt2,
}
# integer inputs (token ids, masks); everything else is float32
_INT_INPUTS = {"input_ids", "attention_mask"}


def cache_dir() -> Path:
    d = os.environ.get("SPLITC_TEST_MODEL_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "splitc" / "test-models"


def _key(name: str) -> str:
    import ast

    import torch

    h = hashlib.sha256()
    # this file and the builders it borrows from tools/ (ResNet-50), docstrings left out
    for src in (Path(__file__), Path(__file__).parents[2] / "tools" / "bench_models.py"):
        tree = ast.parse(src.read_text())
        tree.body = tree.body[1:]  # the module docstring
        h.update(ast.dump(tree).encode())
    h.update(f"{name}|{torch.__version__}|{OPSET}".encode())
    return h.hexdigest()[:12]


def model_path(name: str, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"{name}-{_key(name)}.onnx"


def _distinct_values(model) -> None:
    """Perturb every weight and BN statistic so that no two initializers are equal.

    The TorchScript exporter merges initializers with identical values: with fresh inits
    every LayerNorm weight (all ones) and bias (all zeros) of GPT-2 became one shared
    initializer, i.e. fake tied weights. Tied parameters (GPT-2's wte / lm_head) are one
    ``nn.Parameter`` and stay tied.
    """
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.02 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.add_(0.1 * torch.rand(b.shape, generator=gen))


def export_model(name: str, directory: Path | None = None) -> Path:
    """Export ``MODELS[name]`` to ONNX (once; later calls return the cached file)."""
    import torch

    path = model_path(name, directory)
    if path.exists():
        return path
    torch.manual_seed(0)
    model, shapes, has_bn = MODELS[name]()
    model.train(has_bn)  # BN models in training mode; transformers in eval (no dropout)
    _distinct_values(model)
    gen = torch.Generator().manual_seed(0)
    args = []
    for inp, shape in shapes.items():
        if inp == "attention_mask":
            args.append(torch.ones(shape, dtype=torch.int64))
        elif inp in _INT_INPUTS:
            args.append(torch.randint(0, 1000, shape, generator=gen))
        else:
            args.append(torch.randn(shape, generator=gen))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    kw = {}
    if has_bn:
        kw = {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False}
    else:
        kw = {"do_constant_folding": False}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(args), str(tmp), input_names=list(shapes),
                          output_names=["logits"], opset_version=OPSET, dynamo=False, **kw)
    os.replace(tmp, path)  # atomic: parallel test workers never see a half-written file
    for old in path.parent.glob(f"{name}-*.onnx"):  # exports of older builder versions
        if old != path:
            old.unlink(missing_ok=True)
    return path
