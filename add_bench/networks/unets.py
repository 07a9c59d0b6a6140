"""Teacher and student UNets: class-conditional diffusers ``UNet2DModel`` presets and their I/O.

The class embedding has one extra row, the null class (index ``num_classes``), used for condition
dropout in training, classifier-free guidance and NFSD's unconditional prediction.

Shipped weights are a folder in diffusers' layout (``unet/`` with the EMA weights in fp16, ``scheduler/``)
plus ``card.json`` (the UNet config with its patch size, how it was trained, its metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from add_bench.config import choose
from add_bench.data import NUM_CLASSES
from add_bench.errors import CheckpointError

_COMMON = dict(
    num_class_embeds=NUM_CLASSES + 1,
    time_embedding_type="positional",
    flip_sin_to_cos=True,
    freq_shift=0,
    attention_head_dim=None,
    dropout=0.0,
)
# The image (1×28×28) is pixel-unshuffled to 4×14×14 before the UNet (patch=2), so the UNet's levels run
# at 14×14 and 7×7: a quarter of the positions, and about a quarter of the convolution cost, of a UNet at
# the full 28×28 resolution.
_TWO_LEVELS = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # tests only
        patch=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    "small": dict(patch=2, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, **_TWO_LEVELS),
    # 1.5× the small preset's widths, one layer per block as there (1.58M parameters)
    "large": dict(patch=2, block_out_channels=(48, 96), layers_per_block=1, norm_num_groups=8, **_TWO_LEVELS),
}


def unet_config(size: str, image_size: int = 28, channels: int = 1) -> dict[str, Any]:
    preset = dict(choose(UNET_PRESETS, size, "size"))
    patch = preset.get("patch", 1)
    return {
        **_COMMON,
        **preset,
        "sample_size": image_size // patch,
        "in_channels": channels * patch * patch,
        "out_channels": channels * patch * patch,
    }


class PatchUNet(torch.nn.Module):
    """A diffusers ``UNet2DModel`` applied to the pixel-unshuffled image (space-to-depth by ``patch``).

    Called like the UNet: ``net(x, t, class_labels=y).sample``.
    """

    def __init__(self, patch: int = 1, **unet_kwargs: Any):
        super().__init__()
        self.patch = patch
        self.config = {"patch": patch, **unet_kwargs}
        self.unet = UNet2DModel(**unet_kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> UNet2DOutput:
        p = self.patch
        h = F.pixel_unshuffle(x, p) if p > 1 else x
        out = self.unet(h, t, class_labels=class_labels).sample
        return UNet2DOutput(sample=F.pixel_shuffle(out, p) if p > 1 else out)


def build_unet(size_or_config: str | dict[str, Any]) -> PatchUNet:
    cfg = unet_config(size_or_config) if isinstance(size_or_config, str) else dict(size_or_config)
    return PatchUNet(**cfg)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- shipped weights
DIFFUSERS_UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


def weights_file(folder: str | Path) -> Path:
    """The file holding a weights folder's tensors: ``unet/diffusion_pytorch_model.safetensors`` for a UNet
    (diffusers' layout) or ``model.safetensors`` for the other networks."""
    folder = Path(folder)
    return folder / DIFFUSERS_UNET if (folder / DIFFUSERS_UNET).is_file() else folder / "model.safetensors"


def save_weights(folder: str | Path, module: torch.nn.Module, card: dict[str, Any], fp16: bool = True) -> None:
    """A UNet (:class:`PatchUNet`) in diffusers' layout (:func:`save_unet`); any other network as
    ``model.safetensors``; both with ``card.json``. Each file is replaced in one step."""
    from safetensors.torch import save_file

    from add_bench.provenance import atomic_path, atomic_write_json

    if isinstance(module, PatchUNet):
        save_unet(folder, module, card, fp16)
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu()
        for k, v in module.state_dict().items()
    }
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_json(folder / "card.json", card)


def save_unet(folder: str | Path, module: PatchUNet, card: dict[str, Any], fp16: bool = True) -> None:
    """diffusers' layout, so that ``UNet2DModel.from_pretrained(folder, subfolder="unet")`` and
    ``DDIMScheduler.from_pretrained(folder, subfolder="scheduler")`` load it: ``unet/`` (the inner
    UNet2DModel, which works on the 2×2 pixel-unshuffled image: ``card["unet"]["patch"]``), ``scheduler/``
    (the card's noise schedule) and the suite's ``card.json``. Written beside, then moved into place."""
    import copy
    import os
    import shutil

    from add_bench.provenance import atomic_write_json

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet = copy.deepcopy(module.unet).cpu()
    (unet.half() if fp16 else unet).save_pretrained(tmp / "unet", safe_serialization=True)
    if "schedule" in card:
        from add_bench.diffusion import make_scheduler, schedule_from_card

        make_scheduler(schedule_from_card(card).cfg).save_pretrained(tmp / "scheduler")
    atomic_write_json(tmp / "card.json", card)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def convert_to_diffusers(folder: str | Path) -> dict[str, str]:
    """Rewrite a UNet weights folder of the suite's first layout (``model.safetensors`` beside card.json) in
    diffusers' layout (:func:`save_unet`), tensors and dtypes unchanged. The card records the old file's git
    blob id as ``converted_from``: cells computed on the old file stay current (``methods.changed_inputs``),
    and the old file's bytes can be rebuilt from the new one (:func:`first_layout_bytes`). Returns that record."""
    from safetensors.torch import load_file

    from add_bench.provenance import blob_id

    folder = Path(folder)
    old = folder / "model.safetensors"
    if weights_file(folder) != old or not old.is_file():
        raise CheckpointError(f"{folder}: no model.safetensors to convert (already in diffusers' layout?)")
    card = read_card(folder)
    fp16 = all(v.dtype == torch.float16 for v in load_file(str(old)).values() if v.is_floating_point())
    module = load_unet(folder)
    card["converted_from"] = {"file": "model.safetensors", "blob": blob_id(old)}
    save_unet(folder, module, card, fp16=fp16)
    return card["converted_from"]


def first_layout_bytes(folder: str | Path) -> bytes:
    """The bytes a diffusers-layout UNet folder's tensors have as the suite's first layout
    (``model.safetensors``, keys prefixed ``unet.``, stored dtypes kept)."""
    from safetensors.torch import load_file, save

    state = load_file(str(Path(folder) / DIFFUSERS_UNET))
    return save({"unet." + k: v for k, v in state.items()})


def read_card(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    card_file = folder / "card.json"
    if not card_file.is_file():
        raise CheckpointError(
            f"{card_file}: missing; a weights folder holds card.json and its weights (unet/ or model.safetensors)"
        )
    try:
        return json.loads(card_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{card_file}: corrupt JSON ({e})") from None


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = weights_file(folder)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; re-run the pretrain command or check the path")
    prefix = "unet." if path.name != "model.safetensors" else ""  # diffusers' UNet2DModel inside PatchUNet
    try:
        return {prefix + k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None


def load_into(module: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    try:
        module.load_state_dict(load_state(folder))
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weights do not fit the network ({str(e).splitlines()[0]})") from None
    return module


def load_unet(folder: str | Path) -> PatchUNet:
    """A UNet from a shipped weights folder (config from card.json)."""
    card = read_card(folder)
    if "unet" not in card:
        raise CheckpointError(f"{Path(folder) / 'card.json'}: no 'unet' config; is this a UNet weights folder?")
    return load_into(build_unet(card["unet"]), folder).eval()
