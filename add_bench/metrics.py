"""Metrics: FID (clean-fid) and an alignment score, behind one interface for both scales.

A metric is a callable ``metric(samples: SampleSet) -> dict[str, float]``; a suite is a list of them
chosen by name (``METRIC_SUITES``). Callers never know which metric they hold:

* ``embedded``: FID on the evaluation network's 128-d penultimate features (reference: the 10k test
  split, statistics cached once) and alignment = mean probability the evaluation network gives the
  conditioning class (``align_prob``) plus its accuracy (``align_acc``): the stand-in for CLIP score;
  and within-class ``diversity`` (pixel standard deviation across one class's samples: mode collapse).
* ``cluster``: clean-fid's Inception FID ("clean" mode) against the COCO val2017 images whose captions
  prompted the samples, and open_clip CLIP score; both load weights from a local path
  (``eval.cluster.*``, or the ``ADD_BENCH_INCEPTION`` folder and ``ADD_BENCH_CLIP`` file) since hubs are offline.

The evaluation network is used here only; no training objective loads it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from cleanfid.fid import frechet_distance

from add_bench.config import EvalConfig, choose
from add_bench.data import PROMPTS, load_split, to_model_range
from add_bench.errors import CheckpointError
from add_bench.networks.evalnet import EvalNet
from add_bench.networks.unets import load_into, read_card
from add_bench.provenance import atomic_path, resolve_weights

STATS_CACHE = Path(os.environ.get("ADD_BENCH_CACHE", Path.home() / ".cache" / "add_bench")) / "fid_stats"


@dataclass
class SampleSet:
    """Generated (or real) images with the labels/prompts they were conditioned on.

    images: uint8, (N, H, W) grayscale or (N, H, W, 3) RGB; labels: int (N,); prompts: list of N strings.
    """

    images: np.ndarray
    labels: np.ndarray
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(f"SampleSet.images: expected uint8 (N,H,W) or (N,H,W,3), got {self.images.dtype} "
                             f"{self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"SampleSet: {len(self.images)} images but {len(self.labels)} labels")
        if not self.prompts:
            self.prompts = [PROMPTS[int(c)] for c in self.labels]

    def __len__(self) -> int:
        return len(self.labels)


class Metric(Protocol):
    def __call__(self, samples: SampleSet) -> dict[str, float]: ...


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = features.astype(np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


class FID:
    """Fréchet distance (clean-fid's ``frechet_distance``) between sample features and a reference.

    ``features``: uint8 images → (N, D) array; ``reference``: () → uint8 images of the reference set,
    called once, its statistics cached under ``cache_key`` (include the extractor's weights hash).
    """

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], reference: Callable[[], np.ndarray],
                 cache_key: str, key: str = "fid"):
        self.features, self.reference, self.cache_key, self.key = features, reference, cache_key, key
        self._ref: tuple[np.ndarray, np.ndarray] | None = None

    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ref is None:
            path = STATS_CACHE / f"{self.cache_key}.npz"
            if path.is_file():
                with np.load(path) as z:
                    self._ref = (z["mu"], z["sigma"])
            else:
                self._ref = gaussian_stats(self.features(self.reference()))
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, mu=self._ref[0], sigma=self._ref[1])
        return self._ref

    def distance(self, images: np.ndarray) -> float:
        mu, sigma = gaussian_stats(self.features(images))
        return float(frechet_distance(mu, sigma, *self.reference_stats()))

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        return {self.key: self.distance(samples.images)}


# ------------------------------------------------------------------------------ embedded metrics
def file_hash(path: Path, n: int = 12) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:n]


class EvalNetScorer:
    """The shipped evaluation network: features for FID and class probabilities for alignment."""

    def __init__(self, name_or_path: str = "evalnet", batch_size: int = 1000):
        folder = resolve_weights(name_or_path)
        card = read_card(folder)
        if card.get("kind") != "evalnet":
            raise CheckpointError(f"{folder}/card.json: kind={card.get('kind')!r}, expected 'evalnet'")
        self.net = load_into(EvalNet(), folder).eval()
        self.id = f"evalnet-{file_hash(folder / 'model.safetensors')}"
        self.batch_size = batch_size

    @torch.no_grad()
    def _run(self, images: np.ndarray, fn) -> np.ndarray:
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"evaluation network takes (N, 28, 28) uint8 images, got {images.shape}")
        return np.concatenate([fn(to_model_range(images[i:i + self.batch_size])).numpy()
                               for i in range(0, len(images), self.batch_size)])

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, self.net.features)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, lambda x: self.net(x).softmax(1))


class Alignment:
    """Embedded stand-in for CLIP score: p(conditioning class | image) under the evaluation network."""

    def __init__(self, scorer: EvalNetScorer):
        self.scorer = scorer

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        p = self.scorer.probabilities(samples.images)
        labels = samples.labels.astype(int)
        return {"align_prob": float(p[np.arange(len(labels)), labels].mean()),
                "align_acc": float((p.argmax(1) == labels).mean())}


class Diversity:
    """Within-condition diversity: the per-pixel standard deviation across the samples of one class,
    averaged over pixels and classes, in [0, 1] pixel units (5k real training images: ≈ 0.19). A student
    that maps every noise to one image per class scores ≈ 0 whatever its FID; this makes that visible."""

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        x = samples.images.astype(np.float64) / 255
        labels = samples.labels.astype(int)
        stds = [x[labels == c].std(0).mean() for c in np.unique(labels) if (labels == c).sum() > 1]
        return {"diversity": float(np.mean(stds)) if stds else float("nan")}


def embedded_suite(cfg: EvalConfig) -> list[Metric]:
    scorer = EvalNetScorer(cfg.evalnet)
    d = cfg.data
    test_images = lambda: load_split("test", d.root, download=d.download).images  # noqa: E731
    return [FID(scorer.features, test_images, f"{scorer.id}_fashion-mnist-test"), Alignment(scorer), Diversity()]


# ------------------------------------------------------------------------------- cluster metrics
def inception_features(weights_dir: str | os.PathLike, batch_size: int = 50) -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's Inception-V3 (torchscript ``inception-2015-12-05.pt`` in ``weights_dir``), "clean" resize."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = Path(weights_dir) / "inception-2015-12-05.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; place clean-fid's Inception weights there (set ADD_BENCH_INCEPTION)")
    model = InceptionV3W(str(weights_dir), download=False).eval()
    resize = build_resizer("clean")

    @torch.no_grad()
    def features(images: np.ndarray) -> np.ndarray:
        rgb = images if images.ndim == 4 else np.repeat(images[..., None], 3, axis=-1)
        out = []
        for i in range(0, len(rgb), batch_size):
            batch = np.stack([resize(im) for im in rgb[i:i + batch_size]]).transpose(0, 3, 1, 2)
            out.append(model(torch.from_numpy(batch).float()).numpy())
        return np.concatenate(out)

    return features


class CLIPScore:
    """open_clip CLIP score: mean over samples of max(100·cos(image, prompt), 0) (the torchmetrics
    convention per sample; the paper's ViT-g-14 numbers are on the 0–1 scale, i.e. this / 100)."""

    def __init__(self, model_name: str, weights: str, batch_size: int = 64):
        import open_clip

        if not Path(weights).is_file():
            raise CheckpointError(f"{weights}: open_clip weights file not found (set ADD_BENCH_CLIP)")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, samples: SampleSet) -> dict[str, float]:
        from PIL import Image

        scores = []
        for i in range(0, len(samples), self.batch_size):
            ims = samples.images[i:i + self.batch_size]
            x = torch.stack([self.preprocess(Image.fromarray(im).convert("RGB")) for im in ims])
            img = torch.nn.functional.normalize(self.model.encode_image(x), dim=-1)
            txt = torch.nn.functional.normalize(
                self.model.encode_text(self.tokenizer(samples.prompts[i:i + self.batch_size])), dim=-1)
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0))
        return {"clip_score": float(torch.cat(scores).mean() / 100)}


def cluster_suite(cfg: EvalConfig) -> list[Metric]:
    """Inception FID (clean-fid) against the COCO images whose captions prompted the samples
    (``add_bench.data.coco.eval_set``: the same pairs), and open_clip CLIP score."""
    from add_bench.data.coco import eval_set

    c = cfg.cluster
    inception = local_weights(c.inception, "ADD_BENCH_INCEPTION", "eval.cluster.inception",
                              "a folder holding clean-fid's inception-2015-12-05.pt")
    clip_weights = local_weights(c.clip_weights, "ADD_BENCH_CLIP", "eval.cluster.clip_weights",
                                 f"an open_clip weights file for {c.clip_model}")
    coco, pick = eval_set(cfg)
    res = cfg.coco.resolution
    key = (f"inception-{file_hash(Path(inception) / 'inception-2015-12-05.pt')}_coco-{cfg.coco.split}"
           f"-n{cfg.num_samples}-seed{cfg.seed}-{res}px")
    return [FID(inception_features(inception), lambda: coco.load_images(pick, res), key),
            CLIPScore(c.clip_model, clip_weights)]


def local_weights(value: str | None, env: str, key: str, what: str) -> str:
    value = value or os.environ.get(env)
    if not value:
        raise CheckpointError(f"{key} is unset and ${env} is empty; accepted: {what}")
    return value


METRIC_SUITES: dict[str, Callable[[EvalConfig], list[Metric]]] = {"embedded": embedded_suite, "cluster": cluster_suite}


def build_suite(cfg: EvalConfig) -> list[Metric]:
    return choose(METRIC_SUITES, cfg.metrics, "metrics")(cfg)


def score(suite: list[Metric], samples: SampleSet) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in suite:
        out.update(metric(samples))
    return out
