"""Make the bundled demo model: a small CNN for scikit-learn's 8x8 digits, as ONNX.

``splitc demo`` compiles and split-trains this model. The file is committed
(``tools/models/demo_cnn.onnx``) so the demo needs no PyTorch; this script re-creates it
bit for bit (fixed seed, fixed exporter settings)::

    python -m splitc.tools.make_demo_model -o tools/models/demo_cnn.onnx

Architecture (batch dim symbolic, "N"):
  x[N,1,8,8] -> conv3x3(16) -> relu -> conv3x3(32) -> relu -> maxpool2 -> [N,32,4,4]
  -> flatten [N,512] -> linear(64) -> relu -> linear(10) -> logits[N,10]
Parameters: 160 + 4,640 + 32,832 + 650 = 38,282 floats (153 KB).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "models" / "demo_cnn.onnx"


def build_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def export(path: Path) -> Path:
    import torch

    model = build_model().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"],
        output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        opset_version=17, dynamo=False, do_constant_folding=False,
    )
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    print(export(ap.parse_args(argv).output))


if __name__ == "__main__":
    main()
