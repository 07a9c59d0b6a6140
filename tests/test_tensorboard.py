"""TensorBoard events beside log.jsonl: the same numbers, and the EMA student's samples at checkpoints."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_methods import pd_cfg
from test_train import cfg_for

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
    cfg = pd_cfg(tiny_assets)
    cfg.tensorboard = on
    assert train_progressive(cfg, tmp_path / "pd", progress=False)
    assert (tmp_path / "pd" / "tensorboard").exists() == on
    if on:
        assert "loss" in events(tmp_path / "pd" / "tensorboard").Tags()["scalars"]


def test_evaluation_network_pretraining_follows_the_tensorboard_switch(fake_data, tmp_path):
    from add_bench.config import EmbedNetPretrainConfig, load
    from add_bench.pretrain import pretrain_evalnet_ssl

    overrides = ["steps=2", "width=4", "batch_size=8", "threads=1", f"data.root={fake_data}", "data.val_size=50"]
    cfg = load(EmbedNetPretrainConfig, overrides=[*overrides, "data.download=false", "tensorboard=false"])
    assert pretrain_evalnet_ssl(cfg, tmp_path / "work", tmp_path / "w")
    assert (tmp_path / "work" / "log.jsonl").is_file() and not (tmp_path / "work" / "tensorboard").exists()
