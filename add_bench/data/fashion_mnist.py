"""Fashion-MNIST from gzipped IDX files: the embedded benchmark's data.

Where the files are looked for, in order:
  1. a directory given in the config (``data.root``),
  2. the environment variable ``ADD_BENCH_FASHION_MNIST``,
  3. Debian's package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist),
  4. torchvision's downloader into ``~/.cache/add_bench/fashion-mnist`` (needs the internet).

Splits: ``train`` is the 60k training set minus a fixed validation carve-out, ``val`` is that
carve-out, ``test`` is the 10k test set, kept for evaluation (FID reference) only.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from add_bench.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "ADD_BENCH_FASHION_MNIST"
CACHE_DIR = Path.home() / ".cache" / "add_bench" / "fashion-mnist"
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian), or point "
    f"data.root / ${ENV_VAR} at a folder holding the four *-idx?-ubyte.gz files"
)

CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28)

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8}


def prompt(label: int) -> str:
    """The text prompt for a class: 'a photo of a sneaker'."""
    return f"a photo of a {CLASS_NAMES[int(label)]}"


PROMPTS = tuple(prompt(i) for i in range(NUM_CLASSES))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array, checking its header and length."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; {INSTALL_HINT}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on truncated/corrupt streams
        raise DataError(f"{path}: cannot be read as a gzipped IDX file ({e}); {INSTALL_HINT}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); {INSTALL_HINT}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {INSTALL_HINT}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or padded IDX file: header says {shape} = {expected} bytes of data, "
            f"file has {len(raw) - header}; {INSTALL_HINT}"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(shape)


def find_root(root: str | None = None, download: bool = True) -> Path:
    """The folder holding the four files: ``root`` if given (no fallback), else the documented order."""
    names = [n for pair in FILES.values() for n in pair]
    if root:
        if not Path(root).is_dir():
            raise DataError(f"data.root={root}: no such directory; {INSTALL_HINT}")
        missing = [n for n in names if not (Path(root) / n).is_file()]
        if missing:
            raise DataError(f"data.root={root}: missing {', '.join(missing)}; {INSTALL_HINT}")
        return Path(root)
    candidates = ([Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []) + [DEBIAN_DIR, CACHE_DIR]
    for c in candidates:
        if all((c / n).is_file() for n in names):
            return c
    if download:
        try:
            return _download(CACHE_DIR)
        except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
            raise DataError(
                f"Fashion-MNIST not found in {', '.join(map(str, candidates))} and the download "
                f"failed ({type(e).__name__}: {e}); {INSTALL_HINT}"
            ) from e
    raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, candidates))}; {INSTALL_HINT}")


def _download(dest: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    tmp = dest.parent / "_torchvision"
    FashionMNIST(str(tmp), train=True, download=True)
    FashionMNIST(str(tmp), train=False, download=True)
    dest.mkdir(parents=True, exist_ok=True)
    for pair in FILES.values():
        for n in pair:
            os.replace(tmp / "FashionMNIST" / "raw" / n, dest / n)
    return dest


@dataclass
class Split:
    """Images as uint8 (N, 28, 28) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [-1, 1] with a channel axis, (N, 1, 28, 28) float32, and labels."""
        return to_model_range(self.images), torch.from_numpy(self.labels.astype(np.int64))


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.tensor(np.asarray(images_uint8), dtype=torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-range images (N, 1, H, W) in [-1, 1] → uint8 (N, H, W)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x[:, 0].cpu().numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).cpu().numpy()


def load_split(
    split: str, root: str | None = None, val_size: int = 5000, split_seed: int = 0, download: bool = True
) -> Split:
    """Load ``train``, ``val`` or ``test``. ``val`` is a fixed, class-stratified carve-out of train."""
    if split not in ("train", "val", "test"):
        raise DataError(f"split={split!r}: accepted are 'train', 'val', 'test'")
    folder = find_root(root, download)
    source = "test" if split == "test" else "train"
    img_file, lab_file = (folder / n for n in FILES[source])
    images, labels = read_idx(img_file), read_idx(lab_file)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{img_file}: images of shape {images.shape[1:]}, expected {IMAGE_SHAPE}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{lab_file}: {labels.shape[0]} labels for {images.shape[0]} images in {img_file}")
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{lab_file}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    if source == "test":
        return Split(images, labels.astype(np.int64))
    val_idx = _val_indices(labels, val_size, split_seed)
    mask = np.zeros(len(labels), bool)
    mask[val_idx] = True
    keep = mask if split == "val" else ~mask
    return Split(images[keep], labels[keep].astype(np.int64))


def _val_indices(labels: np.ndarray, val_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_class = val_size // NUM_CLASSES
    return np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(NUM_CLASSES)])
    )


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random indices of each class, ordered like samples: classes 0, 1, …, 9, 0, 1, …"""
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(NUM_CLASSES)]
    short = [c for c, p in enumerate(picks) if len(p) < per_class]
    if short:
        raise DataError(f"class {short[0]} has {len(picks[short[0]])} images, fewer than the {per_class} asked for")
    return np.stack(picks, 1).reshape(-1)


def balanced_labels(n: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """n labels cycling through the classes: 0, 1, ..., 9, 0, 1, ... (balanced when 10 | n)."""
    return torch.arange(n) % num_classes
