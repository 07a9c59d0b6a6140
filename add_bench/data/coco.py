"""COCO 2017 captions: the cluster scale's data (training images + prompts, and the paper's
zero-shot evaluation: 5k val2017 captions, FID against those val images).

The folder (``coco.root``, else ``$ADD_BENCH_COCO``) is COCO's own layout:
    <root>/annotations/captions_<split>.json      (split: train2017 | val2017)
    <root>/<split>/<file_name>.jpg
Images are centre-cropped to a square and resized (PIL bicubic) to the model's resolution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from add_bench.errors import DataError

ENV_VAR = "ADD_BENCH_COCO"
SPLITS = ("train2017", "val2017")
INSTALL_HINT = (
    f"download COCO 2017 (images + annotations_trainval2017.zip from cocodataset.org) and point "
    f"coco.root / ${ENV_VAR} at the folder holding annotations/ and the image folders"
)


def find_root(root: str | None) -> Path:
    value = root or os.environ.get(ENV_VAR)
    if not value:
        raise DataError(f"COCO not configured: coco.root is unset and ${ENV_VAR} is empty; {INSTALL_HINT}")
    if not Path(value).is_dir():
        raise DataError(f"coco.root={value}: no such directory; {INSTALL_HINT}")
    return Path(value)


@dataclass
class CocoCaptions:
    """(image file, caption) pairs of one split; every caption of every image (COCO has about five)."""

    root: Path
    split: str
    files: list[Path]  # one per pair
    captions: list[str]
    image_ids: np.ndarray  # int64, one per pair

    def __len__(self) -> int:
        return len(self.captions)

    def load_images(self, index: np.ndarray | list[int], resolution: int, workers: int = 0) -> np.ndarray:
        """uint8 (N, resolution, resolution, 3): centre crop to a square, then bicubic resize; ``workers`` > 1:
        that many threads read and decode (PIL releases the GIL), the images in the same order."""
        files = [self.files[i] for i in index]
        if workers > 1 and len(files) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, len(files))) as pool:
                return np.stack(list(pool.map(load_image, files, [resolution] * len(files))))
        return np.stack([load_image(f, resolution) for f in files])

    def eval_pairs(self, n: int, seed: int = 0) -> np.ndarray:
        """The zero-shot evaluation set: n distinct images chosen with ``seed``, one caption each (also
        chosen with ``seed``); returns indices into the pairs. Fixed for a (split, n, seed)."""
        rng = np.random.default_rng(seed)
        by_image: dict[int, list[int]] = {}
        for i, image_id in enumerate(self.image_ids.tolist()):
            by_image.setdefault(image_id, []).append(i)
        ids = sorted(by_image)
        if n > len(ids):
            raise DataError(f"{self.annotation_file}: {len(ids)} images, fewer than the {n} asked for")
        chosen = rng.permutation(len(ids))[:n]
        return np.array([by_image[ids[j]][rng.integers(len(by_image[ids[j]]))] for j in chosen])

    @property
    def annotation_file(self) -> Path:
        return self.root / "annotations" / f"captions_{self.split}.json"


def load_image(path: Path, resolution: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; {INSTALL_HINT}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}); re-download it") from None


def load_captions(root: str | None, split: str = "val2017") -> CocoCaptions:
    if split not in SPLITS:
        raise DataError(f"coco.split={split!r}: accepted are {', '.join(SPLITS)}")
    folder = find_root(root)
    ann = folder / "annotations" / f"captions_{split}.json"
    if not ann.is_file():
        raise DataError(f"{ann}: file not found; {INSTALL_HINT}")
    try:
        data = json.loads(ann.read_text())
        names = {int(im["id"]): im["file_name"] for im in data["images"]}
        pairs = [(int(a["image_id"]), str(a["caption"]).strip()) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{ann}: not a COCO captions file ({type(e).__name__}: {e}); expected "
            "'images' [{id, file_name}] and 'annotations' [{image_id, caption}]"
        ) from None
    missing = sorted({i for i, _ in pairs if i not in names})
    if missing:
        raise DataError(f"{ann}: captions for image ids not listed under 'images' (e.g. {missing[0]})")
    pairs.sort()
    return CocoCaptions(
        folder,
        split,
        [folder / split / names[i] for i, _ in pairs],
        [c for _, c in pairs],
        np.array([i for i, _ in pairs], dtype=np.int64),
    )


def eval_set(cfg) -> tuple[CocoCaptions, np.ndarray]:
    """The zero-shot evaluation pairs of an ``EvalConfig``: ``num_samples`` distinct images of
    ``coco.split`` with one caption each, fixed by ``seed``. Generation takes the captions, FID the images."""
    coco = load_captions(cfg.coco.root, cfg.coco.split)
    return coco, coco.eval_pairs(cfg.num_samples, cfg.seed)


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
