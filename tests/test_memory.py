"""Memory options of an ADD step on the tiny models (add_bench.execution): micro-batch accumulation equals one
batch; bf16 autocast, gradient checkpointing and chunked VAE passes give fp32's losses within tolerance."""

import re

import pytest
import torch
from cluster_assets import save_tiny_open_clip, save_tiny_sd, write_coco
from conftest import tiny_train_overrides
from test_sd_train import sd_cfg

from add_bench import train as train_mod
from add_bench.config import TrainConfig, load
from add_bench.errors import ConfigError

LOSS_KEYS = ("loss_g", "loss_g_adv", "loss_distill", "loss_d", "loss_r1", "d_real", "d_fake")


@pytest.fixture(scope="module")
def sd_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {
        "sd": save_tiny_sd(root / "sd"),
        "coco": write_coco(root / "coco", n_images=8, split="train2017"),
        "clip": save_tiny_open_clip(root / "clip.pt"),
    }


def embedded_cfg(assets, **extra):
    return load(TrainConfig, overrides=tiny_train_overrides(assets, **extra))


def one_step(cfg) -> dict:
    """One ADD step from fixed weights and batch (R1 is due at step 0): the log row, the student's and the heads'
    gradients as left by the step, and the updated weights."""
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    data = train_mod.training_data(cfg, nets)
    gen = torch.Generator().manual_seed(0)
    x0, cond, extra = data.batch(torch.randint(0, len(data), (cfg.batch_size,), generator=gen), gen)
    opt_s, opt_d = train_mod.optimisers(nets, cfg)
    row = train_mod.add_step(nets, cfg, x0, cond, gen, opt_s, opt_d, 0, log_step=True, **extra)
    modules = {"student": nets.student.unet, "discriminator": nets.discriminator}
    return {
        "row": row,
        "grads": {f"{m}.{k}": p.grad.clone() for m, mod in modules.items() for k, p in mod.named_parameters()},
        "weights": {f"{m}.{k}": v.clone() for m, mod in modules.items() for k, v in mod.state_dict().items()},
        "nets": nets,
    }


def assert_same_step(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a["row"].keys() == b["row"].keys()
    for key, value in a["row"].items():
        assert b["row"][key] == pytest.approx(value, rel=rtol, abs=atol), key
    torch.testing.assert_close(b["grads"], a["grads"], rtol=rtol, atol=atol)
    # Adam's first step moves a weight by ≈ ±lr whatever its gradient's size, so a gradient at rounding level
    # (a conv bias right before BatchNormLocal has none: its gradient is noise) may move either way; weights
    # with a gradient of 1e-6 or more must agree, the others move by at most 2·lr.
    for key, before in a["weights"].items():
        after, grad = b["weights"][key], a["grads"].get(key)
        sure = torch.ones_like(before, dtype=torch.bool) if grad is None else grad.abs() >= 1e-6
        torch.testing.assert_close(after[sure], before[sure], rtol=rtol, atol=atol, msg=key)
        assert (after[~sure] - before[~sure]).abs().le(2 * 2e-3 + atol).all(), key


# batch 32: micro-batches of 16 and 8 keep the heads' BatchNormLocal groups of 8, so the step is one batch's
@pytest.fixture(scope="module")
def whole_batch(tiny_assets, sd_assets):
    """The one-batch step at batch 32 of each tiny model, computed once for both micro-batch counts."""
    return {
        "embedded": one_step(embedded_cfg(tiny_assets, batch_size=32)),
        "stable_diffusion": one_step(sd_cfg(sd_assets, batch_size=32)),
    }


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("model", ["embedded", "stable_diffusion"])
def test_micro_batches_equal_one_batch(tiny_assets, sd_assets, whole_batch, model, k):
    make_cfg, assets = (embedded_cfg, tiny_assets) if model == "embedded" else (sd_cfg, sd_assets)
    whole = whole_batch[model]
    parts = one_step(make_cfg(assets, batch_size=32, micro_batch_size=32 // k))
    assert all(k in whole["row"] for k in LOSS_KEYS) and whole["row"]["loss_r1"] > 0
    assert_same_step(whole, parts, rtol=1e-4, atol=1e-6)


def test_extra_discriminator_updates_see_the_same_fresh_fakes_in_micro_batches(tiny_assets):
    """discriminator.steps > 1: the fresh fakes of an extra update, from the same draws, in 4 micro-batches."""
    cfg = embedded_cfg(tiny_assets, batch_size=32)
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    x0, labels = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    whole = train_mod.fresh_fake_features(nets, cfg, x0, labels, torch.Generator().manual_seed(1))
    cfg.micro_batch_size = 8
    parts = train_mod.fresh_fake_features(nets, cfg, x0, labels, torch.Generator().manual_seed(1))
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_and_chunked_vae_give_the_same_step(sd_assets):
    plain = one_step(sd_cfg(sd_assets, batch_size=8))
    low = one_step(sd_cfg(sd_assets, batch_size=8, gradient_checkpointing=True, vae_decode_chunk=3))
    nets = low["nets"]
    assert nets.student.unet.is_gradient_checkpointing and nets.sd.vae.decoder.gradient_checkpointing
    assert_same_step(plain, low, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_on_the_embedded_unet(tiny_assets):
    plain = one_step(embedded_cfg(tiny_assets))
    low = one_step(embedded_cfg(tiny_assets, gradient_checkpointing=True))
    assert low["nets"].student.unet.unet.is_gradient_checkpointing  # the diffusers UNet inside PatchUNet
    assert_same_step(plain, low, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_gives_fp32_losses_within_tolerance(sd_assets):
    fp32 = one_step(sd_cfg(sd_assets, batch_size=8))
    bf16 = one_step(sd_cfg(sd_assets, batch_size=8, precision="bf16"))
    for key in LOSS_KEYS:
        assert bf16["row"][key] == pytest.approx(fp32["row"][key], rel=5e-2, abs=5e-3), key
    # fp32 master weights and gradients; the heads (hinge, R1) run in fp32
    assert all(g.dtype == torch.float32 for g in bf16["grads"].values())
    assert all(w.dtype == torch.float32 for w in bf16["weights"].values())
    assert bf16["row"]["loss_r1"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"micro_batch_size": 3},
            "micro_batch_size=3 does not divide batch_size=8: accepted: 0 (the whole batch) or a divisor of 8 (1, 2, 4)",
        ),
        ({"micro_batch_size": -1}, "micro_batch_size=-1"),
        ({"precision": "fp16"}, "precision='fp16': unknown; accepted: fp32, bf16"),
        ({"vae_decode_chunk": -2}, "vae_decode_chunk=-2"),
    ],
)
def test_execution_keys_are_checked(tiny_assets, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_mod.validate(embedded_cfg(tiny_assets, **overrides))
