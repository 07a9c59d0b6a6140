"""ADD on a Stable Diffusion teacher (cluster scale), on tiny random-weight models in the real formats:
latent student, discriminator and c_img on decoded pixels, open_clip c_text per caption, pixel-space
distillation, exact resume, and a student exported as a loadable Stable Diffusion folder."""

import json

import pytest
import torch
from cluster_assets import save_tiny_open_clip, save_tiny_sd, save_tiny_sdxl, write_coco

from add_bench import checkpoint
from add_bench import train as train_mod
from add_bench.config import TrainConfig, load
from add_bench.errors import AddBenchError, ConfigError
from add_bench.losses import c_exp, distillation_loss, teacher_target


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_train")
    return {
        "sd": save_tiny_sd(root / "sd"),
        "sdxl": save_tiny_sdxl(root / "sdxl"),
        "coco": write_coco(root / "coco", split="train2017"),
        "clip": save_tiny_open_clip(root / "clip.pt"),
    }


def sd_cfg(a, **extra):
    base = {
        "steps": 3,
        "batch_size": 4,
        "ckpt_every": 2,
        "log_every": 1,
        "threads": 1,
        "student.network": a["sd"],
        "teacher.network": a["sd"],
        "teacher.cfg_scale": 1.5,
        "feature_network.name": "random",
        "discriminator.c_img_network": "random",
        "discriminator.c_text_network": "openclip_vits32",
        "discriminator.c_text_weights": a["clip"],
        "coco.root": a["coco"],
        "coco.resolution": 16,
        "optim.warmup_steps": 1,
    }
    base.update(extra)
    return load(TrainConfig, overrides=[f"{k}={v}" for k, v in base.items()])


def one_batch(nets, cfg, seed=0):
    data = train_mod.training_data(cfg, nets)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
    return data.batch(idx, gen), gen


def test_gradients_reach_the_student_through_the_decoder_and_nothing_frozen_moves(assets):
    cfg = sd_cfg(assets)
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    (x0, cond, extra), gen = one_batch(nets, cfg)
    assert x0.shape == (4, 4, 8, 8) and cond.ndim == 3  # latents; prompt embeddings (B, L, D)
    assert extra["pixels"].shape == (4, 3, 16, 16) and extra["c_text"].shape[0] == 4
    grads = {}

    class NoStep(torch.optim.Adam):
        def step(self, closure=None):
            grads["student"] = [p.grad.clone() for p in nets.student.unet.parameters() if p.grad is not None]

    opt_s = NoStep(nets.student.unet.parameters(), 1e-4)
    opt_d = torch.optim.Adam(nets.discriminator.parameters(), 1e-4)
    row = train_mod.add_step(nets, cfg, x0, cond, gen, opt_s, opt_d, 0, **extra)
    assert row["loss_distill"] > 0 and "loss_d" in row
    assert grads["student"] and sum(g.abs().sum() for g in grads["student"]) > 0
    frozen = {
        "teacher": nets.teacher.unet,
        "vae": nets.sd.vae,
        "text encoder": nets.sd.text_encoder,
        "feature network": nets.feature_network,
        "c_text tower": nets.text_encoder,
    }
    for name, module in frozen.items():
        assert all(not p.requires_grad and p.grad is None for p in module.parameters()), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.discriminator.parameters())


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_distillation_in_pixel_or_latent_space(assets, space):
    """loss.space=pixel: d(decode(x̂θ), decode(x̂ψ)), the paper's choice for latent models; latent: d on latents."""
    cfg = sd_cfg(assets, **{"loss.space": space})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    cond = nets.sd.encode_prompts(["a cat", "a dog"])
    loss = train_mod.distillation_term(nets, cfg, x, cond, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the draws of t and ε'
    t = train_mod.sample_teacher_t(cfg, 2, g)
    eps = torch.randn(x.shape, generator=g)
    target = teacher_target(nets.teacher, x, cond, t, eps, 1, cfg.teacher.cfg_scale)
    c_t = c_exp(*nets.teacher.schedule.alpha_sigma(t))
    a, b = (nets.to_pixels(x), nets.to_pixels(target)) if space == "pixel" else (x, target)
    torch.testing.assert_close(loss, distillation_loss(a, b, c_t))
    loss.backward()
    assert x.grad.abs().sum() > 0


def test_trains_resumes_exactly_and_exports_a_stable_diffusion_folder(assets, tmp_path):
    from add_bench.evaluate import generate_text
    from add_bench.networks.sd import load_stable_diffusion

    cfg = sd_cfg(assets)
    full = train_mod.train(cfg, tmp_path / "full", progress=False)
    assert train_mod.train(cfg, tmp_path / "part", budget_minutes=1e-9, progress=False) is None
    part = train_mod.train(cfg, tmp_path / "part", progress=False)
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "part")
    for obj in ("student", "ema", "discriminator"):
        for k, v in a["objects"][obj].items():
            assert torch.equal(v, b["objects"][obj][k]), (obj, k)
    assert len((tmp_path / "part" / "log.jsonl").read_text().splitlines()) == 3
    # the export: a Stable Diffusion folder with the student's UNet, the teacher's VAE and text encoder
    card = json.loads((full / "card.json").read_text())
    assert card["kind"] == "student" and card["steps"] == 3 and card["provenance"]["seed"] == 0
    assert (full / "vae").resolve() == (assets["sd"] / "vae").resolve()
    student, teacher = load_stable_diffusion(full), load_stable_diffusion(assets["sd"])
    s_w, t_w = student.unet.state_dict(), teacher.unet.state_dict()
    assert any(not torch.equal(s_w[k], t_w[k]) for k in t_w)  # trained
    assert (part / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        full / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    g = generate_text(
        student,
        student.denoiser(),
        "add",
        2,
        ["a cat", "a dog"],
        torch.arange(2).numpy(),
        resolution=16,
        progress=False,
    )
    assert g.samples.images.shape == (2, 16, 16, 3) and g.nfe == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ({"loss.weighting": "nfsd"}, r"loss.nfsd_negative='other_class' needs class labels; .* accepted: null"),
        ({"loss.space": "voxel"}, r"loss.space='voxel': unknown; accepted: latent, pixel"),
        (
            {"discriminator.c_text_network": "clip_s"},
            r"c_text_network='clip_s' embeds the 10 Fashion-MNIST prompts only",
        ),
        ({"discriminator.c_text_weights": "/nowhere/clip.pt"}, r"/nowhere/clip.pt: ViT-S-32 text tower .* not found"),
        ({"coco.resolution": 15}, r"resolution=15: must be a multiple of the VAE's scale 2"),
    ],
)
def test_config_errors(assets, override, message):
    with pytest.raises(AddBenchError, match=message):
        cfg = sd_cfg(assets, **override)
        nets = train_mod.build_networks(cfg)
        train_mod.training_data(cfg, nets)


def test_a_teacher_from_another_model_meets_the_student_in_pixel_space(assets):
    """Table 1e at cluster scale (SD2.1 student, SDXL teacher): the teacher encodes sg(decode(x̂θ)) with
    its own VAE, is conditioned by its own encoders, and x̂ψ is decoded by its own VAE; d in pixels."""
    cfg = sd_cfg(assets, **{"teacher.network": assets["sdxl"]})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    assert nets.teacher_sd.is_xl and not nets.sd.is_xl  # student: SD (v-prediction), teacher: SDXL (ε)
    assert nets.student.schedule.cfg != nets.teacher.schedule.cfg
    (x0, cond, extra), _ = one_batch(nets, cfg)
    torch.testing.assert_close(extra["teacher_cond"], nets.teacher_sd.encode_prompts(extra_prompts(nets, cfg)))
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    img = nets.to_pixels(x)
    loss = train_mod.distillation_term(nets, cfg, x, cond, torch.Generator().manual_seed(5), img, extra["teacher_cond"])
    g = torch.Generator().manual_seed(5)  # replay the draws of t and ε'
    t = train_mod.sample_teacher_t(cfg, 4, g)
    with torch.no_grad():
        z_teacher = nets.teacher_sd.to_latents(img, mode=True)
    eps = torch.randn(z_teacher.shape, generator=g)
    target = teacher_target(nets.teacher, z_teacher, extra["teacher_cond"], t, eps, 1, cfg.teacher.cfg_scale)
    c_t = c_exp(*nets.teacher.schedule.alpha_sigma(t))
    torch.testing.assert_close(loss, distillation_loss(img, nets.teacher_sd.to_pixels(target), c_t))
    loss.backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(
        ConfigError,
        match=r"are different models: they meet in pixel space, so "
        r"loss.space='latent' is not possible; accepted: loss.space=pixel",
    ):
        train_mod.build_networks(sd_cfg(assets, **{"teacher.network": assets["sdxl"], "loss.space": "latent"}))


def extra_prompts(nets, cfg, seed=0):
    """The captions of ``one_batch``'s draw."""
    data = train_mod.training_data(cfg, nets)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
    return [data.coco.captions[i] for i in idx.tolist()]


@pytest.mark.parametrize("student, teacher", [("sdxl", "sdxl"), ("sd", "sdxl")])
def test_sdxl_trains_and_exports(assets, tmp_path, student, teacher):
    """ADD with an SDXL teacher, as SDXL/SDXL (one folder) or SD/SDXL (two): trains, exports the student
    as a folder of its own family, which loads and samples."""
    from add_bench.evaluate import generate_text
    from add_bench.networks.sd import load_stable_diffusion

    cfg = sd_cfg(assets, **{"student.network": assets[student], "teacher.network": assets[teacher], "steps": 2})
    out = train_mod.train(cfg, tmp_path / "run", progress=False)
    card = json.loads((out / "card.json").read_text())
    assert card["teacher"] == str(assets[teacher].resolve()) and card["student_base"] == str(assets[student].resolve())
    exported = load_stable_diffusion(out)
    assert exported.is_xl == (student == "sdxl")
    for part in exported.frozen_parts:
        assert (out / part).resolve() == (assets[student] / part).resolve()
    g = generate_text(
        exported,
        exported.denoiser(),
        "add",
        2,
        ["a cat", "a dog"],
        torch.arange(2).numpy(),
        resolution=16,
        progress=False,
    )
    assert g.samples.images.shape == (2, 16, 16, 3)


def test_a_sweep_on_a_stable_diffusion_preset(assets, tmp_path, monkeypatch):
    """The product's sweep, unchanged, on a cluster-scale preset: train, Inception FID + CLIP score on COCO
    captions, sample grids, and a table with the CLIP score column."""
    import yaml
    from cluster_assets import save_fake_inception

    from add_bench import metrics, sweep

    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    write_coco(assets["coco"], split="val2017")
    preset = {
        "steps": 2,
        "batch_size": 2,
        "teacher": {"network": str(assets["sd"])},
        "student": {"network": str(assets["sd"])},
        "feature_network": {"name": "random"},
        "discriminator": {
            "c_img_network": "random",
            "c_text_network": "openclip_vits32",
            "c_text_weights": str(assets["clip"]),
        },
        "coco": {"root": str(assets["coco"]), "resolution": 16},
        "eval": {
            "metrics": "cluster",
            "num_samples": 4,
            "batch_size": 4,
            "coco": {"root": str(assets["coco"]), "resolution": 16},
            "cluster": {
                "inception": str(save_fake_inception(tmp_path / "inception")),
                "clip_model": "ViT-S-32",
                "clip_weights": str(assets["clip"]),
            },
        },
    }
    (tmp_path / "sd_tiny.yaml").write_text(yaml.safe_dump(preset))
    (tmp_path / "abl.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "sd_mini",
                "table": "1d",
                "base": str(tmp_path / "sd_tiny.yaml"),
                "eval_steps": [1],
                "cells": [{"name": "exp", "label": "exp", "default": True, "paper": {"fid": 20.6, "cs": 0.319}}],
            }
        )
    )
    assert sweep.main([str(tmp_path / "abl.yaml"), "--out", str(tmp_path / "out"), "threads=1"]) == 0
    cell = json.loads((tmp_path / "out" / "sd_mini" / "cells.json").read_text())["cells"][0]["id"]
    result = json.loads((tmp_path / "out" / "cells" / cell / "metrics.json").read_text())
    assert result["kind"] == "student" and result["rows"][0]["sampler"] == "add"
    assert {"fid", "clip_score"} <= set(result["rows"][0])
    import numpy as np

    with np.load(tmp_path / "out" / "cells" / cell / "samples.npz") as z:
        assert z["steps_1"].shape == (4, 16, 16, 3)
    assert "CLIP score" in (tmp_path / "out" / "sd_mini" / "table.md").read_text()


def test_pre_encoded_latents_give_the_same_batches_resume_and_refuse_another_setting(assets, tmp_path):
    """``python -m add_bench.data.coco encode`` stores the split's VAE posteriors; a cell with coco_latents
    reads them and draws the same latents from the same generator as encoding on the fly; an interrupted
    encoding resumes; a folder of another resolution, or unfinished, is refused naming why."""
    import numpy as np

    from add_bench.data import coco as coco_mod
    from add_bench.errors import DataError

    cfg = sd_cfg(assets)
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    out = tmp_path / "latents"
    args = ["encode", str(assets["sd"]), "--split", "train2017", "--resolution", "16", "--root", str(assets["coco"])]
    args += ["--out", str(out), "--batch-size", "4", "--workers", "2", "--device", "cpu"]
    assert coco_mod.main(args) == 0
    (x0, cond, extra), gen = one_batch(nets, cfg)
    (y0, cond_cached, extra_cached), gen_cached = one_batch(nets, sd_cfg(assets, coco_latents=out))
    torch.testing.assert_close(y0, x0, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen.get_state(), gen_cached.get_state())  # the same draws, in the same order
    assert torch.equal(cond, cond_cached) and torch.equal(extra["pixels"], extra_cached["pixels"])

    card = json.loads((out / "card.json").read_text())
    table = np.load(out / "moments.npy", mmap_mode="r+")
    reference = np.array(table)
    table[2:] = 0  # an encoding interrupted after its first two images
    table.flush()
    del table
    (out / "card.json").write_text(json.dumps({**card, "done": 2}))
    with pytest.raises(DataError, match=r"coco_latents=.*: 2 of 6 done"):
        train_mod.training_data(sd_cfg(assets, coco_latents=out), nets)
    assert coco_mod.main(args) == 0  # resumes at image 2
    np.testing.assert_allclose(np.load(out / "moments.npy"), reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(DataError, match=r"coco_latents=.*: made with another resolution, shape"):
        train_mod.training_data(sd_cfg(assets, coco_latents=out, **{"coco.resolution": 8}), nets)
