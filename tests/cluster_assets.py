"""Stand-ins for the cluster scale's assets, in their real on-disk formats (hubs are offline):

* ``save_tiny_sd``: a random-weight Stable Diffusion folder in diffusers' layout: a 2-block
  UNet2DConditionModel, a 2-block AutoencoderKL (16 px ↔ 8×8×4 latents), a 2-layer CLIP text encoder
  and a character-level CLIP tokenizer whose vocabulary is written here;
* ``save_tiny_sdxl``: the same for SDXL base (two text encoders, size-conditioned UNet);
* ``write_coco``: a COCO-2017-layout folder (captions JSON + images);
* ``save_fake_inception``: a torchscript file with clean-fid's Inception interface;
* ``save_tiny_open_clip``: random open_clip ViT-S-32 weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to U+0100…"""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_tokenizer(folder: Path, max_length: int):
    """A character-level CLIP tokenizer (byte alphabet, no merges) whose vocabulary is written beside ``folder``."""
    from transformers import CLIPTokenizer

    tok_dir = folder.parent / f"{folder.name}_vocab"
    tok_dir.mkdir(parents=True, exist_ok=True)
    chars = byte_symbols()
    vocab = {s: i for i, s in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_length)


def tiny_text_config(n_vocab: int, max_length: int, hidden: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=32,
        bos_token_id=n_vocab - 2,
        eos_token_id=n_vocab - 1,
        pad_token_id=n_vocab - 1,
    )


def tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
    )


def tiny_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def save_tiny_sd(folder: Path, prediction_type: str = "v_prediction", seed: int = 0, max_length: int = 16) -> Path:
    """SD 1.x/2.x layout: one CLIP text encoder (32-d), a UNet with cross-attention on it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder, max_length)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer.get_vocab()), max_length))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def save_tiny_sdxl(
    folder: Path,
    prediction_type: str = "epsilon",
    seed: int = 0,
    max_length: int = 16,
    force_zeros_for_empty_prompt: bool = True,
) -> Path:
    """SDXL base layout: two text encoders (32-d hidden each; the second with a 32-d pooled projection),
    a UNet with ``addition_embed_type='text_time'`` (pooled 32 + 6 size ids × 8), cross-attention on
    the 64-d concatenation, SDXL's VAE scaling factor."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder, max_length)
    n = len(tokenizer.get_vocab())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(n, max_length))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(n, max_length))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=(1, 2),
    )
    StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(prediction_type),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    ).save_pretrained(folder)
    return folder


def write_coco(root: Path, n_images: int = 6, split: str = "val2017") -> Path:
    """n images of 40×20 px: red left quarter, green middle half, blue right quarter (so the square centre
    crop is all green), two captions each."""
    from PIL import Image

    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    images, anns = [], []
    for k in range(n_images):
        a = np.zeros((20, 40, 3), np.uint8)
        a[:, :10, 0] = 255
        a[:, 10:30, 1] = 200 + k
        a[:, 30:, 2] = 255
        name = f"{k:012d}.png"  # lossless, so the crop test is exact (the reader takes any PIL format)
        Image.fromarray(a).save(root / split / name)
        images.append({"id": 100 + k, "file_name": name})
        anns += [{"image_id": 100 + k, "id": 2 * k + j, "caption": f" image {k} caption {j} "} for j in range(2)]
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


class FakeInceptionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, 2048)  # clean-fid reshapes to (N, 2048)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


class FakeInception(torch.nn.Module):
    """clean-fid's InceptionV3W calls ``base.layers(x)`` on 299×299 inputs scaled to [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.layers = FakeInceptionLayers()

    def forward(self, x):
        return self.layers(x)


def save_fake_inception(folder: Path, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.jit.script(FakeInception()).save(str(folder / "inception-2015-12-05.pt"))
    return folder


def save_tiny_open_clip(path: Path, seed: int = 0) -> Path:
    import open_clip

    torch.manual_seed(seed)
    torch.save(open_clip.create_model("ViT-S-32").state_dict(), path)
    return Path(path)
