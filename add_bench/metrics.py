"""Metrics: FID (clean-fid) and an alignment score, behind one interface for both scales.

A metric is a callable ``metric(samples: SampleSet) -> dict[str, float]``; a suite is a list of them
chosen by name (``METRIC_SUITES``). Callers never know which metric they hold:

* ``embedded``: FID on the evaluation network's 128-d penultimate features (reference: the 10k test
  split, statistics cached once) and alignment = mean probability the evaluation network gives the
  conditioning class (``align_prob``) plus its accuracy (``align_acc``): the stand-in for CLIP score;
  within-class pixel ``diversity``; and the diversity-aware metrics in the self-supervised embedding
  ``evalnet_ssl`` (:class:`EmbedNet`), which keeps within-class variation that classifier features
  discard: class-conditional precision / recall (Kynkäänniemi et al. 2019, k-NN manifolds, k = 5) and
  density / coverage (Naeem et al. 2020), each computed per class against that class's test images and
  averaged; unconditional precision / recall; and per-class FID averaged over classes (``intra_fid``,
  Miyato & Koyama 2018). ``metric_features(suite)`` says which feature space each key is measured in.
* ``cluster``: clean-fid's Inception FID ("clean" mode) against the COCO val2017 images whose captions
  prompted the samples, and open_clip CLIP score; both load weights from a local path
  (``eval.cluster.*``, or the ``ADD_BENCH_INCEPTION`` folder and ``ADD_BENCH_CLIP`` file) since hubs are offline.

The evaluation network is used here only; no training objective loads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from cleanfid.fid import frechet_distance

from add_bench.config import EvalConfig, choose
from add_bench.data import PROMPTS, load_split, to_model_range
from add_bench.errors import CheckpointError, command_line
from add_bench.networks.evalnet import EmbedNet, EvalNet, fold_batchnorm
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
        if np.issubdtype(self.images.dtype, np.floating) and np.isnan(self.images).any():
            raise ValueError(f"SampleSet.images: {int(np.isnan(self.images).sum())} NaN values; expected uint8 images")
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(
                f"SampleSet.images: expected uint8 (N,H,W) or (N,H,W,3), got {self.images.dtype} {self.images.shape}"
            )
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

    def __init__(
        self,
        features: Callable[[np.ndarray], np.ndarray],
        reference: Callable[[], np.ndarray],
        cache_key: str,
        key: str = "fid",
    ):
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


def evaluation_weights(name_or_path: str, kind: str) -> tuple[Path, dict[str, Any]]:
    """A weights folder and its card, checked to hold an evaluation network of ``kind``."""
    folder = resolve_weights(name_or_path)
    card = read_card(folder)
    if card.get("kind") != kind:
        raise CheckpointError(f"{folder}/card.json: kind={card.get('kind')!r}, expected {kind!r}")
    return folder, card


class EvalNetScorer:
    """The shipped evaluation network: features for FID and class probabilities for alignment."""

    def __init__(self, name_or_path: str = "evalnet", batch_size: int = 1000):
        folder, _ = evaluation_weights(name_or_path, "evalnet")
        self.net = load_into(EvalNet(), folder).eval()
        self.id = f"evalnet-{file_hash(folder / 'model.safetensors')}"
        self.batch_size = batch_size
        self._last: tuple[np.ndarray, tuple[np.ndarray, np.ndarray]] | None = None

    @torch.no_grad()
    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, class probabilities) of one pass over the images; the last call's result is reused
        for the same array, so FID and alignment on one sample set run the network once."""
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"evaluation network takes (N, 28, 28) uint8 images, got {images.shape}")
        feats, probs = [], []
        for i in range(0, len(images), self.batch_size):
            f = self.net.features(to_model_range(images[i : i + self.batch_size]))
            feats.append(f.numpy())
            probs.append(self.net.head(f).softmax(1).numpy())
        self._last = (images, (np.concatenate(feats), np.concatenate(probs)))
        return self._last[1]

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[1]


class Alignment:
    """Embedded stand-in for CLIP score: p(conditioning class | image) under the evaluation network."""

    def __init__(self, scorer: EvalNetScorer):
        self.scorer = scorer

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        p = self.scorer.probabilities(samples.images)
        labels = samples.labels.astype(int)
        return {
            "align_prob": float(p[np.arange(len(labels)), labels].mean()),
            "align_acc": float((p.argmax(1) == labels).mean()),
        }


class Diversity:
    """Within-condition diversity: the per-pixel standard deviation across the samples of one class,
    averaged over pixels and classes, in [0, 1] pixel units. A student that maps every noise to one image
    per class scores 0 whatever its FID (real images: results/metric_sanity)."""

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        x = samples.images.astype(np.float64) / 255
        labels = samples.labels.astype(int)
        stds = [x[labels == c].std(0).mean() for c in np.unique(labels) if (labels == c).sum() > 1]
        return {"diversity": float(np.mean(stds)) if stds else float("nan")}


class EmbedNetFeatures:
    """The shipped self-supervised embedding ``evalnet_ssl``: 64-d features that keep within-class variation."""

    def __init__(self, name_or_path: str = "evalnet_ssl", batch_size: int = 250):
        folder, card = evaluation_weights(name_or_path, "evalnet_ssl")
        self.net = fold_batchnorm(load_into(EmbedNet(card.get("width", 16)), folder).eval())
        self.id = f"{folder.name}-{file_hash(folder / 'model.safetensors')}"
        self.batch_size = batch_size
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(N, 64) float32 features of uint8 (N, 28, 28) images; the last call's result is reused for the
        same array, so that several metrics on one sample set embed it once."""
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"evalnet_ssl takes (N, 28, 28) uint8 images, got {images.shape}")
        out = np.concatenate(
            [
                self.net.features(to_model_range(images[i : i + self.batch_size])).numpy()
                for i in range(0, len(images), self.batch_size)
            ]
        )
        self._last = (images, out)
        return out


# ------------------------------------------------------------ diversity-aware metrics (k-NN, per class)
def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances, one matrix product."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point (the k-NN ball of its manifold)."""
    out = []
    for i in range(0, len(features), chunk):
        d = squared_distances(features[i : i + chunk], features)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the point itself
    return torch.cat(out)


def precision_recall_density_coverage(
    real: torch.Tensor, fake: torch.Tensor, k: int, real_radii: torch.Tensor | None = None, chunk: int = 2048
) -> dict[str, float]:
    """Kynkäänniemi et al. 2019 and Naeem et al. 2020 on one pair of feature sets.

    precision: share of fakes inside some real's k-NN ball; recall: share of reals inside some fake's
    k-NN ball; density: fakes' mean count of real balls containing them, over k; coverage: share of reals
    whose own k-NN ball holds at least one fake."""
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k)
    in_real_balls = torch.zeros(len(fake))
    real_recalled = torch.zeros(len(real), dtype=torch.bool)
    real_covered = torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(real), chunk):
        d = squared_distances(real[i : i + chunk], fake)  # reals × fakes
        in_ball = d <= real_radii[i : i + chunk, None]
        in_real_balls += in_ball.sum(0)
        real_covered[i : i + chunk] = in_ball.any(1)
        real_recalled[i : i + chunk] = (d <= fake_radii[None]).any(1)
    return {
        "precision": float((in_real_balls > 0).float().mean()),
        "recall": float(real_recalled.float().mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float(real_covered.float().mean()),
    }


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_to_reference(
    mu: np.ndarray, sigma: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, ref_sigma_sqrt: np.ndarray
) -> float:
    """The Fréchet distance of clean-fid's ``frechet_distance``, with tr √(Σ Σ_ref) = tr √(S Σ S), S = √Σ_ref
    (a symmetric eigenproblem; S cached per reference)."""
    inner = np.linalg.eigvalsh(ref_sigma_sqrt @ sigma @ ref_sigma_sqrt)
    return float(
        ((mu - ref_mu) ** 2).sum() + np.trace(sigma) + np.trace(ref_sigma) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


class ClassReference:
    """The reference images' features, per class and whole, with what every sample set is compared to:
    k-NN radii (per class and whole) and per-class Gaussian statistics. Computed once, cached on disk."""

    def __init__(
        self,
        features: Callable[[np.ndarray], np.ndarray],
        reference: Callable[[], tuple[np.ndarray, np.ndarray]],
        cache_key: str,
        k: int,
    ):
        self.features, self.reference, self.cache_key, self.k = features, reference, cache_key, k
        self._data: dict[str, np.ndarray] | None = None

    def data(self) -> dict[str, np.ndarray]:
        if self._data is None:
            path = STATS_CACHE / f"{self.cache_key}_k{self.k}.npz"
            if path.is_file():
                with np.load(path) as z:
                    self._data = dict(z)
            else:
                self._data = self.compute()
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, **self._data)
        return self._data

    def compute(self) -> dict[str, np.ndarray]:
        images, labels = self.reference()
        feats = torch.from_numpy(self.features(images)).float()
        out = {
            "features": feats.numpy(),
            "labels": labels.astype(np.int64),
            "radii": knn_radii(feats, self.k).numpy(),
            "class_radii": np.zeros(len(labels), np.float32),
        }
        classes = np.unique(labels)
        out["classes"] = classes
        out["mu"] = np.zeros((len(classes), feats.shape[1]))
        out["sigma"], out["sigma_sqrt"] = (np.zeros((len(classes), feats.shape[1], feats.shape[1])) for _ in range(2))
        for i, c in enumerate(classes):
            sel = labels == c
            out["class_radii"][sel] = knn_radii(feats[sel], self.k).numpy()
            out["mu"][i], out["sigma"][i] = gaussian_stats(feats[sel].numpy())
            out["sigma_sqrt"][i] = psd_sqrt(out["sigma"][i])
        return out


def reference_of_test_split(features: Callable[[np.ndarray], np.ndarray], feature_id: str, data: Any) -> ClassReference:
    """The k-NN / per-class reference of the Fashion-MNIST test split in one feature space, cached under the
    space's id (its weights' hash) and the data folder it was read from."""
    root = hashlib.sha256(str(data.root or "default").encode()).hexdigest()[:8]

    def images_and_labels() -> tuple[np.ndarray, np.ndarray]:
        test = load_split("test", data.root, download=data.download)
        return test.images, test.labels

    return ClassReference(features, images_and_labels, f"{feature_id}_fashion-mnist-test-{root}", KNN_K)


def check_per_class(labels: np.ndarray, k: int, what: str) -> None:
    classes, counts = np.unique(labels, return_counts=True)
    few = [(int(c), int(n)) for c, n in zip(classes, counts) if n <= k]
    if few:
        raise ValueError(
            f"{what}: class {few[0][0]} has {few[0][1]} sample(s); k-NN metrics with k={k} need at "
            f"least {k + 1} per class (use more samples, e.g. num_samples ≥ {10 * (k + 1)})"
        )


class ManifoldMetrics:
    """Class-conditional precision, recall, density, coverage (per class against that class's reference
    images, then averaged over the classes sampled) and unconditional precision / recall (``*_uncond``)."""

    keys = ("precision", "recall", "density", "coverage", "precision_uncond", "recall_uncond")

    def __init__(self, reference: ClassReference, feature_space: str):
        self.reference, self.feature_space = reference, feature_space

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        k = self.reference.k
        check_per_class(samples.labels, k, "k-NN metrics")
        ref = self.reference.data()
        fake = torch.from_numpy(self.reference.features(samples.images)).float()
        real, real_labels = torch.from_numpy(ref["features"]), ref["labels"]
        per_class = []
        for c in np.unique(samples.labels):
            sel = real_labels == c
            if not sel.any():
                raise ValueError(f"k-NN metrics: class {int(c)} has no reference images")
            per_class.append(
                precision_recall_density_coverage(
                    real[sel], fake[torch.from_numpy(samples.labels == c)], k, torch.from_numpy(ref["class_radii"][sel])
                )
            )
        out = {
            key: float(np.mean([m[key] for m in per_class])) for key in ("precision", "recall", "density", "coverage")
        }
        whole = precision_recall_density_coverage(real, fake, k, torch.from_numpy(ref["radii"]))
        return out | {"precision_uncond": whole["precision"], "recall_uncond": whole["recall"]}


class IntraFID:
    """Per-class FID (each class's samples against that class's reference images), averaged over classes."""

    keys = ("intra_fid",)

    def __init__(self, reference: ClassReference, feature_space: str):
        self.reference, self.feature_space = reference, feature_space

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        check_per_class(samples.labels, 1, "intra_fid")
        ref = self.reference.data()
        feats = self.reference.features(samples.images)
        index = {int(c): i for i, c in enumerate(ref["classes"])}
        fids = []
        for c in np.unique(samples.labels):
            if int(c) not in index:
                raise ValueError(f"intra_fid: class {int(c)} has no reference images")
            i = index[int(c)]
            mu, sigma = gaussian_stats(feats[samples.labels == c])
            fids.append(frechet_to_reference(mu, sigma, ref["mu"][i], ref["sigma"][i], ref["sigma_sqrt"][i]))
        return {"intra_fid": float(np.mean(fids))}


KNN_K = 5
EVALNET_SPACE = "evalnet: classifier penultimate features, 128-d"
SSL_SPACE = "evalnet_ssl: self-supervised (SimCLR) embedding, 64-d"
PIXEL_SPACE = "pixels"


def embedded_metrics(cfg: EvalConfig) -> dict[str, Callable[[], Metric]]:
    """The embedded metrics by name, each built on demand (the networks and reference load once)."""
    data = cfg.data
    test = lambda: load_split("test", data.root, download=data.download)  # noqa: E731
    built: dict[str, Any] = {}

    def scorer() -> EvalNetScorer:
        if "scorer" not in built:
            built["scorer"] = EvalNetScorer(cfg.evalnet)
        return built["scorer"]

    def reference() -> ClassReference:
        if "reference" not in built:
            embed = EmbedNetFeatures(cfg.evalnet_ssl)
            built["reference"] = reference_of_test_split(embed, embed.id, data)
        return built["reference"]

    def fid() -> Metric:
        m = FID(scorer().features, lambda: test().images, f"{scorer().id}_fashion-mnist-test")
        m.feature_space, m.keys = EVALNET_SPACE, ("fid",)
        return m

    def alignment() -> Metric:
        m = Alignment(scorer())
        m.feature_space, m.keys = "evalnet: class probabilities", ("align_prob", "align_acc")
        return m

    def diversity() -> Metric:
        m = Diversity()
        m.feature_space, m.keys = PIXEL_SPACE, ("diversity",)
        return m

    return {
        "fid": fid,
        "alignment": alignment,
        "diversity": diversity,
        "prdc": lambda: ManifoldMetrics(reference(), SSL_SPACE),
        "intra_fid": lambda: IntraFID(reference(), SSL_SPACE),
    }


def embedded_suite(cfg: EvalConfig) -> list[Metric]:
    return select_metrics(embedded_metrics(cfg), None)


def select_metrics(registry: dict[str, Callable[[], Metric]], names: list[str] | None) -> list[Metric]:
    """The named metrics of a registry (all of them for None); an unknown name is a ConfigError."""
    from add_bench.errors import ConfigError

    names = list(registry) if names is None else names
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ConfigError(f"metric {unknown[0]!r}: unknown; accepted: {', '.join(registry)}")
    return [registry[n]() for n in names]


def metric_features(suite: list[Metric]) -> dict[str, str]:
    """{result key: the feature space it is measured in} for the metrics that say so."""
    return {key: m.feature_space for m in suite if hasattr(m, "feature_space") for key in getattr(m, "keys", ())}


# ------------------------------------------------------------------------------- cluster metrics
def inception_features(
    weights_dir: str | os.PathLike, batch_size: int = 50, device: str | torch.device = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's Inception-V3 (torchscript ``inception-2015-12-05.pt`` in ``weights_dir``) on ``device``,
    "clean" resize (on the CPU, as clean-fid does)."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = Path(weights_dir) / "inception-2015-12-05.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; place clean-fid's Inception weights there (set ADD_BENCH_INCEPTION)")
    model = InceptionV3W(str(weights_dir), download=False).eval().to(device)
    resize = build_resizer("clean")

    @torch.no_grad()
    def features(images: np.ndarray) -> np.ndarray:
        rgb = images if images.ndim == 4 else np.repeat(images[..., None], 3, axis=-1)
        out = []
        for i in range(0, len(rgb), batch_size):
            batch = np.stack([resize(im) for im in rgb[i : i + batch_size]]).transpose(0, 3, 1, 2)
            out.append(model(torch.from_numpy(batch).float().to(device)).cpu().numpy())
        return np.concatenate(out)

    return features


class CLIPScore:
    """open_clip CLIP score: mean over samples of max(100·cos(image, prompt), 0) (the torchmetrics
    convention per sample; the paper's ViT-g-14 numbers are on the 0–1 scale, i.e. this / 100)."""

    def __init__(self, model_name: str, weights: str, batch_size: int = 64, device: str | torch.device = "cpu"):
        import open_clip

        if not Path(weights).is_file():
            raise CheckpointError(f"{weights}: open_clip weights file not found (set ADD_BENCH_CLIP)")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        self.model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.batch_size, self.device = batch_size, device

    @torch.no_grad()
    def __call__(self, samples: SampleSet) -> dict[str, float]:
        from PIL import Image

        scores = []
        for i in range(0, len(samples), self.batch_size):
            ims = samples.images[i : i + self.batch_size]
            x = torch.stack([self.preprocess(Image.fromarray(im).convert("RGB")) for im in ims]).to(self.device)
            img = torch.nn.functional.normalize(self.model.encode_image(x), dim=-1)
            tokens = self.tokenizer(samples.prompts[i : i + self.batch_size]).to(self.device)
            txt = torch.nn.functional.normalize(self.model.encode_text(tokens), dim=-1)
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
        return {"clip_score": float(torch.cat(scores).mean() / 100)}


def cluster_suite(cfg: EvalConfig, device: str | torch.device = "cpu") -> list[Metric]:
    """Inception FID (clean-fid) against the COCO images whose captions prompted the samples
    (``add_bench.data.coco.eval_set``: the same pairs), and open_clip CLIP score; both networks on ``device``."""
    from add_bench.data.coco import eval_set

    c = cfg.cluster
    inception = local_weights(
        c.inception,
        "ADD_BENCH_INCEPTION",
        "eval.cluster.inception",
        "a folder holding clean-fid's inception-2015-12-05.pt",
    )
    clip_weights = local_weights(
        c.clip_weights, "ADD_BENCH_CLIP", "eval.cluster.clip_weights", f"an open_clip weights file for {c.clip_model}"
    )
    coco, pick = eval_set(cfg)
    res = cfg.coco.resolution
    key = (
        f"inception-{file_hash(Path(inception) / 'inception-2015-12-05.pt')}_coco-{cfg.coco.split}"
        f"-n{cfg.num_samples}-seed{cfg.seed}-{res}px"
    )
    return [
        FID(inception_features(inception, device=device), lambda: coco.load_images(pick, res), key),
        CLIPScore(c.clip_model, clip_weights, device=device),
    ]


def local_weights(value: str | None, env: str, key: str, what: str) -> str:
    value = value or os.environ.get(env)
    if not value:
        raise CheckpointError(f"{key} is unset and ${env} is empty; accepted: {what}")
    return value


METRIC_SUITES: dict[str, Callable[[EvalConfig], list[Metric]]] = {"embedded": embedded_suite, "cluster": cluster_suite}


def build_suite(cfg: EvalConfig, device: str | torch.device = "cpu") -> list[Metric]:
    """The metrics ``cfg.metrics`` names; the cluster suite's networks on ``device`` (the embedded suite's
    small networks stay on the CPU)."""
    suite = choose(METRIC_SUITES, cfg.metrics, "metrics")
    return suite(cfg, device) if suite is cluster_suite else suite(cfg)


def score(suite: list[Metric], samples: SampleSet) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in suite:
        out.update(metric(samples))
    return out


# ------------------------------------------------------------------------------- command line
def read_samples(path: str | Path) -> SampleSet:
    """An exported sample file (``python -m add_bench.evaluate --export-samples``): ``images`` uint8
    (N, 28, 28) and ``labels`` int (N,); every problem is a DataError naming the file."""
    from add_bench.errors import DataError

    path = Path(path)
    try:
        with np.load(path) as z:
            if not {"images", "labels"} <= set(z.files):
                raise DataError(f"{path}: needs arrays 'images' and 'labels', has {sorted(z.files)}")
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz sample file ({e})") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path}: images of shape {images.shape}; accepted: (N, 28, 28) uint8")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise DataError(
            f"{path}: labels of shape {labels.shape} and dtype {labels.dtype}; accepted: ({len(images)},) int"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(PROMPTS)):
        raise DataError(
            f"{path}: label {labels.min() if labels.min() < 0 else labels.max()} outside 0..{len(PROMPTS) - 1}"
        )
    try:
        return SampleSet(images, labels)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


@command_line(ValueError)
def main(argv: list[str] | None = None) -> int:
    """``python -m add_bench.metrics SAMPLES.npz [--metrics fid,prdc,...] --out metrics.json [key=value ...]``:
    score an exported sample file with the embedded metrics (all by default)."""
    import argparse
    import sys
    import time

    from add_bench.config import add_cfg_option, load, print_job
    from add_bench.errors import DataError
    from add_bench.provenance import atomic_write_json, provenance

    p = argparse.ArgumentParser(prog="python -m add_bench.metrics", description=main.__doc__)
    p.add_argument("samples", help=".npz with images (N, 28, 28) uint8 and labels (N,) int (not read with --cfg job)")
    p.add_argument("--metrics", help="comma-separated names (default: all): fid, alignment, diversity, prdc, intra_fid")
    p.add_argument("--out", help="metrics JSON to write (required unless --cfg job)")
    p.add_argument("overrides", nargs="*", help="EvalConfig overrides key=value (evalnet=..., evalnet_ssl=...)")
    add_cfg_option(p)
    a = p.parse_intermixed_args(argv)
    start = time.time()
    cfg = load(EvalConfig, overrides=a.overrides)
    if a.cfg:
        print_job(cfg)
        return 0
    if not a.out:
        p.error("the following arguments are required: --out")
    names = [n.strip() for n in a.metrics.split(",")] if a.metrics else None
    registry = embedded_metrics(cfg)
    if names is not None:
        select_metrics(dict.fromkeys(registry, lambda: None), names)  # an unknown name fails before any work
    samples = read_samples(a.samples)
    if names is None or "prdc" in names:
        try:
            check_per_class(samples.labels, KNN_K, "k-NN metrics")
        except ValueError as e:
            raise DataError(f"{a.samples}: {e}") from None
    suite = select_metrics(registry, names)
    result = {
        "samples": a.samples,
        "num_samples": len(samples),
        "row": score(suite, samples),
        "metric_features": metric_features(suite),
    }
    result["provenance"] = provenance(
        cfg, cfg.seed, time.time() - start, command=" ".join(["python -m add_bench.metrics", *sys.argv[1:]])
    )
    atomic_write_json(a.out, result)
    print(" ".join(f"{k}={v:.4g}" for k, v in result["row"].items()), file=sys.stderr)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
