"""Cluster-scale metrics load weights from a local path (hubs are offline): tested with random-weight
stand-ins saved in the real formats (a torchscript Inception with clean-fid's interface; open_clip)."""

import numpy as np
import pytest
import torch
from cluster_assets import save_fake_inception, save_tiny_open_clip

from add_bench import metrics
from add_bench.errors import CheckpointError
from add_bench.metrics import FID, CLIPScore, SampleSet, inception_features


@pytest.fixture()
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)


def test_inception_fid_through_clean_fid_from_a_local_folder(tmp_path, monkeypatch, images):
    feats = inception_features(save_fake_inception(tmp_path), batch_size=16, device=torch.device("cpu"))
    f = feats(images[:5])
    assert f.shape == (5, 2048)
    assert np.isfinite(f).all()
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    fid = FID(feats, lambda: images, "fake-inception")
    assert abs(fid.distance(images)) < 1e-3


def test_inception_missing_weights_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"inception-2015-12-05.pt: missing"):
        inception_features(tmp_path)


def test_clip_score_from_a_local_open_clip_file(tmp_path, images):
    save_tiny_open_clip(tmp_path / "vit-s-32.pt")
    score = CLIPScore("ViT-S-32", str(tmp_path / "vit-s-32.pt"), batch_size=16, device=torch.device("cpu"))
    samples = SampleSet(images[:8], np.arange(8))
    out = score(samples)["clip_score"]
    # the same computation by hand: max(100·cos, 0) per sample, mean, /100
    from PIL import Image

    with torch.no_grad():
        x = torch.stack([score.preprocess(Image.fromarray(im).convert("RGB")) for im in images[:8]])
        img = torch.nn.functional.normalize(score.model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(score.model.encode_text(score.tokenizer(samples.prompts)), dim=-1)
    expected = (100 * (img * txt).sum(-1)).clamp(min=0).mean().item() / 100
    assert out == pytest.approx(expected, abs=1e-6) and 0 <= out <= 1


def test_clip_score_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no_such.pt: open_clip weights file not found"):
        CLIPScore("ViT-S-32", str(tmp_path / "no_such.pt"))
