"""The discriminator D_φ: StyleGAN-T-style trainable heads on the frozen feature network's tokens.

One head per feature level k: D_φ,k(F_k(x)) gives a logit per token, (N, L). Conditioning is by
projection (Miyato & Koyama 2018): c → cmap (64 dims), logit = Σ_c out·cmap / √64, where c is the
concatenation of the enabled ones among c_text (text embedding of the prompt) and c_img (CLS embedding
of x0) — Table 1b switches them on and off.

The heads never detach their inputs: the R1 penalty is taken with respect to each head's input
features F_k(x0), and the generator loss flows back through them into F and the student.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from add_bench.errors import ConfigError


class SpectralConv1d(nn.Conv1d):
    """Conv1d whose weight (as an out × in·k matrix) is divided by its largest singular value,
    estimated by one power iteration per training forward (Miyato et al. 2018)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        spectral_norm(self, n_power_iterations=1, eps=1e-12)


class BatchNormLocal(nn.Module):
    """Batch norm over "virtual batches": statistics per group of ``virtual_bs`` consecutive samples,
    over the samples and the token axis, in training and evaluation alike (no running averages)."""

    def __init__(self, num_features: int, virtual_bs: int = 8, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((0, 2), keepdim=True)
        var = x.var((0, 2), keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, L)
        n, c, length = x.shape
        if n % self.virtual_bs == 0:  # all groups full: one batched pass over (groups, vbs, C, L)
            g = x.reshape(n // self.virtual_bs, self.virtual_bs, c, length)
            mean = g.mean((1, 3), keepdim=True)
            var = g.var((1, 3), keepdim=True, unbiased=False)
            x = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(n, c, length)
        else:  # a last, smaller group
            x = torch.cat([self.normalize(g) for g in x.split(self.virtual_bs)])
        if self.weight is not None:
            x = x * self.weight[:, None] + self.bias[:, None]
        return x


def block(channels: int, kernel_size: int) -> nn.Sequential:
    """SpectralConv1d (circular padding) → BatchNormLocal → LeakyReLU(0.2)."""
    return nn.Sequential(
        SpectralConv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        BatchNormLocal(channels),
        nn.LeakyReLU(0.2),
    )


class Residual(nn.Module):
    """(f(x) + x) / √2."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class MinibatchStd(nn.Module):
    """StyleGAN's minibatch standard deviation: over each group of ``group`` samples (strided, as in
    StyleGAN), the std of every feature, averaged over features and tokens, appended as one more channel.
    A batch whose size ``group`` does not divide is one group."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, L) → (N, C + 1, L)
        n, c, length = x.shape
        g = self.group if n % self.group == 0 else n
        std = x.reshape(g, n // g, c, length).var(0, unbiased=False).add(1e-8).sqrt().mean((1, 2))  # (N/g,)
        return torch.cat([x, std.repeat(g)[:, None, None].expand(n, 1, length)], dim=1)


class DiscHead(nn.Module):
    """D_φ,k: block(kernel 1) → residual block(kernel 9) → [minibatch std] → 1×1 conv; projection-conditioned
    if c_dim > 0."""

    def __init__(self, channels: int, c_dim: int = 0, cmap_dim: int = 64, minibatch_std: int = 0):
        super().__init__()
        self.c_dim, self.cmap_dim = c_dim, cmap_dim
        layers = [block(channels, 1), Residual(block(channels, 9))]
        if minibatch_std:
            layers.append(MinibatchStd(minibatch_std))
        self.main = nn.Sequential(*layers)
        self.out = SpectralConv1d(channels + bool(minibatch_std), cmap_dim if c_dim > 0 else 1, kernel_size=1)
        self.cmapper = nn.Linear(c_dim, cmap_dim) if c_dim > 0 else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Features (N, D, L), conditioning (N, c_dim) → per-token logits (N, L)."""
        out = self.out(self.main(x))
        if self.cmapper is None:
            return out[:, 0]
        cmap = self.cmapper(c)[:, :, None]
        return (out * cmap).sum(1) / math.sqrt(self.cmap_dim)


class Discriminator(nn.Module):
    """D_φ: one ``DiscHead`` per feature level of the feature network (dims = its channel counts)."""

    def __init__(
        self,
        dims: Sequence[int],
        c_text_dim: int = 0,
        c_img_dim: int = 0,
        use_c_text: bool = True,
        use_c_img: bool = True,
        cmap_dim: int = 64,
        minibatch_std: int = 0,
    ):
        super().__init__()
        self.use_c_text, self.use_c_img = use_c_text, use_c_img
        self.c_dim = c_text_dim * use_c_text + c_img_dim * use_c_img
        if (use_c_text and c_text_dim <= 0) or (use_c_img and c_img_dim <= 0):
            raise ConfigError(
                f"discriminator: c_text_dim={c_text_dim}, c_img_dim={c_img_dim}: an enabled "
                f"conditioning (use_c_text={use_c_text}, use_c_img={use_c_img}) needs a positive dim"
            )
        self.heads = nn.ModuleList(DiscHead(d, self.c_dim, cmap_dim, minibatch_std) for d in dims)

    def condition(self, c_text: torch.Tensor | None, c_img: torch.Tensor | None) -> torch.Tensor | None:
        """The conditioning vector: concatenation of the enabled ones among c_text, c_img."""
        parts = []
        for use, c, name in ((self.use_c_text, c_text, "c_text"), (self.use_c_img, c_img, "c_img")):
            if use:
                if c is None:
                    raise ValueError(f"discriminator built with use_{name}=True but {name} is None")
                parts.append(c)
        return torch.cat(parts, dim=1) if parts else None

    def forward(
        self, features: Sequence[torch.Tensor], c_text: torch.Tensor | None = None, c_img: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """[F_k(x)] (N, D_k, L) → [D_φ,k(F_k(x))] (N, L), one logit map per head."""
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads, got {len(features)} feature tensors")
        c = self.condition(c_text, c_img)
        return [head(f, c) for head, f in zip(self.heads, features)]
