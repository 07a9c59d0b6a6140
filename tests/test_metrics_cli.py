"""``python -m add_bench.metrics SAMPLES.npz``: scores an exported sample file; bad input fails in one line."""

import json

import numpy as np
import pytest

from add_bench import metrics


def cli_overrides(assets) -> list[str]:
    return [
        f"evalnet={assets['evalnet']}",
        f"evalnet_ssl={assets['evalnet_ssl']}",
        f"data.root={assets['data']}",
        "data.download=false",
    ]


def write_samples(path, images, labels):
    np.savez(path, images=images, labels=labels)
    return str(path)


def good_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10


def test_scores_an_exported_sample_file(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    path = write_samples(tmp_path / "s.npz", *good_images(60))
    out = tmp_path / "m.json"
    assert metrics.main([path, "--out", str(out), *cli_overrides(tiny_assets)]) == 0
    result = json.loads(out.read_text())
    assert {"fid", "align_prob", "recall", "coverage", "precision", "density", "intra_fid", "recall_uncond"} <= set(
        result["row"]
    )
    assert result["metric_features"]["recall"].startswith("evalnet_ssl")
    assert result["metric_features"]["fid"].startswith("evalnet:")
    assert result["provenance"]["command"].startswith("python -m add_bench.metrics")


@pytest.mark.parametrize(
    "case, needle",
    [
        ("shape", "images of shape (60, 32, 32); accepted: (N, 28, 28) uint8"),
        ("nan", "NaN"),
        ("few", "class 0 has 3 sample(s); k-NN metrics with k=5 need at least 6"),
        ("metric", "metric 'recal': unknown; accepted: fid, alignment, diversity, prdc, intra_fid"),
    ],
)
def test_bad_input_is_one_clear_line_exit_2_and_nothing_written(
    tiny_assets, tmp_path, monkeypatch, capsys, case, needle
):
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    images, labels = good_images(60)
    args = []
    if case == "shape":
        images = np.zeros((60, 32, 32), np.uint8)
    elif case == "nan":
        images = np.where(images > 128, np.nan, images.astype(np.float32))
    elif case == "few":
        images, labels = images[:30], labels[:30]
    else:
        args = ["--metrics", "fid,recal"]
    path = write_samples(tmp_path / "s.npz", images, labels)
    out = tmp_path / "m.json"
    assert metrics.main([path, "--out", str(out), *args, *cli_overrides(tiny_assets)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists() and not (tmp_path / "stats").exists()  # nothing written, not even a reference cache
