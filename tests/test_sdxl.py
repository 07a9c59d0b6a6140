"""Cluster scale, SDXL: a base folder (two text encoders, pooled embedding, size conditioning) loads
through the suite's code and samples exactly like diffusers' own StableDiffusionXLPipeline (tiny
random-weight model in the real on-disk layout)."""

import json
import shutil

import pytest
import torch
from cluster_assets import save_tiny_sdxl

from add_bench.diffusion import make_scheduler, sample_add, sample_ddim
from add_bench.errors import ConfigError
from add_bench.networks.sd import XLTextDenoiser, load_stable_diffusion, pack_xl_condition, unpack_xl_condition

PROMPTS = ["a photo of a cat", "a red bus on a street"]


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny_xl")


@pytest.fixture(scope="module")
def xl(xl_folder):
    return load_stable_diffusion(xl_folder)


@pytest.fixture(scope="module")
def pipe(xl, xl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(
        xl_folder, local_files_only=True, scheduler=make_scheduler(xl.schedule.cfg)
    )


def test_the_packed_condition_round_trips():
    embeds, pooled = torch.randn(3, 5, 8), torch.randn(3, 6)
    packed = pack_xl_condition(embeds, pooled)
    assert packed.shape == (3, 6, 8)
    e, p = unpack_xl_condition(packed, 6)
    assert torch.equal(e, embeds) and torch.equal(p, pooled)
    with pytest.raises(ConfigError, match="pooled embedding of 9 dims does not fit a row of 8"):
        pack_xl_condition(embeds, torch.randn(3, 9))


def test_loads_as_xl_with_its_own_schedule(xl):
    """ε-prediction keeps its schedule (no zero terminal SNR); trailing spacing as everywhere."""
    assert xl.is_xl and xl.zeros_for_empty_prompt and isinstance(xl.denoiser(), XLTextDenoiser)
    assert xl.schedule.cfg.prediction_type == "epsilon" and xl.schedule.alphas_cumprod[-1] > 0
    assert xl.schedule.timesteps(4) == [999, 749, 499, 249]
    assert xl.frozen_parts == ("vae", "text_encoder", "text_encoder_2")


def test_prompt_embeddings_match_the_diffusers_pipeline(xl, pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    ours = xl.encode_prompts(PROMPTS)
    e, p = unpack_xl_condition(ours, xl.denoiser().pooled_dim)
    torch.testing.assert_close(e, embeds)
    torch.testing.assert_close(p, pooled)
    null = xl.denoiser().null_condition(ours)
    torch.testing.assert_close(null, pack_xl_condition(neg, neg_pooled))  # force_zeros_for_empty_prompt
    assert not null.any()


@pytest.mark.parametrize("steps,cfg_scale", [(1, 1.0), (4, 3.0)])
def test_ddim_equals_the_diffusers_pipeline(xl, pipe, steps, cfg_scale):
    """The suite's DDIM on the XLTextDenoiser = StableDiffusionXLPipeline (same scheduler, latents,
    embeddings; size conditioning from the 16-px target)."""
    noise = torch.randn((2, *xl.latent_shape(16)), generator=torch.Generator().manual_seed(0))
    cond = xl.encode_prompts(PROMPTS)
    d = xl.denoiser()
    ours = sample_ddim(d, noise, cond, steps, cfg_scale)
    e, p = unpack_xl_condition(cond, d.pooled_dim)
    ne, np_ = unpack_xl_condition(d.null_condition(cond), d.pooled_dim)
    ref = pipe(
        prompt_embeds=e,
        pooled_prompt_embeds=p,
        negative_prompt_embeds=ne,
        negative_pooled_prompt_embeds=np_,
        latents=noise.clone(),
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        height=16,
        width=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_size_conditioning_follows_the_latents(xl):
    """A different image size changes the UNet's added time embedding, hence its output."""
    d = xl.denoiser()
    cond = xl.encode_prompts(PROMPTS[:1])
    x = torch.randn((1, *xl.latent_shape(16)), generator=torch.Generator().manual_seed(3))
    small = d(x, 500, cond).x0
    d.vae_scale = 4  # as if the same latents came from a VAE with a different scale (another pixel size)
    try:
        other = d(x, 500, cond).x0
    finally:
        d.vae_scale = xl.vae_scale
    assert not torch.allclose(small, other)


def test_add_sampler_and_empty_prompt_folder(xl, tmp_path):
    noise = torch.randn((2, *xl.latent_shape(16)), generator=torch.Generator().manual_seed(1))
    cond = xl.encode_prompts(PROMPTS)
    torch.testing.assert_close(sample_add(xl.denoiser(), noise, cond, 1), xl.denoiser()(noise, 999, cond).x0)
    keep = load_stable_diffusion(save_tiny_sdxl(tmp_path / "keep", force_zeros_for_empty_prompt=False))
    torch.testing.assert_close(keep.denoiser().null_embedding, keep.encode_prompts([""]))


def without(folder, component, dest):
    """A copy of ``folder`` whose model_index.json lists no ``component``."""
    shutil.copytree(folder, dest)
    index = json.loads((dest / "model_index.json").read_text())
    index[component] = [None, None]
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


def test_refiner_and_mismatched_unets_are_refused(xl_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"refiner: an SDXL folder without text_encoder"):
        load_stable_diffusion(without(xl_folder, "text_encoder", tmp_path / "refiner"))
    with pytest.raises(ConfigError, match=r"no_xl/unet: addition_embed_type='text_time' with one text encoder"):
        load_stable_diffusion(without(xl_folder, "text_encoder_2", tmp_path / "no_xl"))
