import numpy as np
import pytest

from add_bench import metrics
from add_bench.metrics import FID, Alignment, SampleSet


def random_projection_features(images: np.ndarray) -> np.ndarray:
    """A fixed, non-trivial feature map: 16 random projections of the pixels."""
    w = np.random.default_rng(123).normal(size=(images[0].size, 16))
    return np.tanh(images.reshape(len(images), -1).astype(np.float64) / 255 @ w / 10)


@pytest.fixture()
def real_images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(8, 20, (2000, 2))
    return (255 * np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 20)).astype(np.uint8)


def test_fid_against_itself_is_zero_and_grows_with_noise(tmp_path, monkeypatch, real_images):
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path)
    fid = FID(random_projection_features, lambda: real_images, "test-ref")
    assert abs(fid.distance(real_images)) < 1e-6
    rng = np.random.default_rng(1)
    values = []
    for sigma in (5, 20, 60):
        noisy = np.clip(real_images + rng.normal(0, sigma, real_images.shape), 0, 255).astype(np.uint8)
        values.append(fid.distance(noisy))
    assert 0 < values[0] < values[1] < values[2]
    assert (tmp_path / "test-ref.npz").is_file()  # reference statistics cached once


def test_fid_reference_cache_is_reused(tmp_path, monkeypatch, real_images):
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path)
    calls = []

    def ref():
        calls.append(1)
        return real_images

    FID(random_projection_features, ref, "k").distance(real_images[:500])
    FID(random_projection_features, ref, "k").distance(real_images[:500])
    assert len(calls) == 1


def test_alignment_uses_conditioning_class():
    class FakeScorer:
        def probabilities(self, images):
            p = np.full((len(images), 10), 0.05)
            p[:, 3] = 0.55
            return p

    a = Alignment(FakeScorer())
    s = SampleSet(np.zeros((4, 28, 28), np.uint8), np.array([3, 3, 1, 2]))
    out = a(s)
    assert out["align_acc"] == pytest.approx(0.5)
    assert out["align_prob"] == pytest.approx((0.55 * 2 + 0.05 * 2) / 4)


def test_sample_set_validates():
    with pytest.raises(ValueError, match="uint8"):
        SampleSet(np.zeros((2, 28, 28), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        SampleSet(np.zeros((2, 28, 28), np.uint8), np.array([0, 1, 2]))
    assert SampleSet(np.zeros((1, 28, 28), np.uint8), np.array([7])).prompts == ["a photo of a sneaker"]


def test_diversity_is_zero_for_one_image_per_class_and_grows_with_spread(real_images):
    from add_bench.metrics import Diversity

    labels = np.repeat(np.arange(10), 20)
    templates = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    collapsed = SampleSet(templates[labels], labels)  # every noise → the class's one image
    assert Diversity()(collapsed)["diversity"] == pytest.approx(0.0, abs=1e-12)
    spread = SampleSet(np.array([0, 255] * 100, np.uint8)[:, None, None].repeat(28, 1).repeat(28, 2), labels)
    assert Diversity()(spread)["diversity"] == pytest.approx(0.5)  # black/white halves: std 0.5 in [0, 1] units
    real = Diversity()(SampleSet(real_images[:200], labels))["diversity"]
    assert 0.05 < real < 0.5


# ------------------------------------------------------------------ diversity-aware metrics
def brute_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def test_knn_radii_match_brute_force():
    import torch

    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    got = metrics.knn_radii(torch.from_numpy(x), 5, chunk=64).numpy()
    assert np.allclose(got, brute_radii(x.astype(np.float64), 5), rtol=1e-4, atol=1e-4)


def test_prdc_on_known_configurations():
    import torch

    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(400, 4)).astype(np.float32))
    same = metrics.precision_recall_density_coverage(real, real.clone(), 5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0 + 1 / 5, abs=0.05)  # each point lies in its own ball and ≈ k others
    far = metrics.precision_recall_density_coverage(real, real + 100.0, 5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = metrics.precision_recall_density_coverage(real, real[:1].repeat(400, 1), 5)
    assert collapsed["recall"] < 0.01 and collapsed["coverage"] < 0.05  # one point: nothing of the rest is recalled
    half = metrics.precision_recall_density_coverage(real, real[real[:, 0] > 0], 5)
    assert 0.3 < half["recall"] < 0.75 and half["precision"] > 0.9  # half the manifold: faithful, not diverse


def test_frechet_to_reference_equals_clean_fid():
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(0.3, 1.5, size=(400, 16)) @ rng.normal(size=(16, 16))
    (mu_a, s_a), (mu_b, s_b) = metrics.gaussian_stats(a), metrics.gaussian_stats(b)
    ours = metrics.frechet_to_reference(mu_a, s_a, mu_b, s_b, metrics.psd_sqrt(s_b))
    assert ours == pytest.approx(frechet_distance(mu_a, s_a, mu_b, s_b), rel=1e-6)


def class_blobs(n_per_class: int, seed: int) -> SampleSet:
    """Per class a blob at its own place whose position varies within the class (within-class variation)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    labels = np.tile(np.arange(10), n_per_class)
    cy = 4 + 2 * labels + rng.uniform(-2, 2, len(labels))
    cx = 14 + rng.uniform(-6, 6, len(labels))
    images = 255 * np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 12)
    return SampleSet(images.astype(np.uint8), labels)


def blob_reference(tmp_path, monkeypatch) -> metrics.ClassReference:
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path)
    ref = class_blobs(60, 0)
    return metrics.ClassReference(random_projection_features, lambda: (ref.images, ref.labels), "blobs", 5)


def test_class_conditional_metrics_see_within_class_collapse(tmp_path, monkeypatch):
    reference = blob_reference(tmp_path, monkeypatch)
    prdc, intra = metrics.ManifoldMetrics(reference, "random"), metrics.IntraFID(reference, "random")
    real = class_blobs(30, 1)
    first = np.array([np.flatnonzero(real.labels == c)[0] for c in range(10)])
    collapsed = SampleSet(real.images[first][real.labels], real.labels)  # one image per class, repeated
    good, bad = prdc(real) | intra(real), prdc(collapsed) | intra(collapsed)
    assert good["recall"] > 0.7 and bad["recall"] == 0.0
    assert good["coverage"] > 3 * bad["coverage"]
    assert bad["intra_fid"] > 3 * good["intra_fid"]
    swapped = SampleSet(real.images, (real.labels + 5) % 10)  # right images, labelled as a distant class
    assert prdc(swapped)["precision"] < 0.5 * good["precision"]  # class-conditional: judged against the label's class
    assert (tmp_path / "blobs_k5.npz").is_file()  # reference radii and statistics cached


def test_too_few_samples_per_class_is_a_clear_error(tmp_path, monkeypatch):
    reference = blob_reference(tmp_path, monkeypatch)
    few = class_blobs(5, 1)  # 5 per class: k = 5 needs 6
    with pytest.raises(ValueError, match="class 0 has 5 sample"):
        metrics.ManifoldMetrics(reference, "random")(few)


def test_unknown_metric_name_lists_the_accepted_ones():
    from add_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="metric 'recal': unknown; accepted: a, b"):
        metrics.select_metrics({"a": lambda: 1, "b": lambda: 2}, ["a", "recal"])


def test_nan_images_are_named():
    with pytest.raises(ValueError, match="NaN"):
        SampleSet(np.full((2, 28, 28), np.nan), np.array([0, 1]))


def test_fid_and_alignment_share_one_pass_of_the_evaluation_network(tiny_assets):
    import torch

    from add_bench.data import to_model_range

    scorer = metrics.EvalNetScorer(tiny_assets["evalnet"], batch_size=7)
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    calls = []
    scorer.net.trunk.register_forward_hook(lambda *_: calls.append(1))
    feats, probs = scorer.features(images), scorer.probabilities(images)
    assert len(calls) == 3  # one pass: 3 batches of at most 7, shared by both
    with torch.no_grad():  # the same numbers as running the network for each, batch by batch
        ref = [scorer.net(to_model_range(images[i : i + 7])).softmax(1).numpy() for i in range(0, 20, 7)]
    assert np.array_equal(probs, np.concatenate(ref))
    assert feats.shape == (20, 128)
    before = len(calls)
    scorer.features(images.copy())  # another array: computed anew
    assert len(calls) == before + 3
