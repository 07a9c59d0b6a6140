"""Options of the collapse probes (issue: the paper's setting): stratified student timesteps, several
discriminator updates per student update, a minibatch-std channel in the heads, and the noise-anchored
regression extension. Each is off by default, where the trainer does what the paper says."""

import pytest
import torch
from test_train import batch, cfg_for

from add_bench import train as train_mod
from add_bench.config import TrainConfig
from add_bench.errors import ConfigError
from add_bench.networks.discriminator import MinibatchStd


def one_step(nets, cfg, tiny_assets) -> dict[str, float]:
    """One ADD step of ``nets`` on a batch of the tiny assets, with fresh Adam optimisers; the step's log row."""
    opt_s = torch.optim.Adam(nets.student.unet.parameters(), 1e-4)
    opt_d = torch.optim.Adam(nets.discriminator.parameters(), 1e-4)
    x0, y = batch(tiny_assets)
    return train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(0), opt_s, opt_d, 0)


def test_stratified_draw_gives_each_student_timestep_a_contiguous_block(tiny_assets):
    cfg = cfg_for(tiny_assets, **{"student.timestep_draw": "stratified"})
    s = train_mod.draw_student_timesteps(cfg, 8, torch.Generator().manual_seed(0))
    assert s.tolist() == [999, 999, 749, 749, 499, 499, 249, 249]
    with pytest.raises(ConfigError, match="multiple of the timestep count"):
        train_mod.validate(cfg_for(tiny_assets, **{"student.timestep_draw": "stratified", "batch_size": 6}))
    # the paper's uniform draw is the default and consumes the generator as before
    uniform = train_mod.draw_student_timesteps(cfg_for(tiny_assets), 8, torch.Generator().manual_seed(0))
    grid = torch.tensor([999, 749, 499, 249])
    assert torch.equal(uniform, grid[torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(0))])


def test_minibatch_std_channel_sees_a_collapsed_batch():
    layer = MinibatchStd(group=4)
    same = torch.randn(1, 3, 5).expand(8, 3, 5)
    out = layer(same)
    assert out.shape == (8, 4, 5) and torch.allclose(out[:, :3], same)
    assert out[:, 3].abs().max() < 1e-3  # identical samples: zero spread
    varied = torch.randn(8, 3, 5)
    groups = varied.reshape(4, 2, 3, 5)  # strided groups: samples k, k+2, k+4, k+6
    expected = groups.var(0, unbiased=False).add(1e-8).sqrt().mean((1, 2))
    torch.testing.assert_close(layer(varied)[:, 3, 0], expected.repeat(4))


@pytest.mark.parametrize("steps", [1, 3])
def test_discriminator_steps_per_student_step(tiny_assets, steps):
    cfg = cfg_for(tiny_assets, **{"discriminator.steps": steps, "discriminator.minibatch_std": 4})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    counts = {"student": 0, "discriminator": 0}

    def counting(params, name):
        class Counting(torch.optim.Adam):
            def step(self, closure=None):
                counts[name] += 1
                return super().step(closure)

        return Counting(params, 1e-4)

    opt_s = counting(nets.student.unet.parameters(), "student")
    opt_d = counting(nets.discriminator.parameters(), "discriminator")
    x0, y = batch(tiny_assets)
    row = train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(0), opt_s, opt_d, 0)
    assert counts == {"student": 1, "discriminator": steps}
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())


def test_noise_anchored_regression_pairs_are_the_teachers_samples(tiny_assets, tmp_path):
    cfg = cfg_for(
        tiny_assets, **{"loss.regression_weight": 1.0, "loss.regression_pairs": 12, "loss.regression_steps": 3}
    )
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    pairs = train_mod.teacher_pairs(nets, cfg, tmp_path)
    assert (tmp_path / "regression_pairs.pt").is_file() and pairs.noise.shape == (12, 1, 28, 28)
    from add_bench.diffusion import sample_dpm_solver

    again = sample_dpm_solver(nets.teacher, pairs.noise[:4], pairs.labels[:4], 3, cfg.teacher.cfg_scale)
    torch.testing.assert_close(again, pairs.target[:4])
    assert torch.equal(train_mod.teacher_pairs(nets, cfg, tmp_path).target, pairs.target)  # reused, not redrawn
    nets.pairs = pairs
    row = one_step(nets, cfg, tiny_assets)
    assert row["loss_regression"] > 0
    assert row["loss_g"] == pytest.approx(
        row["loss_g_adv"] + 2.5 * row["loss_distill"] + row["loss_regression"], rel=1e-5
    )


def test_the_regression_alone_trains_only_the_student_on_the_pairs(tiny_assets, tmp_path):
    """The probe's sanity rung: neither of the paper's terms, the regression alone; the heads are not updated."""
    terms = {"loss.adversarial": False, "loss.distillation": False, "loss.regression_pairs": 12}
    with pytest.raises(ConfigError, match="at least one loss term"):
        train_mod.validate(cfg_for(tiny_assets, **terms))
    cfg = cfg_for(tiny_assets, **terms, **{"loss.regression_weight": 2.0, "loss.regression_steps": 3})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    nets.pairs = train_mod.teacher_pairs(nets, cfg, tmp_path)
    heads = {k: v.clone() for k, v in nets.discriminator.state_dict().items()}
    student = [p.clone() for p in nets.student.unet.parameters()]
    row = one_step(nets, cfg, tiny_assets)
    assert "loss_g_adv" not in row and "loss_distill" not in row
    assert row["loss_g"] == pytest.approx(2.0 * row["loss_regression"], rel=1e-6) and row["loss_regression"] > 0
    assert all(torch.equal(v, nets.discriminator.state_dict()[k]) for k, v in heads.items())
    assert any(not torch.equal(a, b) for a, b in zip(student, nets.student.unet.parameters()))


def test_denoising_anchor_is_the_v_or_eps_prediction_loss_below_the_top_timestep():
    from add_bench.diffusion import add_noise, v_from_x0_eps
    from add_bench.losses import DENOISING_WEIGHTINGS, denoising_anchor

    gen = torch.Generator().manual_seed(0)
    x0, eps, x_hat = (torch.randn(4, 1, 6, 6, generator=gen) for _ in range(3))
    alpha = torch.tensor([0.0, 0.3, 0.6, 0.9]).view(4, 1, 1, 1)
    sigma = (1 - alpha**2).sqrt()
    x_s = add_noise(x0, eps, alpha, sigma)
    v_hat = (alpha * x_s - x_hat) / sigma  # what a network predicting x_hat from x_s outputs as v
    eps_hat = (x_s - alpha * x_hat) / sigma  # ... and as ε
    v_mse = (v_hat - v_from_x0_eps(x0, eps, alpha, sigma)).pow(2).flatten(1).mean(1)
    eps_mse = (eps_hat - eps).pow(2).flatten(1).mean(1)
    keep = torch.tensor([False, True, True, True])  # row 0 is s = τN: pure noise, no x0 in x_s
    for name, expected in (("v", v_mse), ("eps", eps_mse)):
        w_s = DENOISING_WEIGHTINGS[name](alpha, sigma)
        torch.testing.assert_close(denoising_anchor(x_hat, x0, w_s, keep), expected[1:].sum() / 4)
        assert denoising_anchor(x_hat, x0, w_s, torch.zeros(4, dtype=torch.bool)) == 0


def test_denoising_anchor_adds_its_weighted_term_to_the_students_loss(tiny_assets):
    with pytest.raises(ConfigError, match="loss.denoising_weight=-1"):
        train_mod.validate(cfg_for(tiny_assets, **{"loss.denoising_weight": -1.0}))
    with pytest.raises(ConfigError, match="loss.denoising_weighting.*snr.*eps"):
        train_mod.validate(cfg_for(tiny_assets, **{"loss.denoising_weighting": "snr"}))
    cfg = cfg_for(tiny_assets, **{"loss.denoising_weight": 3.0})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    row = one_step(nets, cfg, tiny_assets)
    assert row["loss_denoising"] > 0
    assert row["loss_g"] == pytest.approx(
        row["loss_g_adv"] + 2.5 * row["loss_distill"] + 3.0 * row["loss_denoising"], rel=1e-5
    )
    # the paper's terms off: the anchor alone is a valid objective
    alone = {"loss.adversarial": False, "loss.distillation": False, "loss.denoising_weight": 1.0}
    train_mod.validate(cfg_for(tiny_assets, **alone))


def test_the_options_default_to_the_papers_recipe():
    cfg = TrainConfig()
    assert cfg.student.timestep_draw == "uniform" and cfg.discriminator.steps == 1
    assert cfg.discriminator.minibatch_std == 0 and cfg.loss.regression_weight == 0
    assert cfg.loss.denoising_weight == 0
