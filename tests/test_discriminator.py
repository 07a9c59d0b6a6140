"""Discriminator heads (spectral norm, local batch norm, residual, projection conditioning, R1 on the
head inputs) and DiffAugment (identity, reproducible, differentiable, the shifts it claims)."""

import math

import pytest
import torch

from add_bench.augment import AUGMENTS, cutout, diff_augment, translation
from add_bench.errors import ConfigError
from add_bench.networks.discriminator import BatchNormLocal, DiscHead, Discriminator, Residual, SpectralConv1d, block


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [16, 12])  # 12: a last group of 4
def test_batchnorm_local_uses_statistics_of_each_group_of_8(n):
    bn = BatchNormLocal(5, virtual_bs=8)
    with torch.no_grad():
        bn.weight.copy_(randn(5, seed=1))
        bn.bias.copy_(randn(5, seed=2))
    x = randn(n, 5, 7) * 3 + 2
    expected = []
    for g in (x[:8], x[8:]):
        mean = g.mean(dim=(0, 2), keepdim=True)
        var = ((g - mean) ** 2).mean(dim=(0, 2), keepdim=True)
        expected.append((g - mean) / torch.sqrt(var + 1e-5) * bn.weight[:, None] + bn.bias[:, None])
    assert torch.allclose(bn(x), torch.cat(expected), atol=1e-5)
    assert torch.allclose(bn.eval()(x), torch.cat(expected), atol=1e-5)  # no running statistics


def test_spectral_norm_bounds_the_largest_singular_value():
    conv = SpectralConv1d(8, 16, kernel_size=9, padding=4, padding_mode="circular")
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(5)
    raw = torch.linalg.matrix_norm(conv.parametrizations.weight.original.reshape(16, -1), ord=2)
    x = randn(2, 8, 10)
    for _ in range(30):  # one power iteration per training forward
        conv(x)
    sigma = torch.linalg.matrix_norm(conv.weight.reshape(16, -1), ord=2)
    assert raw > 2 and abs(sigma.item() - 1) < 1e-2
    assert conv(x).shape == (2, 16, 10)


def test_head_blocks_and_residual():
    fn = torch.nn.Linear(4, 4)
    x = randn(3, 4)
    assert torch.allclose(Residual(fn)(x), (fn(x) + x) / math.sqrt(2))
    head = DiscHead(32, c_dim=0).eval()
    conv, bn, act = head.main[0]
    assert conv.kernel_size == (1,) and isinstance(bn, BatchNormLocal) and act.negative_slope == 0.2
    res = head.main[1]
    assert isinstance(res, Residual) and res.fn[0].kernel_size == (9,) and res.fn[0].padding_mode == "circular"
    h = randn(8, 32, 49)
    assert torch.allclose(res(h), (res.fn(h) + h) / math.sqrt(2))
    assert head.out.out_channels == 1 and head.cmapper is None
    assert head(h).shape == (8, 49)
    assert block(16, 9)[0].padding == (4,)


def test_projection_conditioning_is_sum_of_out_times_cmap_over_sqrt_64():
    head = DiscHead(32, c_dim=10, cmap_dim=64).eval()  # eval: spectral norm uses its stored estimate
    x, c = randn(8, 32, 49), randn(8, 10, seed=1)
    out = head.out(head.main(x))  # (8, 64, 49)
    cmap = head.cmapper(c)  # (8, 64)
    expected = (out * cmap[:, :, None]).sum(1) / math.sqrt(64)
    assert torch.allclose(head(x, c), expected, atol=1e-5)


@pytest.mark.parametrize(
    "use_text,use_img,c_dim", [(False, False, 0), (True, False, 16), (False, True, 24), (True, True, 40)]
)
def test_conditioning_switches_set_the_cmapper_inputs(use_text, use_img, c_dim):
    d = Discriminator([32, 48], c_text_dim=16, c_img_dim=24, use_c_text=use_text, use_c_img=use_img)
    assert d.c_dim == c_dim
    for head in d.heads:
        assert (head.cmapper is None) if c_dim == 0 else (head.cmapper.in_features == c_dim)
    feats = [randn(8, 32, 49), randn(8, 48, 49, seed=1)]
    c_text, c_img = randn(8, 16, seed=2), randn(8, 24, seed=3)
    logits = d(feats, c_text, c_img)
    assert [t.shape for t in logits] == [(8, 49), (8, 49)]
    if use_img:  # the conditioning matters
        assert not torch.allclose(d.eval()(feats, c_text, c_img)[0], d(feats, c_text, -c_img)[0])
        with pytest.raises(ValueError, match="c_img is None"):
            d(feats, c_text, None)


def test_r1_penalty_on_head_inputs_backpropagates_into_the_heads():
    d = Discriminator([32, 32], c_text_dim=16, c_img_dim=0, use_c_text=True, use_c_img=False)
    feats = [randn(8, 32, 49, seed=i).requires_grad_(True) for i in range(2)]
    c = randn(8, 16, seed=5)
    logits = d(feats, c)
    grads = torch.autograd.grad(sum(l.sum() for l in logits), feats, create_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    r1 = sum(g.square().sum(dim=(1, 2)).mean() for g in grads)
    r1.backward()
    assert all(p.grad is not None for p in d.heads[0].main.parameters())
    with pytest.raises(ConfigError, match="needs a positive dim"):
        Discriminator([32], c_text_dim=0, c_img_dim=8, use_c_text=True, use_c_img=True)


# ------------------------------------------------------------------------------------ DiffAugment
def test_diffaugment_policy_empty_is_identity_and_unknown_fails():
    x = randn(4, 1, 28, 28)
    assert torch.equal(diff_augment(x, ""), x)
    with pytest.raises(
        ConfigError,
        match=r"diffaug policy='flip': unknown; accepted: color, cutout, cutout_edge, translation, translation_edge",
    ):
        diff_augment(x, "color,flip")


@pytest.mark.parametrize("channels", [1, 3])
def test_diffaugment_reproducible_shape_preserving_and_differentiable(channels):
    x = randn(6, channels, 28, 28).clamp(-1, 1).requires_grad_(True)
    a = diff_augment(x, generator=torch.Generator().manual_seed(3))
    b = diff_augment(x, generator=torch.Generator().manual_seed(3))
    c = diff_augment(x, generator=torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    a.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_shifts_each_image_by_at_most_an_eighth():
    x = randn(8, 2, 28, 28)
    out = translation(x, torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))  # 28 · 0.125 = 3.5 → shifts in -4..4, zero fill
    shifts = []
    for i in range(8):
        match = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(out[i], pad[i, :, 4 + dy : 32 + dy, 4 + dx : 32 + dx])
        ]
        assert len(match) == 1
        shifts.append(match[0])
    assert len(set(shifts)) > 1


def test_cutout_zeroes_one_square_of_at_most_half_the_side():
    out = cutout(torch.ones(16, 1, 28, 28), torch.Generator().manual_seed(0))
    for img in out[:, 0]:
        rows, cols = (img == 0).any(1).nonzero(), (img == 0).any(0).nonzero()
        assert 0 < len(rows) <= 14 and 0 < len(cols) <= 14
        assert (img == 0).sum() == len(rows) * len(cols)  # a rectangle (a square clipped at the border)


def test_edge_fills_use_the_image_edge_not_mid_gray():
    """translation_edge repeats the edge pixels where the image moved away; cutout_edge fills its hole with
    the image's border mean (on a black background: black)."""
    x = randn(8, 1, 28, 28)
    zero = translation(x, torch.Generator().manual_seed(0))
    edge = AUGMENTS["translation_edge"](x, torch.Generator().manual_seed(0))  # the same shifts
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")
    for i in range(8):
        match = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(edge[i], pad[i, :, 4 + dy : 32 + dy, 4 + dx : 32 + dx])
        ]
        assert len(match) == 1
    moved = (zero == 0) & (edge != 0)
    assert moved.any()  # somewhere the zero fill and the edge fill differ
    assert torch.equal(edge[~moved], zero[~moved])

    img = -torch.ones(16, 1, 28, 28)
    img[:, :, 10:18, 10:18] = 1.0  # a white square on a black background
    black = AUGMENTS["cutout_edge"](img, torch.Generator().manual_seed(0))
    gray = cutout(img, torch.Generator().manual_seed(0))  # the same holes
    hole = gray == 0
    assert hole.any() and torch.equal(black[hole], -torch.ones(int(hole.sum())))
    assert torch.equal(black[~hole], img[~hole])
    from add_bench.augment import border_mean

    y = randn(3, 2, 5, 6)
    ring = torch.ones(5, 6, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert torch.allclose(border_mean(y)[:, :, 0, 0], y[:, :, ring].mean(-1))
