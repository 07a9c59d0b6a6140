"""Stable Diffusion teachers and students through diffusers: the cluster scale.

A model is a local diffusers folder, as ``StableDiffusionPipeline.save_pretrained`` writes it
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``): model hubs
are unreachable on the machines this suite is tested on, so weights are always read from a path.
Download a real model elsewhere (hub ids in ``SD_MODELS``) and point ``teacher.network`` at it;
the tests build tiny random-weight folders in the same layout and load them through this same code.

* :class:`StableDiffusion`: the loaded components (UNet2DConditionModel, AutoencoderKL, CLIP text
  encoder + tokenizer) and the suite's :class:`~add_bench.diffusion.Schedule` built from the folder's
  scheduler config, with the ADD overrides (trailing spacing; zero terminal SNR where the
  parameterisation allows it, i.e. v-prediction).
* :class:`TextDenoiser`: the suite's Denoiser for a text-conditional UNet. Its condition is the
  prompt embedding c (B, L, D); ∅ is the empty prompt's embedding, as in diffusers' pipelines. The
  samplers of :mod:`add_bench.diffusion` run on it unchanged, in latent space.
* :class:`XLTextDenoiser`: SDXL (two text encoders, pooled embedding, size conditioning). Its condition
  is still one tensor, so that samplers and CFG batch it like any other: the concatenated penultimate
  hidden states of both encoders (B, L, D) with one extra row carrying the pooled embedding
  (:func:`pack_xl_condition`); the size conditioning (original = target size, no crop) follows from the
  latents' shape. ∅ is all zeros when the folder says ``force_zeros_for_empty_prompt`` (SDXL base), as
  in diffusers' pipeline.
* Latents ↔ pixels through the VAE (``to_latents`` / ``to_pixels``): the paper computes the
  distillation loss in pixel space for latent models, which also lets a teacher from another latent
  space (Table 1e: SD2.1 student, SDXL teacher) judge the student's decoded sample.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from add_bench.config import ScheduleConfig
from add_bench.diffusion import Denoiser, Schedule
from add_bench.errors import CheckpointError, ConfigError

# The releases this scale is written for (hub ids, to download elsewhere and pass as local folders).
SD_MODELS: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # ε-prediction, 512 px
    "sd21_base": "stabilityai/stable-diffusion-2-1-base",  # ε-prediction, 512 px
    "sd21": "stabilityai/stable-diffusion-2-1",  # v-prediction, 768 px (zero terminal SNR applied)
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",  # ε-prediction, 1024 px, two text encoders
}


def schedule_config(
    scheduler_config: dict[str, Any], zero_terminal_snr: bool, where: str = "scheduler"
) -> ScheduleConfig:
    """The suite's schedule from a diffusers scheduler config: the model's betas and parameterisation,
    trailing timestep spacing (4 steps → 999, 749, 499, 249), and zero terminal SNR if asked for."""
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if zero_terminal_snr and prediction == "epsilon":
        raise ConfigError(
            f"{where}: zero terminal SNR with prediction_type='epsilon' leaves x0 undefined at "
            "t = T−1 (α = 0); accepted: zero_terminal_snr=false, or a v_prediction / sample model"
        )
    return ScheduleConfig(
        num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        beta_schedule=scheduler_config.get("beta_schedule", "scaled_linear"),
        beta_start=float(scheduler_config.get("beta_start", 0.00085)),
        beta_end=float(scheduler_config.get("beta_end", 0.012)),
        prediction_type=prediction,
        rescale_betas_zero_snr=zero_terminal_snr,
        timestep_spacing="trailing",
    )


class TextDenoiser(Denoiser):
    """A text-conditional ``UNet2DConditionModel``: (x_t, t, c) → x̂0, ε̂ with c the prompt embedding
    (B, L, D); classifier-free guidance uses ∅ = the empty prompt's embedding."""

    def __init__(self, unet: torch.nn.Module, schedule: Schedule, null_embedding: torch.Tensor):
        super().__init__(unet, schedule, null_label=-1)
        self.null_embedding = null_embedding  # (1, L, D)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=cond).sample

    def to(self, device: torch.device) -> TextDenoiser:
        super().to(device)
        self.null_embedding = self.null_embedding.to(device)
        return self

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.null_embedding.to(cond.dtype).expand(cond.shape[0], *self.null_embedding.shape[1:])


def pack_xl_condition(embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """SDXL's condition as one tensor: token embeddings (B, L, D) + a last row holding the pooled
    embedding (B, P), zero-padded to D (P ≤ D: 1280 ≤ 2048 for SDXL)."""
    b, _, d = embeds.shape
    if pooled.shape[1] > d:
        raise ConfigError(f"SDXL pooled embedding of {pooled.shape[1]} dims does not fit a row of {d}")
    row = embeds.new_zeros(b, 1, d)
    row[:, 0, : pooled.shape[1]] = pooled
    return torch.cat([embeds, row], dim=1)


def unpack_xl_condition(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_xl_condition`: (token embeddings, pooled embedding)."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


class XLTextDenoiser(TextDenoiser):
    """SDXL's ``UNet2DConditionModel`` (``addition_embed_type='text_time'``): the packed condition is split
    into token and pooled embeddings, and the size conditioning is (H, W, 0, 0, H, W) in pixels of the
    image being generated, as diffusers' pipeline builds it for a square image without crop."""

    TIME_IDS = 6  # original size (2) + crop top-left (2) + target size (2)

    def __init__(self, unet: torch.nn.Module, schedule: Schedule, null_embedding: torch.Tensor, vae_scale: int):
        super().__init__(unet, schedule, null_embedding)
        c = unet.config
        self.vae_scale = vae_scale
        self.pooled_dim = c.projection_class_embeddings_input_dim - self.TIME_IDS * c.addition_time_embed_dim

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        embeds, pooled = unpack_xl_condition(cond, self.pooled_dim)
        h, w = (side * self.vae_scale for side in x_t.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0], -1)
        return self.unet(
            x_t, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample


@dataclass
class StableDiffusion:
    """The components of one Stable Diffusion folder, frozen and in eval mode."""

    folder: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    schedule: Schedule
    text_encoder_2: Any = None  # SDXL's second (projection) text encoder and its tokenizer
    tokenizer_2: Any = None
    zeros_for_empty_prompt: bool = False  # SDXL base: ∅ is all zeros, not the empty prompt's embedding

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        """The frozen components besides the UNet (a student folder links them to its teacher's)."""
        return ("vae", "text_encoder", "text_encoder_2") if self.is_xl else ("vae", "text_encoder")

    @property
    def vae_scale(self) -> int:
        """Pixels per latent: 2^(number of VAE down blocks − 1) (8 for every SD release)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.vae_scale:
            raise ConfigError(f"resolution={resolution}: must be a multiple of the VAE's scale {self.vae_scale}")
        side = resolution // self.vae_scale
        return (self.unet.config.in_channels, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """c as diffusers' pipelines compute it: SD 1.x/2.x, the text encoder's last hidden state of the
        padded prompt tokens; SDXL, both encoders' penultimate hidden states concatenated, packed with
        the second encoder's pooled projection (:func:`pack_xl_condition`)."""

        def tokens(tokenizer, chunk):
            return tokenizer(
                chunk, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
            ).input_ids.to(self.text_encoder.device)

        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            if not self.is_xl:
                out.append(self.text_encoder(tokens(self.tokenizer, chunk))[0])
                continue
            first = self.text_encoder(tokens(self.tokenizer, chunk), output_hidden_states=True)
            second = self.text_encoder_2(tokens(self.tokenizer_2, chunk), output_hidden_states=True)
            embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            out.append(pack_xl_condition(embeds, second.text_embeds))
        return torch.cat(out)

    def to(self, device: torch.device) -> StableDiffusion:
        """The frozen components on ``device`` (the UNet moves with its denoiser)."""
        for part in self.frozen_parts:
            getattr(self, part).to(device)
        return self

    def null_embedding(self) -> torch.Tensor:
        """∅ (1, L, D): the empty prompt's embedding, or zeros where the folder forces them (SDXL)."""
        empty = self.encode_prompts([""])
        return torch.zeros_like(empty) if self.zeros_for_empty_prompt else empty

    def denoiser(self, unet: torch.nn.Module | None = None) -> TextDenoiser:
        """The teacher (this folder's UNet) or, given ``unet``, a student sharing the schedule and ∅."""
        unet = unet if unet is not None else self.unet
        if self.is_xl:
            return XLTextDenoiser(unet, self.schedule, self.null_embedding(), self.vae_scale)
        return TextDenoiser(unet, self.schedule, self.null_embedding())

    def to_latents(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False, chunk: int = 0
    ) -> torch.Tensor:
        """Pixels in [−1, 1] (B, 3, H, W) → scaled latents: a sample of the VAE posterior, or its mode.
        ``chunk`` > 0: encoded at most that many images at a time, the posterior's noise drawn for the whole
        batch at once (the same latents as ``chunk=0``)."""
        return self.latents_from_moments(self.posterior_moments(pixels, chunk), generator, mode)

    def posterior_moments(self, pixels: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """The VAE posterior's parameters of pixels in [−1, 1]: mean and log-variance concatenated on the
        channels (what ``python -m add_bench.data.coco encode`` stores)."""
        parts = pixels.split(chunk) if 0 < chunk < pixels.shape[0] else [pixels]
        return torch.cat([self.vae.encode(p).latent_dist.parameters for p in parts])

    def latents_from_moments(
        self, moments: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        """Scaled latents from the posterior's parameters: a sample (one noise row per image from
        ``generator``) or the mode."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments)
        if mode:
            return posterior.mode() * self.vae.config.scaling_factor
        # posterior.sample(generator), with one noise row per image (distributed.rows: in a training step over
        # several processes, this process's rows of the global batch's draw)
        from add_bench.distributed import rows

        mean = posterior.mean
        noise = rows(lambda m: torch.randn((m, *mean.shape[1:]), generator=generator, dtype=mean.dtype), len(mean))
        return (mean + posterior.std * noise.to(mean.device)) * self.vae.config.scaling_factor

    def to_pixels(self, latents: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Scaled latents → pixels, ≈ [−1, 1] and not clamped, so that gradients reach every latent
        (the discriminator and the pixel-space distillation loss backpropagate through the decoder);
        ``chunk`` > 0: at most that many samples at a time."""
        z = latents / self.vae.config.scaling_factor
        if 0 < chunk < z.shape[0]:
            return torch.cat([self.vae.decode(part).sample for part in z.split(chunk)])
        return self.vae.decode(z).sample


def _load(cls, folder: Path, subfolder: str):
    path = folder / subfolder
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: missing; a Stable Diffusion folder needs {subfolder}/ "
            "(write one with StableDiffusionPipeline.save_pretrained)"
        )
    try:
        kwargs = {"low_cpu_mem_usage": False} if cls.__module__.startswith("diffusers") else {}  # no accelerate here
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - corrupt or mismatched files: one clear line
        raise CheckpointError(
            f"{path}: cannot load {cls.__name__} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


# The weight files from_pretrained reads from a part's folder, one of (diffusers' and transformers' WEIGHTS_NAME and
# SAFETENSORS_WEIGHTS_NAME / SAFE_WEIGHTS_NAME); sharded: <name>.index.json and the shards its weight_map lists.
# Variants (diffusion_pytorch_model.fp16.safetensors) are not read: load_stable_diffusion asks for none.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# CLIPTokenizer's files: tokenizer.json (what transformers 5 writes), or vocab.json and merges.txt (the releases')
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def missing_files(path: str | Path) -> list[str]:
    """What :func:`load_stable_diffusion` would not find in a diffusers folder (one that has
    ``model_index.json``): each missing part folder, config, weights (with the files accepted), tokenizer file and
    the scheduler config; [] when nothing is missing. Cheap: reads model_index.json and any sharded checkpoint's
    index, loads nothing."""
    folder = Path(path)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        return [f"a readable model_index.json ({type(e).__name__})"]
    xl = bool((index.get("text_encoder_2") or [None])[0]) if isinstance(index, dict) else False
    parts = [("unet", DIFFUSERS_WEIGHTS), ("vae", DIFFUSERS_WEIGHTS), ("text_encoder", TRANSFORMERS_WEIGHTS)]
    parts += [("text_encoder_2", TRANSFORMERS_WEIGHTS)] if xl else []
    out = [] if (folder / "scheduler" / "scheduler_config.json").is_file() else ["scheduler/scheduler_config.json"]
    for part, names in parts:
        if not (folder / part).is_dir():
            out.append(f"{part}/ (its config.json and weights: {' or '.join(names)})")
            continue
        if not (folder / part / "config.json").is_file():
            out.append(f"{part}/config.json")
        out += _missing_weights(folder / part, names)
    for tokenizer in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        if not any(all((folder / tokenizer / name).is_file() for name in files) for files in TOKENIZER_FILES):
            out.append(f"{tokenizer}/ files ({', or '.join(' and '.join(files) for files in TOKENIZER_FILES)})")
    return out


def _missing_weights(part: Path, names: tuple[str, ...]) -> list[str]:
    """[] when ``part`` holds one of ``names``, or a sharded one's index and every shard it lists; else what is missing."""
    if any((part / name).is_file() for name in names):
        return []
    for index in (part / f"{name}.index.json" for name in names):
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return [f"{part.name}/{index.name} readable, with a weight_map ({type(e).__name__})"]
        missing = [f"{part.name}/{shard}" for shard in shards if not (part / shard).is_file()]
        return missing[:3] + [f"{len(missing) - 3} more shard(s) {index.name} lists"] * (len(missing) > 3)
    accepted = " or ".join(names) + ", or sharded: " + " or ".join(f"{name}.index.json" for name in names)
    return [f"{part.name}/ weights ({accepted} with the shards it lists)"]


def load_stable_diffusion(path: str | Path, zero_terminal_snr: bool | None = None) -> StableDiffusion:
    """Load a local Stable Diffusion (1.x, 2.x, XL base) folder; ``zero_terminal_snr`` None = on for
    v-prediction models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        known = ", ".join(f"{k} ({hub_id})" for k, hub_id in SD_MODELS.items())
        raise CheckpointError(
            f"{folder}: not a diffusers Stable Diffusion folder (no model_index.json); "
            f"download one of {known} and pass its local path"
        )
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise CheckpointError(f"{sched_file}: missing")
    sched = json.loads(sched_file.read_text())
    index = json.loads((folder / "model_index.json").read_text())
    xl = bool((index.get("text_encoder_2") or [None])[0])
    if xl and not (index.get("text_encoder") or [None])[0]:
        raise ConfigError(
            f"{folder}: an SDXL folder without text_encoder (the refiner) cannot generate from "
            "noise; accepted: SD 1.x / 2.x / SDXL base folders"
        )
    if zero_terminal_snr is None:
        zero_terminal_snr = sched.get("prediction_type", "epsilon") == "v_prediction"
    schedule = Schedule(schedule_config(sched, zero_terminal_snr, str(sched_file)))
    unet = _load(UNet2DConditionModel, folder, "unet")
    embed_type = getattr(unet.config, "addition_embed_type", None)
    if embed_type != ("text_time" if xl else None):
        raise ConfigError(
            f"{folder}/unet: addition_embed_type={embed_type!r} with "
            f"{'two text encoders' if xl else 'one text encoder'}; accepted: None (SD 1.x / 2.x) "
            "or 'text_time' with text_encoder_2 (SDXL)"
        )
    vae = _load(AutoencoderKL, folder, "vae")
    text_encoder = _load(CLIPTextModel, folder, "text_encoder")
    tokenizer = _load(CLIPTokenizer, folder, "tokenizer")
    text_encoder_2 = _load(CLIPTextModelWithProjection, folder, "text_encoder_2") if xl else None
    tokenizer_2 = _load(CLIPTokenizer, folder, "tokenizer_2") if xl else None
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.eval().requires_grad_(False)
    return StableDiffusion(
        folder,
        unet,
        vae,
        text_encoder,
        tokenizer,
        schedule,
        text_encoder_2,
        tokenizer_2,
        zeros_for_empty_prompt=xl and bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def pixels_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [−1, 1] → uint8 (B, H, W, 3)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
