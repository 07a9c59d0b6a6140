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
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from add_bench.errors import DataError, command_line

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
        return load_images([self.files[i] for i in index], resolution, workers)

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


def load_images(files: list[Path], resolution: int, workers: int = 0) -> np.ndarray:
    """uint8 (N, resolution, resolution, 3) of image files; ``workers`` > 1: read and decoded by that many threads
    (PIL releases the GIL), in the same order."""
    if workers > 1 and len(files) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(files))) as pool:
            return np.stack(list(pool.map(load_image, files, [resolution] * len(files))))
    return np.stack([load_image(f, resolution) for f in files])


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


# ------------------------------------------------------------------------------ pre-encoded latents
MOMENTS_FILE = "moments.npy"  # float32 (images, 2·C, h, w): the VAE posterior's mean and log-variance
CARD_FILE = "card.json"


def image_rows(coco: CocoCaptions) -> tuple[list[Path], np.ndarray]:
    """The split's distinct image files (in caption order) and, per caption pair, its image's row."""
    files = list(dict.fromkeys(coco.files))
    row = {f: i for i, f in enumerate(files)}
    return files, np.array([row[f] for f in coco.files], dtype=np.int64)


def latents_card(sd, coco: CocoCaptions, resolution: int) -> dict:
    """What a latents folder was made from: the VAE's weights, the split, its images and the resolution."""
    from add_bench.provenance import blob_id

    weights = sorted((Path(sd.folder) / "vae").glob("diffusion_pytorch_model*"))
    if not weights:
        raise DataError(f"{sd.folder}/vae: no diffusion_pytorch_model.* weights file to identify the VAE by")
    files, _ = image_rows(coco)
    return {
        "vae": blob_id(weights[0]),
        "split": coco.split,
        "images": len(files),
        "resolution": resolution,
        "shape": [len(files), 2 * sd.vae.config.latent_channels, *(2 * [resolution // sd.vae_scale])],
    }


def encode_split(sd, coco: CocoCaptions, resolution: int, out: Path, batch_size: int = 16, workers: int = 0) -> Path:
    """The VAE posterior's parameters of every image of the split, in ``out/moments.npy`` (a row per image);
    resumable: rows are written batch by batch and ``card.json`` records how many are done."""
    from tqdm import tqdm

    from add_bench.provenance import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    card, path = latents_card(sd, coco, resolution), out / MOMENTS_FILE
    done = 0
    if (out / CARD_FILE).is_file():
        stored = json.loads((out / CARD_FILE).read_text())
        if {k: stored.get(k) for k in card} != card:
            raise DataError(f"{out}: holds latents of another VAE, split or resolution ({stored}); use another --out")
        done = stored.get("done", 0)
    moments = np.lib.format.open_memmap(path, mode="r+" if done else "w+", dtype=np.float32, shape=tuple(card["shape"]))
    files, _ = image_rows(coco)
    device = sd.vae.device
    print(f"encoding {len(files) - done} of {len(files)} {coco.split} images → {path}", file=sys.stderr)
    for start in tqdm(range(done, len(files), batch_size), desc="encode", unit="batch"):
        chunk = files[start : start + batch_size]
        pixels = to_model_range(load_images(chunk, resolution, workers)).to(device)
        with torch.no_grad():
            moments[start : start + len(chunk)] = sd.posterior_moments(pixels).float().cpu().numpy()
        moments.flush()
        atomic_write_json(out / CARD_FILE, {**card, "done": start + len(chunk)})
    return path


class CocoLatents:
    """A latents folder made by ``encode``, checked against the VAE, split and resolution it is used with;
    ``moments(pair_index)`` → the posterior's parameters of those pairs' images."""

    def __init__(self, folder: str | Path, sd, coco: CocoCaptions, resolution: int):
        folder = Path(folder)
        card_path = folder / CARD_FILE
        if not card_path.is_file():
            raise DataError(
                f"coco_latents={folder}: no {CARD_FILE}; make it with python -m add_bench.data.coco encode SD_FOLDER "
                f"--split {coco.split} --resolution {resolution} --out {folder}"
            )
        stored, card = json.loads(card_path.read_text()), latents_card(sd, coco, resolution)
        differ = [k for k in card if stored.get(k) != card[k]]
        if differ or stored.get("done") != card["images"]:
            why = (
                f"made with another {', '.join(differ)}" if differ else f"{stored.get('done')} of {card['images']} done"
            )
            raise DataError(f"coco_latents={folder}: {why} ({CARD_FILE}); encode again or use another folder")
        self.table = np.load(folder / MOMENTS_FILE, mmap_mode="r")
        self.rows = image_rows(coco)[1]

    def moments(self, index: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.table[self.rows[index]]))


@command_line
def main(argv: list[str] | None = None) -> int:
    """python -m add_bench.data.coco encode SD_FOLDER --split train2017 --resolution 512 --out DIR"""
    import argparse

    from add_bench.distributed import resolve_device
    from add_bench.networks.sd import load_stable_diffusion

    p = argparse.ArgumentParser(
        prog="python -m add_bench.data.coco",
        description="Pre-encode a COCO split with a Stable Diffusion folder's VAE (training then reads "
        "coco_latents=DIR instead of encoding each batch; the same latents within float tolerance).",
    )
    p.add_argument("action", choices=["encode"])
    p.add_argument("sd_folder")
    p.add_argument("--split", default="train2017", choices=SPLITS)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--root", default=None, help="COCO folder (default $ADD_BENCH_COCO)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=8, help="threads decoding the JPEGs")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    sd = load_stable_diffusion(a.sd_folder).to(resolve_device(a.device))
    sd.latent_shape(a.resolution)
    encode_split(sd, load_captions(a.root, a.split), a.resolution, Path(a.out), a.batch_size, a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
