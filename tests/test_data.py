import gzip

import numpy as np
import pytest
import torch
from conftest import make_fake_fashion_mnist, write_idx

from add_bench.data import CLASS_NAMES, PROMPTS, load_split, prompt, to_model_range, to_uint8
from add_bench.data.fashion_mnist import read_idx
from add_bench.errors import DataError


def test_idx_reader_roundtrip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x.gz", a)), a)
    b = np.arange(5, dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "y", b, gz=False)), b)


def test_splits_sizes_disjoint_and_stratified(fake_data):
    train = load_split("train", str(fake_data), val_size=50)
    val = load_split("val", str(fake_data), val_size=50)
    test = load_split("test", str(fake_data), val_size=50)
    assert (len(train), len(val), len(test)) == (250, 50, 100)
    assert np.bincount(val.labels, minlength=10).tolist() == [5] * 10
    # the carve-out is fixed: same seed, same split
    assert np.array_equal(load_split("val", str(fake_data), val_size=50).images, val.images)
    x, y = train.tensors()
    assert x.shape == (250, 1, 28, 28) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.int64


def test_prompts():
    assert prompt(7) == "a photo of a sneaker" and len(PROMPTS) == len(CLASS_NAMES) == 10


def test_uint8_roundtrip():
    a = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    assert np.array_equal(to_uint8(to_model_range(a)), a)


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope.*no such directory.*apt-get install dataset-fashion-mnist"):
        load_split("train", str(tmp_path / "nope"))


def test_missing_file_in_folder(tmp_path):
    make_fake_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz"):
        load_split("test", str(tmp_path))


def test_truncated_idx_file(tmp_path):
    make_fake_fashion_mnist(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(f.read_bytes())
    f.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: truncated"):
        load_split("train", str(tmp_path), val_size=50)
    f.write_bytes(f.read_bytes()[:50])  # a cut gzip stream
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot be read"):
        read_idx(f)


def test_wrong_image_shape(tmp_path):
    make_fake_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((100, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: images of shape \(32, 32\), expected \(28, 28\)"):
        load_split("test", str(tmp_path))


def test_unknown_split(fake_data):
    with pytest.raises(DataError, match="accepted are 'train', 'val', 'test'"):
        load_split("validation", str(fake_data))
