"""The evaluation networks: small Fashion-MNIST networks that define the embedded metrics.

* ``EvalNet``: a classifier. Its 128-d penultimate features define the embedded FID, its class
  probabilities the alignment score (``python -m add_bench.pretrain evalnet``).
* ``EmbedNet``: a self-supervised embedding (SimCLR-style instance discrimination on the train split,
  ``python -m add_bench.pretrain evalnet_ssl``). Instance discrimination keeps what tells two images of
  one class apart, which a classifier's features discard; its features define the diversity-aware
  metrics (precision/recall, density/coverage, per-class FID).

Both are used by ``add_bench.metrics`` only: no training objective may load them (a test checks the
trainer's imports), and neither is a discriminator feature network.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from add_bench.data import NUM_CLASSES


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class EvalNet(nn.Module):
    """conv(32)@28 → pool → conv(64)@14 → conv(64)@14 → pool → conv(128)@7 → mean-pool → 128-d features → logits."""

    feature_dim = 128

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.trunk = nn.Sequential(
            _block(1, 32),
            nn.MaxPool2d(2),
            _block(32, 64),
            _block(64, 64),
            nn.MaxPool2d(2),
            _block(64, self.feature_dim),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of images in [-1, 1], shape (N, 1, 28, 28)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class EmbedNet(nn.Module):
    """conv(24)@28 → conv(48, stride 2)@14 → conv(48)@14 → conv(96, stride 2)@7 → flatten → 64-d features.

    The features keep the 7×7 layout (flattened, not pooled), so where a part of the garment sits still
    counts. ``projection`` (64 → 64) serves the contrastive loss only; metrics use ``features``."""

    feature_dim = 64

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            _block(1, w),
            _block(w, 2 * w, 2),
            _block(2 * w, 2 * w),
            _block(2 * w, 4 * w, 2),
            nn.Flatten(),
            nn.Linear(4 * w * 7 * 7, self.feature_dim),
        )
        self.projection = nn.Sequential(nn.ReLU(), nn.Linear(self.feature_dim, self.feature_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding (N, 64) of images in [-1, 1], shape (N, 1, 28, 28)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm projection for the contrastive loss."""
        return F.normalize(self.projection(self.trunk(x)), dim=1)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """For inference: each Conv2d → BatchNorm2d pair of the network's blocks merged into one Conv2d (the
    same function up to float rounding, one pass fewer over the activations)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for block in net.modules():
        if (
            isinstance(block, nn.Sequential)
            and len(block) == 3
            and isinstance(block[0], nn.Conv2d)
            and isinstance(block[1], nn.BatchNorm2d)
        ):
            block[0] = fuse_conv_bn_eval(block[0].eval(), block[1].eval())
            block[1] = nn.Identity()
    return net
