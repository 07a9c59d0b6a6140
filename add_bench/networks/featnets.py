"""Frozen feature networks F for the discriminator, and a registry of them.

A feature network maps images in model range [-1, 1], (N, C, H, W), to K token-feature tensors
F_k(x), each (N, D_k, L) channels-first (ready for the Conv1d discriminator heads), taken after the
patch embedding (layer 0) and after chosen transformer blocks (layer i = output of block i, 1-based).
As in StyleGAN-T the CLS token is added to every patch token and then dropped (L = number of patches).
``cls_embedding(x)`` is the final normalised CLS embedding, used as the image conditioning c_img.

The weights are frozen (no parameter gets a gradient, the network stays in eval mode), but gradients
flow through it to the input: the generator loss back-propagates through F into the student.

Two families:
  * embedded ViTs for 28×28 Fashion-MNIST (timm ``VisionTransformer``, patch 4 → 49 patches), trained by
    ``python -m add_bench.pretrain featnet <name>`` and shipped in ``add_bench/weights/featnet_<name>/``;
    ``random`` is the same architecture with frozen random weights (a floor);
  * the paper's networks (cluster): timm DINOv1 / DINOv2 ViTs and the open_clip ViT-L/14 image tower,
    loaded from a local weights file (``weights=...``) or, when None, from their hub.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from add_bench.config import choose
from add_bench.errors import CheckpointError, ConfigError


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class FeatNetSpec:
    """One named feature network. ``kind``: embedded | timm | open_clip."""

    kind: str
    arch: Any  # embedded: VisionTransformer kwargs; timm / open_clip: model name
    layers: tuple[int, ...]
    img_size: int | None = None  # cluster: input resolution the images are resized to
    objective: str = ""  # embedded: dino | clip | none
    seed: int = 0  # random: the fixed seed of its weights
    hub_tag: str | None = None  # open_clip: pretrained tag used when no local weights file is given


EMBEDDED_VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=0, dynamic_img_size=True)
VIT_S = dict(EMBEDDED_VIT, embed_dim=64, depth=6, num_heads=4)
VIT_L = dict(EMBEDDED_VIT, embed_dim=128, depth=8, num_heads=4)

# Layers: StyleGAN-T hooks timm's blocks[2, 5, 8, 11] (0-based) of a 12-block ViT-S plus the patch
# embedding, i.e. [0, 3, 6, 9, 12] in this module's 1-based convention (the last block included).
FEATURE_NETWORKS: dict[str, FeatNetSpec] = {
    "dino_s": FeatNetSpec("embedded", VIT_S, (0, 2, 4, 6), objective="dino"),
    "dino_l": FeatNetSpec("embedded", VIT_L, (0, 2, 5, 8), objective="dino"),
    "clip_s": FeatNetSpec("embedded", VIT_S, (0, 2, 4, 6), objective="clip"),
    "random": FeatNetSpec("embedded", VIT_S, (0, 2, 4, 6), objective="none", seed=0),
    "dinov1_vits16": FeatNetSpec("timm", "vit_small_patch16_224.dino", (0, 3, 6, 9, 12), img_size=224),
    "dinov2_vits14": FeatNetSpec("timm", "vit_small_patch14_dinov2.lvd142m", (0, 3, 6, 9, 12), img_size=224),
    "dinov2_vitl14": FeatNetSpec("timm", "vit_large_patch14_dinov2.lvd142m", (0, 6, 12, 18, 24), img_size=224),
    "openclip_vitl14": FeatNetSpec(
        "open_clip", "ViT-L-14", (0, 6, 12, 18, 24), img_size=224, hub_tag="laion2b_s32b_b82k"
    ),
}

PRETRAIN_HINT = "python -m add_bench.pretrain featnet {name}"


# ------------------------------------------------------------------------------------ interface
class FeatureNetwork(nn.Module):
    """Frozen feature network F: ``forward(x) -> [F_k(x)]`` (N, D_k, L), CLS added to each patch token.

    ``dims``: channels of each feature level (the discriminator heads' widths); ``cls_dim``: width of
    ``cls_embedding`` (c_img). Subclasses set ``self.body`` (a network with ``forward_intermediates``)
    and implement ``embedding`` (the module whose output, prefix tokens first, enters block 1),
    ``blocks`` and ``cls_embedding``.
    """

    num_prefix_tokens = 1  # CLS first, then any register tokens

    def __init__(
        self,
        layers: Sequence[int],
        depth: int,
        width: int,
        cls_dim: int,
        in_chans: int,
        img_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.layers = check_layers(layers, depth)
        self.depth, self.dims, self.cls_dim = depth, [width] * len(self.layers), cls_dim
        self.in_chans, self.img_size = in_chans, img_size
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def freeze(self) -> FeatureNetwork:
        return self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FeatureNetwork:
        return super().train(False)  # always eval: frozen, no dropout, no batch statistics

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model range [-1, 1] → the network's input: channels, resolution and normalisation."""
        c = x.shape[1]
        if c != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1) if c == 1 else x.mean(1, keepdim=True)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(
                x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True, align_corners=False
            )
        if self.mean is not None:
            x = ((x + 1) / 2 - self.mean) / self.std
        return x

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Tokens (N, P+L, D) → (N, D, L): CLS added to every patch token, prefix tokens dropped."""
        return (h[:, self.num_prefix_tokens :] + h[:, :1]).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # A hook reads each chosen layer out as its module returns, so the readouts enter the graph in
        # block order and the input gradient sums its terms as a block-by-block loop would (same rounding).
        feats: list[torch.Tensor] = []
        hooks = [
            m.register_forward_hook(lambda module, args, out: feats.append(self.readout(out)))
            for m in self.layer_modules()
        ]
        try:
            self.run(self.preprocess(x), max(self.layers[-1], 1))  # layer 0 alone: block 1 runs too
        finally:
            for hook in hooks:
                hook.remove()
        return feats

    def layer_modules(self) -> list[nn.Module]:
        """The modules whose outputs are ``self.layers``: the embedding (0) and block i (1-based)."""
        blocks = self.blocks()
        return [blocks[i - 1] if i else self.embedding() for i in self.layers]

    def run(self, x: torch.Tensor, last_block: int) -> None:
        """The network's forward up to block ``last_block`` (1-based), by timm's and open_clip's public
        ``forward_intermediates``; its return value is not needed, the hooks have read the layers."""
        self.body.forward_intermediates(
            x, indices=[last_block - 1], stop_early=True, output_fmt="NLC", intermediates_only=True
        )

    # to implement
    def embedding(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def cls_embedding(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
    layers = sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] > depth:
        raise ConfigError(
            f"feature_network.layers={list(layers)}: need a non-empty list of ints in 0..{depth} "
            f"(0 = patch embedding, i = output of block i)"
        )
    return layers


class TimmFeatures(FeatureNetwork):
    """A timm ``VisionTransformer`` as feature network (embedded ViTs and the DINO ViTs)."""

    def __init__(self, vit: nn.Module, layers: Sequence[int], mean=None, std=None):
        super().__init__(
            layers,
            len(vit.blocks),
            vit.embed_dim,
            vit.num_features,
            vit.patch_embed.proj.in_channels,
            vit.patch_embed.img_size[0],
            mean,
            std,
        )
        self.body = vit
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.freeze()

    def embedding(self) -> nn.Module:
        return self.body.norm_pre  # after patch embedding, prefix tokens, positions and patch dropout

    def blocks(self) -> Sequence[nn.Module]:
        return self.body.blocks

    def cls_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(x))  # num_classes=0: the final-norm CLS token


class OpenClipFeatures(FeatureNetwork):
    """The image tower of an open_clip CLIP ViT; ``cls_embedding`` is the projected image embedding."""

    def __init__(self, visual: nn.Module, layers: Sequence[int], mean, std):
        super().__init__(
            layers,
            len(visual.transformer.resblocks),
            visual.conv1.out_channels,
            visual.output_dim,
            3,
            visual.image_size[0],
            mean,
            std,
        )
        self.body = visual
        self.freeze()

    def embedding(self) -> nn.Module:
        return self.body.ln_pre  # after conv patches, CLS, positions and patch dropout

    def blocks(self) -> Sequence[nn.Module]:
        return self.body.transformer.resblocks  # batch-first (N, 1+L, D), as open_clip builds image towers

    def cls_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(x))


# ------------------------------------------------------------------------------------ building
def build_feature_network(name: str, weights: str | None = None, layers: Sequence[int] | None = None) -> FeatureNetwork:
    """The named feature network, frozen.

    ``weights``: embedded networks: a weights folder (default the shipped ``featnet_<name>``);
    cluster networks: a local weights file (default: the hub, unreachable offline).
    ``layers``: default the registry's (StyleGAN-T style: patch embedding + 4 blocks).
    """
    spec = choose(FEATURE_NETWORKS, name, "feature_network.name")
    layers = list(spec.layers if layers is None else layers)
    if spec.kind == "embedded":
        return TimmFeatures(load_embedded_vit(name, weights), layers)
    if spec.kind == "timm":
        vit = load_timm_vit(spec.arch, weights, spec.img_size)
        cfg = vit.pretrained_cfg
        return TimmFeatures(vit, layers, cfg["mean"], cfg["std"])
    visual, mean, std = load_open_clip_visual(spec.arch, weights if weights is not None else spec.hub_tag)
    return OpenClipFeatures(visual, layers, mean, std)


def make_vit(arch: dict[str, Any]) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**arch)


def random_vit(arch: dict[str, Any], seed: int) -> nn.Module:
    """A ViT with weights drawn from a fixed seed (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_vit(arch)


def featnet_folder(name: str, weights: str | Path | None = None) -> Path:
    from add_bench.provenance import resolve_weights

    return resolve_weights(weights if weights is not None else f"featnet_{name}")


def load_embedded_vit(name: str, weights: str | Path | None = None) -> nn.Module:
    """An embedded ViT: ``random`` from its seed, otherwise the ``vit.*`` weights of a featnet folder."""
    spec = choose(FEATURE_NETWORKS, name, "feature_network.name")
    if spec.objective == "none" and weights is None:
        return random_vit(spec.arch, spec.seed)
    folder = featnet_folder(name, weights)
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"{folder / 'model.safetensors'}: no weights for feature network {name!r}; "
            f"train them with `{PRETRAIN_HINT.format(name=name)}`"
        )
    from add_bench.networks.unets import load_state, read_card

    card = read_card(folder)
    vit = make_vit(card.get("arch", spec.arch))
    state = {k[4:]: v for k, v in load_state(folder).items() if k.startswith("vit.")}
    try:
        vit.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weights do not fit the ViT ({str(e).splitlines()[0][:160]})") from None
    return vit


def check_file(path: str | Path | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise CheckpointError(f"{path}: {what} weights file not found")


def load_timm_vit(model_name: str, weights: str | Path | None, img_size: int | None = None) -> nn.Module:
    """A timm ViT from a local file (``pretrained_cfg_overlay=dict(file=...)``) or, if None, its hub."""
    import timm

    check_file(weights, model_name)
    kwargs: dict[str, Any] = dict(num_classes=0)
    if img_size:
        kwargs["img_size"] = img_size  # DINOv2's 518 → 224: the position embedding is resampled on load
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - torch/safetensors/hub raise many types
        where = weights if weights is not None else f"the hub ({model_name})"
        hint = "" if weights is not None else "; offline, pass a local weights file (feature_network.weights)"
        raise CheckpointError(
            f"{where}: cannot load {model_name} weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}){hint}"
        ) from None


def load_open_clip_visual(model_name: str, weights: str | Path) -> tuple[nn.Module, Any, Any]:
    """The image tower of ``open_clip.create_model(model_name, pretrained=weights)`` and its mean/std.

    ``weights``: a local file, or an open_clip pretrained tag (downloads; unreachable offline).
    """
    import open_clip

    is_tag = isinstance(weights, str) and weights in open_clip.list_pretrained_tags_by_model(model_name)
    if not is_tag:
        check_file(weights, model_name)
    try:
        model = open_clip.create_model(model_name, pretrained=str(weights), require_pretrained=True)
    except Exception as e:  # noqa: BLE001
        hint = "; offline, pass a local weights file (feature_network.weights)" if is_tag else ""
        raise CheckpointError(
            f"{weights}: cannot load open_clip {model_name} weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}){hint}"
        ) from None
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return visual, tuple(mean), tuple(std)


# ------------------------------------------------------------------------------------ clip_s
def prompt_words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9\-]+", prompt.lower())


def prompt_vocab(prompts: Sequence[str]) -> list[str]:
    """Word-level vocabulary of the class prompts; index 0 is the unknown word."""
    return ["<unk>"] + sorted({w for p in prompts for w in prompt_words(p)})


class TextTower(nn.Module):
    """clip_s text tower: word embeddings of a prompt, mean-pooled, then a linear map to the joint space."""

    def __init__(self, vocab: Sequence[str], width: int, embed_dim: int):
        super().__init__()
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.words = nn.EmbeddingBag(len(self.vocab), width, mode="mean")
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = [torch.tensor([self.index.get(w, 0) for w in prompt_words(p)] or [0]) for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.proj(self.words(torch.cat(ids), offsets))


class ClipS(nn.Module):
    """clip_s: image tower = ViT CLS embedding + linear projection; text tower = ``TextTower``."""

    def __init__(self, arch: dict[str, Any], vocab: Sequence[str], embed_dim: int = 64):
        super().__init__()
        self.vit = make_vit(arch)
        self.img_proj = nn.Linear(arch["embed_dim"], embed_dim)
        self.text = TextTower(vocab, arch["embed_dim"], embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.tensor(1 / 0.07).log())))

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.img_proj(self.vit(x)), dim=-1)

    def text_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.text(prompts), dim=-1)


def load_clip_s(weights: str | Path | None = None, name: str = "clip_s") -> ClipS:
    from add_bench.networks.unets import load_into, read_card

    folder = featnet_folder(name, weights)
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"{folder / 'model.safetensors'}: no weights for {name!r}; "
            f"train them with `{PRETRAIN_HINT.format(name=name)}`"
        )
    card = read_card(folder)
    if card.get("objective") != "clip":
        raise CheckpointError(f"{folder / 'card.json'}: objective {card.get('objective')!r}, expected 'clip'")
    return load_into(ClipS(card["arch"], card["vocab"], card["clip_embed_dim"]), folder).eval().requires_grad_(False)


# ------------------------------------------------------------------------ c_text: text towers by name
# The discriminator's c_text. Embedded: clip_s's text tower over the 10 class prompts (a fixed table,
# ``prompt_embeddings``). Cluster: an open_clip text tower applied to each caption (the paper: ViT-g-14).
TEXT_ENCODERS: dict[str, tuple[str, str | None]] = {
    "clip_s": ("embedded", None),
    "openclip_vitg14": ("ViT-g-14", "laion2b_s34b_b88k"),  # the paper's
    "openclip_vitl14": ("ViT-L-14", "laion2b_s32b_b82k"),
    "openclip_vits32": ("ViT-S-32", None),  # small, for smoke tests with random weights
}


class OpenClipText(nn.Module):
    """prompts → L2-normalised open_clip text embeddings (B, E), frozen."""

    def __init__(self, model_name: str, weights: str | Path | None, hub_tag: str | None = None):
        super().__init__()
        import open_clip

        source = weights if weights is not None else hub_tag
        if source is None:
            raise CheckpointError(
                f"discriminator.c_text_weights is unset and {model_name} has no pretrained tag; "
                "accepted: a local open_clip weights file"
            )
        check_file(weights, f"{model_name} text tower (discriminator.c_text_weights)")
        try:
            model = open_clip.create_model(model_name, pretrained=str(source), require_pretrained=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{source}: cannot load open_clip {model_name} weights ({type(e).__name__}); "
                "offline, pass a local weights file (discriminator.c_text_weights)"
            ) from None
        model.visual = None  # the image tower is not needed for c_text
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(next(self.model.parameters()).device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)


def build_text_encoder(name: str, weights: str | Path | None = None) -> OpenClipText:
    """A cluster text tower for c_text by name (``TEXT_ENCODERS``); weights from a local file."""
    arch, hub_tag = choose(TEXT_ENCODERS, name, "discriminator.c_text_network")
    if arch == "embedded":
        raise ConfigError(
            f"discriminator.c_text_network={name!r} embeds the 10 Fashion-MNIST prompts only; with a "
            f"Stable Diffusion teacher accepted: {', '.join(k for k in TEXT_ENCODERS if k != name)}"
        )
    return OpenClipText(arch, weights, hub_tag)


@torch.no_grad()
def prompt_embeddings(name: str = "clip_s", weights: str | Path | None = None) -> torch.Tensor:
    """The fixed c_text of the 10 class prompts, (10, E), L2-normalised, from clip_s's text tower.

    The embedded stand-in for ADD's CLIP-ViT-g text embedding; row i is class i's prompt.
    """
    from add_bench.data import PROMPTS

    return load_clip_s(weights, name).text_embedding(PROMPTS)
