"""The PyTorch models of ``tools/bench_vs_pytorch.py``: builders by name (torch imports lazily).

``build_model(name)`` -> (torch module, input shape, classes) for a name of ``MODEL_NAMES``:
a small CIFAR ResNet, a 2-layer encoder, torchvision's ResNet-50 layout and one GPT-2 block
(batch 8 or 32). ``bench_vs_pytorch`` re-exports these names.
"""

from __future__ import annotations

import click

# name -> (builder, input shape, classes); builders are below (torch imports lazily).
MODEL_NAMES = (
    "small_resnet",
    "encoder",
    "resnet50_b8",
    "resnet50_b32",
    "gpt2_block_b8",
    "gpt2_block_b32",
)


def _small_resnet():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.sc = None
            if cin != cout or stride != 1:
                self.sc = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(y + (x if self.sc is None else self.sc(x)))

    class SmallResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
            )
            self.blocks = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return SmallResNet()


def _layer(d: int, heads: int):
    import torch
    from torch import nn

    class Layer(nn.Module):
        """Pre-norm transformer layer (GPT-2's block without the causal mask)."""

        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    return Layer()


def _encoder(d: int, heads: int, layers: int):
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[_layer(d, heads) for _ in range(layers)])
            self.fc = nn.Linear(d, 10)

        def forward(self, x):
            return self.fc(self.layers(x).mean(1))

    return Encoder()


def resnet50():
    """torchvision's ResNet-50 layout (bottlenecks 3-4-6-3), 1000 classes (also the test
    suite's ResNet-50, tests/helpers/models.py)."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inp, width, stride):
            super().__init__()
            out = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(inp, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, out, 1, bias=False),
                nn.BatchNorm2d(out),
            )
            self.down = None
            if stride != 1 or inp != out:
                self.down = nn.Sequential(
                    nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                )
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    inp = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(inp, width, stride if i == 0 else 1))
            inp = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def build_model(name: str, image: int = 224):
    """(torch module, input shape, classes) for a name of ``MODEL_NAMES``."""
    if name == "small_resnet":
        return _small_resnet(), (32, 3, 32, 32), 10
    if name == "encoder":
        return _encoder(256, 4, 2), (16, 64, 256), 10
    if name.startswith("resnet50_b"):
        return resnet50(), (int(name.rsplit("_b", 1)[1]), 3, image, image), 1000
    if name.startswith("gpt2_block_b"):
        return _encoder(768, 12, 1), (int(name.rsplit("_b", 1)[1]), 64, 768), 10
    raise click.BadParameter(f"unknown model {name!r}; one of {', '.join(MODEL_NAMES)}")
