"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

Applied to the discriminator's inputs, real x0 and student samples x̂θ alike (each call draws fresh
per-sample parameters from the same distribution). Every op is differentiable in the images, so the
generator loss back-propagates through it. Images are in model range [-1, 1], any channel count.
"""

from __future__ import annotations

import functools

import torch

from add_bench.config import choose
from add_bench.distributed import rows


# draws come from a CPU generator and move to the images' device (the same augmentations everywhere); one
# row per image: in a training step over several processes, this process's rows of the global batch's draw
def rand(x: torch.Tensor, generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    draw = rows(lambda m: torch.rand((m, *shape[1:]), generator=generator, dtype=x.dtype), shape[0])
    return draw.to(x.device)


def randint(x: torch.Tensor, generator: torch.Generator | None, low: int, high: int, n: int) -> torch.Tensor:
    return rows(lambda m: torch.randint(low, high, (m,), generator=generator), n).to(x.device)


def color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness (±0.5), saturation (×[0, 2]; identity for one channel), contrast (×[0.5, 1.5])."""
    n = x.shape[0]
    x = x + (rand(x, generator, n, 1, 1, 1) - 0.5)
    m = x.mean(1, keepdim=True)
    x = (x - m) * (rand(x, generator, n, 1, 1, 1) * 2) + m
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (rand(x, generator, n, 1, 1, 1) + 0.5) + m


def translation(
    x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = 0.125, fill: str = "zero"
) -> torch.Tensor:
    """Shift each image by up to ratio·size pixels in each axis; uncovered pixels are 0 (``fill="zero"``,
    DiffAugment's; mid-gray in [-1, 1]) or copies of the nearest edge pixel (``"edge"``)."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty, tx = randint(x, generator, -sh, sh + 1, n), randint(x, generator, -sw, sw + 1, n)
    rows = torch.arange(h, device=x.device)[None] + ty[:, None]  # source row of each output row, (n, h)
    cols = torch.arange(w, device=x.device)[None] + tx[:, None]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = x[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return out if fill == "edge" else out * valid[:, None].to(x.dtype)


def border_mean(x: torch.Tensor) -> torch.Tensor:
    """Each image's mean over its outermost pixels, per channel (N, C, 1, 1): its background on Fashion-MNIST."""
    edge = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    return edge.mean(2)[:, :, None, None]


def cutout(
    x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = 0.5, fill: str = "zero"
) -> torch.Tensor:
    """Set one random square of side ratio·size (clipped at the border) in each image to 0 (``fill="zero"``,
    DiffAugment's) or to the image's border mean (``"edge"``)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = randint(x, generator, 0, h + (1 - ch % 2), n) - ch // 2  # top-left corner, may lie outside
    cx = randint(x, generator, 0, w + (1 - cw % 2), n) - cw // 2
    r = torch.arange(h, device=x.device)[None] - cy[:, None]
    c = torch.arange(w, device=x.device)[None] - cx[:, None]
    hole = ((r >= 0) & (r < ch))[:, :, None] & ((c >= 0) & (c < cw))[:, None, :]
    keep = (~hole)[:, None].to(x.dtype)
    return x * keep if fill == "zero" else x * keep + border_mean(x) * (1 - keep)


# The policy's named ops. DiffAugment fills with 0, mid-gray in [-1, 1]; the ``_edge`` variants fill with
# the image's own edge (Fashion-MNIST: its black background, after the color op's shift).
AUGMENTS = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
    "translation_edge": functools.partial(translation, fill="edge"),
    "cutout_edge": functools.partial(cutout, fill="edge"),
}


def parse_policy(policy: str) -> list:
    """'color,translation,cutout' → the ops in order; '' → none; unknown names → ConfigError."""
    return [choose(AUGMENTS, p.strip(), "diffaug policy") for p in policy.split(",") if p.strip()]


def diff_augment(
    x: torch.Tensor, policy: str = "color,translation,cutout", generator: torch.Generator | None = None
) -> torch.Tensor:
    """DiffAugment the images x (N, C, H, W) in [-1, 1]; deterministic given ``generator``."""
    for op in parse_policy(policy):
        x = op(x, generator)
    return x.contiguous()
