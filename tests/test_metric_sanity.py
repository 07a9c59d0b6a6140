"""The metric sanity ladder, small: real Fashion-MNIST images and the shipped evaluation networks."""

import json

import pytest

from add_bench import metric_sanity, metrics
from add_bench.config import EvalConfig, load
from add_bench.data.fashion_mnist import DEBIAN_DIR

pytestmark = pytest.mark.skipif(
    not DEBIAN_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (scripts/setup.sh)"
)


@pytest.fixture(scope="module")
def small_ladder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ladder")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "STATS_CACHE", tmp / "stats")
        cfg = load(EvalConfig, overrides=["data.download=false", "batch_size=300"])
        result = metric_sanity.run(tmp / "out", cfg, 600, [], [], timing=False, spaces=("evalnet_ssl",))
    return tmp / "out", result


def test_the_ladder_is_ordered_on_the_headline_metrics(small_ladder):
    _, result = small_ladder
    rows = {r["generator"]: r for r in result["rows"]}
    chain = [rows["held-out real (val split)"]] + [
        rows[f"{n} real image{'s' * (n > 1)} per class, repeated"] for n in (20, 5, 2, 1)
    ]
    coverage = [r["coverage@evalnet_ssl"] for r in chain]
    intra = [r["intra_fid@evalnet_ssl"] for r in chain]
    recall = [r["recall@evalnet_ssl"] for r in chain]
    assert coverage == sorted(coverage, reverse=True) and len(set(coverage)) == len(coverage)
    assert intra == sorted(intra) and len(set(intra)) == len(intra)
    assert recall[0] >= 0.8 and all(r <= 0.05 for r in recall[2:])  # held-out real; ≤ 5 images per class
    assert all(result["checks"]["monotone"].values()) and result["checks"]["recall"]["evalnet_ssl"]["bars_met"]
    # the degradations are worse than held-out real on the per-class FID
    for name in ("class-mean image", "held-out real, Gaussian blur σ = 1.5 px", "held-out real, 20% wrong labels"):
        assert rows[name]["intra_fid@evalnet_ssl"] > 2 * intra[0], name


def test_the_ladder_writes_its_table_plot_and_provenance(small_ladder):
    out, result = small_ladder
    assert {p.name for p in out.iterdir()} >= {"ladder.json", "table.md", "table.csv", "ladder.png"}
    stored = json.loads((out / "ladder.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(result["rows"]))
    assert {"git_commit", "seed", "wall_time_s", "machine", "config"} <= set(stored["provenance"])
    assert "held-out real (val split)" in (out / "table.md").read_text()


def test_bad_sample_count_is_refused():
    from add_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="--num-samples 55: needs a multiple of 10"):
        metric_sanity.run(None, load(EvalConfig), 55, [], [])
