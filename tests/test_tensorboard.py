"""TensorBoard events beside log.jsonl: the same numbers, and the EMA student's (or teacher's) samples at
checkpoints."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_methods import pd_cfg
from test_train import cfg_for

from add_bench.pretrain import SAMPLE_STEPS, pretrain_teacher
from add_bench.progressive import train_progressive
from add_bench.train import train


def events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_add_training_writes_scalars_and_sample_grids(tiny_assets, tmp_path):
    import json

    assert train(cfg_for(tiny_assets), tmp_path / "cell", progress=False)
    acc = events(tmp_path / "cell" / "tensorboard")
    rows = [json.loads(r) for r in (tmp_path / "cell" / "log.jsonl").read_text().splitlines()]
    tags = acc.Tags()
    for key in ("loss_g", "loss_d", "d_fake_acc_s999", "grad_norm_student_adv"):
        assert key in tags["scalars"], key
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert [(e.step, round(e.value, 5)) for e in acc.Scalars(key)] == [(s, round(v, 5)) for s, v in logged]
    images = acc.Images("samples/ema_1_step")
    assert [i.step for i in images] == [2, 4]  # ckpt_every = 2, steps = 4
    assert images[0].height == 10 * 28 and images[0].width == 4 * 28


def test_tensorboard_can_be_switched_off(tiny_assets, tmp_path):
    assert train(cfg_for(tiny_assets, tensorboard=False), tmp_path / "cell", progress=False)
    assert not (tmp_path / "cell" / "tensorboard").exists()


@pytest.mark.parametrize("on", [True, False])
def test_progressive_distillation_follows_the_tensorboard_switch(tiny_assets, tmp_path, on):
    cfg = pd_cfg(tiny_assets)  # stages: guided 4 steps (iterations 1-2), halvings to 2 (3-4) and 1 (5-6)
    cfg.tensorboard = on
    assert train_progressive(cfg, tmp_path / "pd", progress=False)
    assert (tmp_path / "pd" / "tensorboard").exists() == on
    if on:
        acc = events(tmp_path / "pd" / "tensorboard")
        assert "loss" in acc.Tags()["scalars"]
        # at each checkpoint (ckpt_every = 1) the current stage's EMA student, DDIM at its step count
        for steps, at in ((4, [1, 2]), (2, [3, 4]), (1, [5, 6])):
            images = acc.Images(f"samples/ema_ddim_{steps}_step")
            assert [i.step for i in images] == at
            assert (images[0].height, images[0].width) == (10 * 28, 4 * 28)


def test_teacher_pretraining_writes_sample_grids_and_follows_the_tensorboard_switch(fake_data, tmp_path):
    """A tiny teacher run (ckpt_every = 3, 4 steps): the EMA teacher's DDIM grid at each checkpoint; with the
    switch off no events, and the same weights (the switch changes how the run is logged, not what it trains)."""
    from safetensors.torch import load_file
    from test_pretrain import tiny_cfg

    for on in (True, False):
        assert pretrain_teacher(tiny_cfg(fake_data, 4, tensorboard=on), tmp_path / f"{on}", tmp_path / f"w{on}")
        assert (tmp_path / f"{on}" / "tensorboard").exists() == on
    images = events(tmp_path / "True" / "tensorboard").Images(f"samples/ema_ddim_{SAMPLE_STEPS}_step")
    assert [i.step for i in images] == [3, 4]
    assert (images[0].height, images[0].width) == (10 * 28, 4 * 28)
    a, b = (load_file(next((tmp_path / w).rglob("*.safetensors"))) for w in ("wTrue", "wFalse"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_network_pretraining_follows_the_tensorboard_switch(fake_data, tmp_path):
    from add_bench.config import EmbedNetPretrainConfig, load
    from add_bench.pretrain import pretrain_evalnet_ssl

    overrides = ["steps=2", "width=4", "batch_size=8", "threads=1", f"data.root={fake_data}", "data.val_size=50"]
    cfg = load(EmbedNetPretrainConfig, overrides=[*overrides, "data.download=false", "tensorboard=false"])
    assert pretrain_evalnet_ssl(cfg, tmp_path / "work", tmp_path / "w")
    assert (tmp_path / "work" / "log.jsonl").is_file() and not (tmp_path / "work" / "tensorboard").exists()


def test_sample_grids_come_from_fixed_noise_and_leave_the_global_generator_alone(tiny_assets):
    from add_bench.diffusion import Denoiser, sample_ddim, sample_grid, schedule_from_card
    from add_bench.networks.unets import load_unet, read_card

    card = read_card(tiny_assets["teacher"])
    teacher = Denoiser(load_unet(tiny_assets["teacher"]).eval(), schedule_from_card(card), 10)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = (sample_grid(teacher, sample_ddim, 2, (1, 28, 28), 10, per_class=2) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(a, b)
    assert a.shape == (1, 10 * 28, 2 * 28) and 0 <= a.min() and a.max() <= 1
