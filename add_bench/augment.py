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
# (distributed.rows). Each op's parameters can be drawn first for a whole batch (``draw_*``, from the batch's
# shape) and applied later to slices of it (the ``params`` argument): micro-batches see the draws of one batch.
def rand(x: torch.Tensor, generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    draw = rows(lambda m: torch.rand((m, *shape[1:]), generator=generator, dtype=x.dtype), shape[0])
    return draw.to(x.device)


def randint(x: torch.Tensor, generator: torch.Generator | None, low: int, high: int, n: int) -> torch.Tensor:
    return rows(lambda m: torch.randint(low, high, (m,), generator=generator), n).to(x.device)


def draw_color(shape, generator: torch.Generator | None, dtype: torch.dtype = torch.float32) -> tuple:
    """Brightness, saturation and contrast draws of :func:`color`, each (n, 1, 1, 1)."""
    like = torch.empty((), dtype=dtype)
    return tuple(rand(like, generator, shape[0], 1, 1, 1) for _ in range(3))


def color(x: torch.Tensor, generator: torch.Generator | None = None, params: tuple | None = None) -> torch.Tensor:
    """Random brightness (±0.5), saturation (×[0, 2]; identity for one channel), contrast (×[0.5, 1.5])."""
    brightness, saturation, contrast = (
        p.to(x.device) for p in (params if params is not None else draw_color(x.shape, generator, x.dtype))
    )
    x = x + (brightness - 0.5)
    m = x.mean(1, keepdim=True)
    x = (x - m) * (saturation * 2) + m
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (contrast + 0.5) + m


def shift_sizes(h: int, w: int, ratio: float) -> tuple[int, int]:
    return int(h * ratio + 0.5), int(w * ratio + 0.5)


def draw_translation(shape, generator: torch.Generator | None, dtype=None, ratio: float = 0.125) -> tuple:
    """The vertical and horizontal shifts of :func:`translation`, each (n,)."""
    n, _, h, w = shape
    sh, sw = shift_sizes(h, w, ratio)
    like = torch.empty(())
    return randint(like, generator, -sh, sh + 1, n), randint(like, generator, -sw, sw + 1, n)


def translation(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    ratio: float = 0.125,
    fill: str = "zero",
    params: tuple | None = None,
) -> torch.Tensor:
    """Shift each image by up to ratio·size pixels in each axis; uncovered pixels are 0 (``fill="zero"``,
    DiffAugment's; mid-gray in [-1, 1]) or copies of the nearest edge pixel (``"edge"``)."""
    n, _, h, w = x.shape
    ty, tx = (
        p.to(x.device) for p in (params if params is not None else draw_translation(x.shape, generator, None, ratio))
    )
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


def draw_cutout(shape, generator: torch.Generator | None, dtype=None, ratio: float = 0.5) -> tuple:
    """The top-left corners (rows, columns) of :func:`cutout`'s squares, each (n,); they may lie outside."""
    n, _, h, w = shape
    ch, cw = shift_sizes(h, w, ratio)
    like = torch.empty(())
    cy = randint(like, generator, 0, h + (1 - ch % 2), n) - ch // 2
    return cy, randint(like, generator, 0, w + (1 - cw % 2), n) - cw // 2


def cutout(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    ratio: float = 0.5,
    fill: str = "zero",
    params: tuple | None = None,
) -> torch.Tensor:
    """Set one random square of side ratio·size (clipped at the border) in each image to 0 (``fill="zero"``,
    DiffAugment's) or to the image's border mean (``"edge"``)."""
    n, _, h, w = x.shape
    ch, cw = shift_sizes(h, w, ratio)
    cy, cx = (p.to(x.device) for p in (params if params is not None else draw_cutout(x.shape, generator, None, ratio)))
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


# each op's parameter draw (the ``_edge`` variants draw as their base op)
DRAWS = {
    "color": draw_color,
    "translation": draw_translation,
    "cutout": draw_cutout,
    "translation_edge": draw_translation,
    "cutout_edge": draw_cutout,
}


def policy_names(policy: str) -> list[str]:
    """'color,translation,cutout' → the op names in order; '' → none; unknown names → ConfigError."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    for name in names:
        choose(AUGMENTS, name, "diffaug policy")
    return names


def parse_policy(policy: str) -> list:
    """'color,translation,cutout' → the ops in order; '' → none; unknown names → ConfigError."""
    return [AUGMENTS[name] for name in policy_names(policy)]


def draw_augment(
    policy: str, shape, generator: torch.Generator | None, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, ...]]:
    """Every op's parameters for a batch of images of ``shape`` (N, C, H, W) and ``dtype``, in the order
    :func:`diff_augment` draws them: ``apply_augment(x, policy, draws)`` equals ``diff_augment(x, policy, generator)``."""
    return [DRAWS[name](shape, generator, dtype) for name in policy_names(policy)]


def slice_draws(draws: list[tuple[torch.Tensor, ...]], rows: slice) -> list[tuple[torch.Tensor, ...]]:
    """The draws of the images ``rows`` of the batch (a micro-batch)."""
    return [tuple(p[rows] for p in op) for op in draws]


def apply_augment(x: torch.Tensor, policy: str, draws: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """DiffAugment the images x with parameters drawn beforehand (:func:`draw_augment`, :func:`slice_draws`)."""
    for op, params in zip(parse_policy(policy), draws, strict=True):
        x = op(x, params=params)
    return x.contiguous()


def diff_augment(
    x: torch.Tensor, policy: str = "color,translation,cutout", generator: torch.Generator | None = None
) -> torch.Tensor:
    """DiffAugment the images x (N, C, H, W) in [-1, 1]; deterministic given ``generator``."""
    return apply_augment(x, policy, draw_augment(policy, x.shape, generator, x.dtype))
