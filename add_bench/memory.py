"""GPU memory and GPU-hours of one ADD cell, estimated from its model folders' configs (no weights are read).

Nothing here has run on a GPU: the numbers are an estimate for planning (``python -m add_bench.sweep ...
--dry-run --gpu A100-80GB``), from three kinds of inputs:

1. Parameter counts of every network a training step holds, each built from its config on PyTorch's ``meta``
   device (shapes only, no memory): the student and teacher UNets, the VAE(s) and text encoder(s) of the
   Stable Diffusion folders (``unet/``, ``vae/``, ``text_encoder*/config.json``), the feature network F and the
   c_img network (timm / embedded ViTs by name), the c_text tower (open_clip's text config) and the
   discriminator heads.
2. Per-sample costs of each network pass, measured by running the pass on the ``meta`` device at the cell's
   resolution: activations = the bytes of the tensors autograd saves for the backward pass (parameters
   left out; attention saved as a fused kernel saves it — q, k, v and the output, no N×N matrix — as
   PyTorch's flash / memory-efficient attention does on a GPU), and forward FLOPs
   (``torch.utils.flop_counter``). With gradient checkpointing the saved tensors are measured with
   diffusers' checkpointing on, plus the recomputation of the largest checkpointed block in the backward pass.
3. The named constants below (bytes per parameter by role, CUDA context, allocator overhead, bf16's share of
   activations, the GPUs' peak throughput and the share of it a step reaches).

Memory of one process (one GPU), the peak of a step::

    fixed     = 20·P_student + 16·P_heads + 4·P_frozen + CUDA_CONTEXT
    per_sample = A_student + A_decoder + A_features     (fp32 saved activations; under bf16 × BF16_*_ACTIVATIONS)
    peak      = (fixed + micro_batch · per_sample) · ALLOCATOR_OVERHEAD

with micro_batch = ``micro_batch_size`` (0: the batch). Time::

    seconds_per_step = batch · FLOPs_per_sample / (peak FLOP/s of the GPU at the precision · MFU)

FLOPs_per_sample counts the student's forward and backward (3× forward; 4× with checkpointing), the decoder
x̂θ goes through (the same), F on the fakes (3×) and on the reals (1×), c_img (1×), the teacher (its CFG
batch, steps), the target's decode and the real image's encode. The text encoders and the heads are left out
(under 1% of a step). GPU-hours = steps · seconds_per_step / 3600: training only, evaluation not included.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from add_bench.errors import ConfigError

GIB = 2**30

# bytes per parameter by role (fp32 master weights under any precision)
STUDENT_BYTES_PER_PARAM = 20  # weights 4 + gradients 4 + Adam m, v 8 + EMA 4
HEADS_BYTES_PER_PARAM = 16  # weights 4 + gradients 4 + Adam m, v 8 (no EMA)
FROZEN_BYTES_PER_PARAM = 4  # fp32 weights (autocast casts them per pass; nothing stored in bf16)
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuDNN / cuBLAS workspaces
ALLOCATOR_OVERHEAD = 1.15  # caching-allocator fragmentation and short-lived tensors of a pass, on top of the sum
# saved activations under bf16 autocast relative to fp32 (conv / matmul inputs are saved in bf16, normalisation
# inputs in fp32), measured with saved-tensor hooks under CPU autocast on a 4-level SD-like UNet (64–256
# channels, 32×32 latents) and a 4-level VAE decoder: 0.81 and 0.52
BF16_UNET_ACTIVATIONS = 0.81  # also taken for the feature network (a ViT)
BF16_DECODER_ACTIVATIONS = 0.52
MFU = 0.35  # share of a GPU's peak a training step reaches (diffusion UNet training reports ≈ 0.3–0.45)


@dataclass(frozen=True)
class Gpu:
    memory_gib: float  # memory torch can allocate (the card's, e.g. 80 GiB)
    fp32_tflops: float  # dense fp32 peak without tensor cores (PyTorch leaves TF32 matmuls off by default)
    bf16_tflops: float  # dense bf16 tensor-core peak


# vendor datasheet peaks (dense, no sparsity)
GPUS: dict[str, Gpu] = {
    "A100-40GB": Gpu(40, 19.5, 312),
    "A100-80GB": Gpu(80, 19.5, 312),
    "H100-80GB": Gpu(80, 67, 989),  # SXM
    "L40S-48GB": Gpu(48, 91.6, 362),
}


def gpu(name: str, key: str = "--gpu") -> Gpu:
    from add_bench.config import choose

    return choose(GPUS, name, key)


# ------------------------------------------------------------------------------ per-network costs
@dataclass(frozen=True)
class Pass:
    """One network at one input size: its parameters, the fp32 activations one sample's training forward
    saves (``activations``; ``checkpointed``: with gradient checkpointing), and one sample's forward FLOPs."""

    params: int
    activations: int = 0
    checkpointed: int = 0
    flops: int = 0


class _FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention saving what a fused GPU kernel saves: q, k, v and the output."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):
        with torch.no_grad():
            out = _SDPA(q, k, v, **kwargs)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - shapes only, never run
        q, k, v, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fused_sdpa(q, k, v, *args, **kwargs):
    names = ("attn_mask", "dropout_p", "is_causal", "scale")
    kwargs |= dict(zip(names, args))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _FusedAttention.apply(q, k, v, kwargs)
    return _SDPA(q, k, v, **kwargs)


def measure(module: torch.nn.Module, run: Callable[[torch.nn.Module], Any], grad: bool = True) -> tuple[int, int]:
    """(saved activation bytes, forward FLOPs) of ``run(module)`` on the meta device, one sample."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    params = {id(p) for p in module.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params and t.dtype.is_floating_point:
            saved[id(t)] = t
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if grad else contextlib.nullcontext()
    with (
        mock.patch("torch.nn.functional.scaled_dot_product_attention", _fused_sdpa),
        FlopCounterMode(display=False) as flops,
        hooks,
        torch.set_grad_enabled(grad),
    ):
        run(module)
    return sum(t.numel() * t.element_size() for t in saved.values()), int(flops.get_total_flops())


def measured_pass(
    build: Callable[[], torch.nn.Module],
    run: Callable[[torch.nn.Module], Any],
    grad: bool,
    checkpoint: str | None,
    trainable: bool = False,
) -> Pass:
    """A :class:`Pass` of the module ``build()`` makes (on the meta device). ``grad``: a training pass (the input
    requires grad); ``trainable``: so do its parameters (the student); ``checkpoint``: the attribute of the module
    whose diffusers gradient checkpointing is measured too (``""``: the module itself; None: none)."""
    with torch.device("meta"):
        module = build().requires_grad_(trainable)
        params = sum(p.numel() for p in module.parameters())
        if not grad:
            return Pass(params, flops=measure(module, run, grad=False)[1])
        activations, flops = measure(module, run)
        checkpointed = activations
        target = None if checkpoint is None else (getattr(module, checkpoint) if checkpoint else module)
        if target is not None and getattr(target, "_supports_gradient_checkpointing", False):
            inputs, blocks = [0], [0]

            def counting(block, *args, **kwargs):  # a checkpointed block keeps its inputs, saves nothing inside
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                inputs[0] += sum(t.numel() * t.element_size() for t in tensors if t.dtype.is_floating_point)
                blocks[0] = max(blocks[0], measure(block, lambda b: b(*args, **kwargs))[0])
                return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, **kwargs)

            target.enable_gradient_checkpointing(counting)
            stored, _ = measure(module, run)
            checkpointed = stored + inputs[0] + blocks[0]  # + the largest block, recomputed in the backward pass
    return Pass(params, activations, checkpointed, flops)


def _config(folder: Path, part: str) -> dict[str, Any]:
    path = folder / part / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; the memory estimate reads the configs of a Stable Diffusion folder")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


@functools.cache
def unet_pass(folder: str, side: int, grad: bool) -> Pass:
    """The UNet of a Stable Diffusion folder (its config) on one latent of side ``side``."""
    from diffusers import UNet2DConditionModel

    cfg = _config(Path(folder), "unet")
    tokens = _max_length(Path(folder))
    xl = cfg.get("addition_embed_type") == "text_time"  # SDXL: a pooled text embedding and 6 size ids

    def run(unet):
        x = torch.zeros(1, cfg["in_channels"], side, side, requires_grad=grad)
        c = torch.zeros(1, tokens, cfg["cross_attention_dim"])
        extra = {}
        if xl:
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}}
        return unet(x, torch.zeros(1), encoder_hidden_states=c, **extra).sample

    return measured_pass(lambda: UNet2DConditionModel.from_config(cfg), run, grad, "", trainable=grad)


@functools.cache
def embedded_unet_pass(folder: str, grad: bool) -> Pass:
    """An embedded (class-conditional) UNet of a weights folder (its card) on one 1×28×28 image."""
    from add_bench.networks.unets import build_unet, read_card

    card = read_card(Path(folder))

    def run(unet):
        return unet(torch.zeros(1, 1, 28, 28, requires_grad=grad), torch.zeros(1), class_labels=torch.zeros(1).long())

    return measured_pass(lambda: build_unet(card["unet"]), run, grad, "unet", trainable=grad)


@functools.cache
def vae_passes(folder: str, resolution: int) -> tuple[Pass, Pass]:
    """(decode with gradient of one latent, encode of one image) of a folder's VAE at ``resolution`` pixels;
    the VAE's parameters are counted once, in the decode."""
    from diffusers import AutoencoderKL

    cfg = _config(Path(folder), "vae")
    side = resolution // 2 ** (len(cfg["block_out_channels"]) - 1)
    z = cfg.get("latent_channels", 4)
    decode = measured_pass(
        lambda: AutoencoderKL.from_config(cfg),
        lambda v: v.decode(torch.zeros(1, z, side, side, requires_grad=True)),
        True,
        "",
    )
    encode = measured_pass(
        lambda: AutoencoderKL.from_config(cfg),
        lambda v: v.encode(torch.zeros(1, 3, resolution, resolution)),
        False,
        None,
    )
    return decode, Pass(0, flops=encode.flops)


def _max_length(folder: Path) -> int:
    path = folder / "tokenizer" / "tokenizer_config.json"
    return int(json.loads(path.read_text()).get("model_max_length", 77)) if path.is_file() else 77


@functools.cache
def text_encoder_params(folder: str) -> int:
    """Parameters of a Stable Diffusion folder's text encoder(s)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for part, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if (Path(folder) / part / "config.json").is_file():
            with torch.device("meta"):
                model = cls(CLIPTextConfig.from_pretrained(Path(folder) / part))
            total += sum(p.numel() for p in model.parameters())
    return total


def vision_input(name: str) -> tuple[int, int]:
    """(channels, side) of a feature network's input: its resolution (timm, open_clip) or the embedded 28 px."""
    from add_bench.networks.featnets import FEATURE_NETWORKS

    spec = FEATURE_NETWORKS[name]
    if spec.kind == "embedded":
        return spec.arch.get("in_chans", 1), spec.arch.get("img_size", 28)
    return 3, spec.img_size or 224


def _vision_module(name: str) -> torch.nn.Module:
    from add_bench.networks.featnets import FEATURE_NETWORKS, make_vit

    spec = FEATURE_NETWORKS[name]
    if spec.kind == "embedded":
        return make_vit(spec.arch)
    if spec.kind == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=spec.img_size)
    import open_clip

    return open_clip.create_model(spec.arch, device="meta").visual


@functools.cache
def vision_pass(name: str, grad: bool) -> Pass:
    """A feature network by name (add_bench.networks.featnets) on one image at its input size."""
    channels, side = vision_input(name)
    return measured_pass(
        lambda: _vision_module(name), lambda m: m(torch.zeros(1, channels, side, side, requires_grad=grad)), grad, None
    )


@functools.cache
def vision_width(name: str) -> int:
    """The token width of a feature network (each feature level's channels and its CLS embedding's)."""
    with torch.device("meta"):
        module = _vision_module(name)
    return int(getattr(module, "embed_dim", 0) or module.transformer.width)


def open_clip_text(model_name: str) -> tuple[int, int]:
    """(parameters, embedding width) of an open_clip text tower, from its config: token and position embeddings,
    ``layers`` residual blocks of 12·w² + 13·w (attention 4w² + 4w, MLP 8w² + 5w, two layer norms 4w), the final
    layer norm 2w and the projection w·embed_dim."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    t, w = cfg["text_cfg"], cfg["text_cfg"]["width"]
    vocab, ctx = t.get("vocab_size", 49408), t.get("context_length", 77)
    params = vocab * w + ctx * w + t["layers"] * (12 * w * w + 13 * w) + 2 * w + w * cfg["embed_dim"]
    return params, cfg["embed_dim"]


def heads_params(dims: list[int], c_dim: int, cmap_dim: int, minibatch_std: int) -> int:
    """Parameters of the discriminator heads (add_bench.networks.discriminator) on features of widths ``dims``."""
    from add_bench.networks.discriminator import Discriminator

    with torch.device("meta"):
        heads = Discriminator(dims, c_dim, 0, c_dim > 0, False, cmap_dim, minibatch_std)
    return sum(p.numel() for p in heads.parameters())


# ------------------------------------------------------------------------------ one cell
@dataclass
class CellEstimate:
    """The estimate of one cell on one GPU (bytes, FLOPs, seconds); ``parts``: each term, for the plan's notes."""

    fixed: float
    per_sample: float
    micro_batch: int
    peak: float
    flops_per_step: float
    seconds_per_step: float
    gpu_hours: float
    parts: dict[str, float] = field(default_factory=dict)


def estimate(cfg: Any, gpu_name: str) -> CellEstimate:
    """The memory and time of the ADD cell ``cfg`` (a resolved TrainConfig) on one ``gpu_name``."""
    from add_bench.provenance import resolve_weights

    card = gpu(gpu_name)
    dcfg = cfg.discriminator
    s_folder, t_folder = resolve_weights(cfg.student.network), resolve_weights(cfg.teacher.network)
    sd = (s_folder / "model_index.json").is_file()
    frozen: dict[str, int] = {}
    res = cfg.coco.resolution
    if sd:
        decode, encode = vae_passes(str(s_folder), res)
        side = res // 2 ** (len(_config(s_folder, "vae")["block_out_channels"]) - 1)
        student, teacher = unet_pass(str(s_folder), side, True), unet_pass(str(t_folder), side, False)
        frozen["vae"], frozen["text encoders"] = decode.params, text_encoder_params(str(s_folder))
        bridge = t_folder.resolve() != s_folder.resolve()
        if bridge:  # the teacher's own VAE (its encode and decode) and text encoders
            t_decode, t_encode = vae_passes(str(t_folder), res)
            t_side = res // 2 ** (len(_config(t_folder, "vae")["block_out_channels"]) - 1)
            teacher = unet_pass(str(t_folder), t_side, False)
            frozen["teacher vae"] = t_decode.params
            frozen["teacher text encoders"] = text_encoder_params(str(t_folder))
        target_decode = (t_decode if bridge else decode).flops + (t_encode.flops if bridge else 0)
    else:
        student, teacher = embedded_unet_pass(str(s_folder), True), embedded_unet_pass(str(t_folder), False)
        decode, encode, target_decode = Pass(0), Pass(0), 0
    frozen["teacher unet"] = teacher.params
    features = vision_pass(cfg.feature_network.name, True)
    frozen["feature network"] = features.params
    c_dim, c_img_flops = 0, 0
    if dcfg.c_img:
        same = (dcfg.c_img_network, dcfg.c_img_weights) == (cfg.feature_network.name, cfg.feature_network.weights)
        c_img = vision_pass(dcfg.c_img_network, False)
        frozen["c_img network"] = 0 if same else c_img.params
        c_dim += vision_width(dcfg.c_img_network)
        c_img_flops = c_img.flops
    if dcfg.c_text and sd:
        from add_bench.networks.featnets import TEXT_ENCODERS

        params, width = open_clip_text(TEXT_ENCODERS[dcfg.c_text_network][0])
        frozen["c_text tower"] = params
        c_dim += width
    elif dcfg.c_text:  # the embedded class-prompt table's width (clip_s's card)
        from add_bench.networks.featnets import featnet_folder
        from add_bench.networks.unets import read_card

        c_dim += int(read_card(featnet_folder(dcfg.c_text_network, dcfg.c_text_weights))["clip_embed_dim"])
    layers = cfg.feature_network.layers
    if layers is None:
        from add_bench.networks.featnets import FEATURE_NETWORKS

        layers = FEATURE_NETWORKS[cfg.feature_network.name].layers
    heads = heads_params(
        [vision_width(cfg.feature_network.name)] * len(layers), c_dim, dcfg.cmap_dim, dcfg.minibatch_std
    )

    ckpt, bf16 = cfg.gradient_checkpointing, cfg.precision == "bf16"
    decoded = sd and (cfg.loss.adversarial or (cfg.loss.distillation and cfg.loss.space == "pixel"))
    unet_share, decoder_share = (BF16_UNET_ACTIVATIONS, BF16_DECODER_ACTIVATIONS) if bf16 else (1.0, 1.0)
    per_sample = unet_share * (student.checkpointed if ckpt else student.activations)
    per_sample += decoder_share * (decode.checkpointed if ckpt else decode.activations) if decoded else 0
    per_sample += unet_share * features.activations if cfg.loss.adversarial else 0
    fixed = (
        STUDENT_BYTES_PER_PARAM * student.params
        + HEADS_BYTES_PER_PARAM * heads
        + FROZEN_BYTES_PER_PARAM * sum(frozen.values())
        + CUDA_CONTEXT_BYTES
    )
    micro = cfg.micro_batch_size or cfg.batch_size
    peak = (fixed + micro * per_sample) * ALLOCATOR_OVERHEAD

    backward = 4 if ckpt else 3  # forward + backward (2×) [+ the recomputed forward]
    flops = backward * student.flops + (backward * decode.flops if decoded else 0) + encode.flops
    if cfg.loss.adversarial:
        flops += 3 * features.flops + features.flops + c_img_flops  # F on the fakes (fwd + bwd), on the reals
        extra = cfg.discriminator.steps - 1  # each: the student, the decode and F on fresh fakes and on the reals
        flops += extra * (student.flops + (decode.flops if sd else 0) + 2 * features.flops)
    if cfg.loss.distillation:
        evaluations = (
            3 if cfg.loss.weighting == "nfsd" else cfg.teacher.steps * (1 if cfg.teacher.cfg_scale == 1 else 2)
        )
        flops += evaluations * teacher.flops + (target_decode if cfg.loss.space == "pixel" else 0)
    flops_per_step = cfg.batch_size * flops
    peak_flops = (card.bf16_tflops if cfg.precision == "bf16" else card.fp32_tflops) * 1e12
    seconds = flops_per_step / (peak_flops * MFU)
    parts = {"student params": student.params, "heads params": heads} | {f"{k} params": v for k, v in frozen.items()}
    return CellEstimate(fixed, per_sample, micro, peak, flops_per_step, seconds, cfg.steps * seconds / 3600, parts)
