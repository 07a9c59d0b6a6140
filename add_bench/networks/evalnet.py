"""The evaluation network: a small Fashion-MNIST classifier whose penultimate features define the
embedded FID and whose class probabilities define the alignment score.

It is trained once on the train split (``python -m add_bench.pretrain evalnet``) and is used by
``add_bench.metrics`` only: no training objective may load it (a test checks the trainer's imports).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from add_bench.data import NUM_CLASSES


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EvalNet(nn.Module):
    """conv(32)@28 → pool → conv(64)@14 → conv(64)@14 → pool → conv(128)@7 → mean-pool → 128-d features → logits."""

    feature_dim = 128

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.trunk = nn.Sequential(
            _block(1, 32), nn.MaxPool2d(2),
            _block(32, 64), _block(64, 64), nn.MaxPool2d(2),
            _block(64, self.feature_dim), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of images in [-1, 1], shape (N, 1, 28, 28)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
