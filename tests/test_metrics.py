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
