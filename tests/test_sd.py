"""Cluster scale: Stable Diffusion folders load through the suite's code and sample like diffusers' own
pipeline (tiny random-weight models in the real on-disk layout; hubs are offline)."""

import json
import shutil

import pytest
import torch
from cluster_assets import save_fake_inception, save_tiny_open_clip, save_tiny_sd, write_coco

from add_bench.diffusion import make_scheduler, sample_add, sample_ddim
from add_bench.errors import CheckpointError, ConfigError
from add_bench.networks.sd import TextDenoiser, load_stable_diffusion, schedule_config

PROMPTS = ["a photo of a cat", "a red bus on a street"]


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_v", "v_prediction")


@pytest.fixture(scope="module")
def sd(v_folder):
    return load_stable_diffusion(v_folder)


def test_schedule_from_the_folder_with_add_overrides(sd, v_folder):
    """The folder's betas and parameterisation; v-prediction → zero terminal SNR and trailing spacing."""
    from diffusers import DDIMScheduler

    cfg = sd.schedule.cfg
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.prediction_type) == (
        "scaled_linear",
        0.00085,
        0.012,
        "v_prediction",
    )
    assert sd.schedule.alphas_cumprod[-1] == 0 and sd.schedule.timesteps(4) == [999, 749, 499, 249]
    ref = DDIMScheduler.from_pretrained(v_folder, subfolder="scheduler", rescale_betas_zero_snr=True)
    torch.testing.assert_close(sd.schedule.alphas_cumprod.float(), ref.alphas_cumprod.float())


def test_epsilon_model_keeps_its_schedule_and_refuses_zero_snr(tmp_path):
    folder = save_tiny_sd(tmp_path / "tiny_eps", "epsilon")
    sd = load_stable_diffusion(folder)
    assert sd.schedule.alphas_cumprod[-1] > 0  # x0 = (x_t − σε)/α stays defined at t = 999
    x0 = sd.denoiser()(torch.randn(1, 4, 8, 8), 999, sd.encode_prompts(PROMPTS[:1])).x0
    assert torch.isfinite(x0).all()
    with pytest.raises(ConfigError, match=r"scheduler_config.json: zero terminal SNR with prediction_type='epsilon'"):
        load_stable_diffusion(folder, zero_terminal_snr=True)


def test_prompt_embeddings_match_the_diffusers_pipeline(sd, v_folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(v_folder, local_files_only=True)
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(sd.encode_prompts(PROMPTS), cond)
    torch.testing.assert_close(sd.denoiser().null_condition(cond), uncond)


@pytest.mark.parametrize("steps,cfg_scale", [(1, 1.0), (4, 3.0)])
def test_ddim_equals_the_diffusers_pipeline(sd, v_folder, steps, cfg_scale):
    """The suite's DDIM sampler on the TextDenoiser = StableDiffusionPipeline with the same scheduler,
    latents and prompt embeddings (guidance on the empty prompt)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        v_folder, local_files_only=True, scheduler=make_scheduler(sd.schedule.cfg)
    )
    noise = torch.randn((2, *sd.latent_shape(16)), generator=torch.Generator().manual_seed(0))
    cond = sd.encode_prompts(PROMPTS)
    ours = sample_ddim(sd.denoiser(), noise, cond, steps, cfg_scale)
    ref = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=sd.denoiser().null_condition(cond),
        latents=noise.clone(),
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        height=16,
        width=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_add_sampler_on_latents(sd):
    """ADD multi-step sampling runs in latent space; 1 step = the x0 prediction at τ_N = 999."""
    d = sd.denoiser()
    assert isinstance(d, TextDenoiser)
    noise = torch.randn((2, *sd.latent_shape(16)), generator=torch.Generator().manual_seed(1))
    cond = sd.encode_prompts(PROMPTS)
    torch.testing.assert_close(sample_add(d, noise, cond, 1), d(noise, 999, cond).x0)
    four = sample_add(d, noise, cond, 4, generator=torch.Generator().manual_seed(2))
    assert four.shape == noise.shape and torch.isfinite(four).all()
    assert not torch.allclose(four, sample_add(d, noise, cond, 1))


def test_latents_and_pixels(sd):
    """16×16 RGB ↔ 8×8×4 latents; decoding is differentiable (the pixel-space distillation loss needs it)."""
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    z = sd.to_latents(pixels, torch.Generator().manual_seed(0))
    assert z.shape == (2, *sd.latent_shape(16))
    z = z.detach().requires_grad_(True)
    out = sd.to_pixels(z)
    assert out.shape == pixels.shape
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"resolution=15: must be a multiple of the VAE's scale 2"):
        sd.latent_shape(15)


def test_bad_folders_name_the_file(tmp_path, v_folder):
    with pytest.raises(
        CheckpointError, match=r"no_model: not a diffusers Stable Diffusion folder .*sd21 \(stabilityai"
    ):
        load_stable_diffusion(tmp_path / "no_model")
    broken = tmp_path / "broken"
    shutil.copytree(v_folder, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(CheckpointError, match=r"broken/unet: missing"):
        load_stable_diffusion(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(v_folder, corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"corrupt/unet: cannot load UNet2DConditionModel"):
        load_stable_diffusion(corrupt)


def test_schedule_config_reads_diffusers_keys():
    cfg = schedule_config(
        json.loads(
            '{"beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.03, '
            '"prediction_type": "v_prediction", "num_train_timesteps": 500}'
        ),
        True,
    )
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("linear", 0.001, 0.03, 500)
    assert cfg.rescale_betas_zero_snr and cfg.timestep_spacing == "trailing"


def test_evaluate_a_stable_diffusion_folder_with_cluster_metrics(v_folder, tmp_path, monkeypatch):
    """python -m add_bench.evaluate on an SD folder: COCO captions in, Inception FID against the images
    of the same COCO pairs and CLIP score out; exported samples carry the COCO image ids."""
    import numpy as np

    from add_bench import evaluate as ev
    from add_bench import metrics
    from add_bench.data.coco import load_captions

    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    coco_root = write_coco(tmp_path / "coco")
    monkeypatch.setenv("ADD_BENCH_INCEPTION", str(save_fake_inception(tmp_path / "inception")))
    monkeypatch.setenv("ADD_BENCH_CLIP", str(save_tiny_open_clip(tmp_path / "clip.pt")))
    overrides = [
        "metrics=cluster",
        f"coco.root={coco_root}",
        "coco.resolution=16",
        "num_samples=4",
        "batch_size=3",
        "cluster.clip_model=ViT-S-32",
    ]
    out = tmp_path / "metrics.json"
    # one step count: each FID costs a 2048×2048 matrix square root (seconds on a CPU)
    assert (
        ev.main(
            [
                str(v_folder),
                "--steps",
                "2",
                "--cfg-scale",
                "3",
                "--out",
                str(out),
                "--export-samples",
                str(tmp_path / "s.npz"),
                *overrides,
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["kind"] == "teacher" and len(result["rows"]) == 1
    row = result["rows"][0]
    assert (row["steps"], row["sampler"], row["nfe"]) == (2, "ddim", 4)
    assert np.isfinite(row["fid"]) and row["fid"] > 0 and 0 <= row["clip_score"] <= 1
    coco = load_captions(str(coco_root))
    pick = coco.eval_pairs(4, seed=0)
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (4, 16, 16, 3) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == coco.image_ids[pick].tolist()
    # the FID reference is the images of those same pairs
    from add_bench.config import EvalConfig, load

    fid = metrics.build_suite(load(EvalConfig, overrides=overrides))[0]
    assert (fid.reference() == coco.load_images(pick, 16)).all()


def test_evaluate_a_stable_diffusion_folder_needs_cluster_metrics_and_weights(v_folder, tmp_path, monkeypatch, capsys):
    from add_bench import evaluate as ev

    assert ev.main([str(v_folder), "--steps", "1", "--out", str(tmp_path / "m.json")]) == 2
    assert "a Stable Diffusion model is scored with metrics=cluster" in capsys.readouterr().err
    monkeypatch.delenv("ADD_BENCH_INCEPTION", raising=False)
    assert (
        ev.main(
            [
                str(v_folder),
                "--steps",
                "1",
                "--out",
                str(tmp_path / "m.json"),
                "metrics=cluster",
                "num_samples=4",
                f"coco.root={write_coco(tmp_path / 'coco')}",
            ]
        )
        == 2
    )
    assert "eval.cluster.inception is unset and $ADD_BENCH_INCEPTION is empty" in capsys.readouterr().err
