"""UNet weights (teachers, exported students) are saved in diffusers' layout: diffusers loads them alone."""

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel

from add_bench.diffusion import Denoiser, sample_ddim, schedule_from_card
from add_bench.networks.unets import load_unet, read_card, weights_file


def test_a_teacher_loads_and_samples_with_diffusers_alone(tiny_assets):
    folder = tiny_assets["teacher"]
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    patch = read_card(folder)["unet"]["patch"]
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 7, 10])  # 10 = the null class
    scheduler.set_timesteps(4)
    x = F.pixel_unshuffle(noise, patch)  # the UNet works on the 2×2 space-to-depth image
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    by_diffusers = F.pixel_shuffle(x, patch)
    suite = Denoiser(load_unet(folder), schedule_from_card(read_card(folder)), 10)
    torch.testing.assert_close(by_diffusers, sample_ddim(suite, noise, labels, 4), rtol=1e-4, atol=1e-4)
    assert weights_file(folder).relative_to(folder).as_posix() == "unet/diffusion_pytorch_model.safetensors"
