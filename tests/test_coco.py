"""COCO 2017 captions reader (cluster scale) on a tiny COCO-layout folder the test writes."""

import numpy as np
import pytest
from cluster_assets import write_coco

from add_bench.data.coco import ENV_VAR, load_captions, to_model_range
from add_bench.errors import DataError


def test_pairs_images_and_the_eval_set(tmp_path):
    coco = load_captions(str(write_coco(tmp_path / "coco")), "val2017")
    assert len(coco) == 12 and coco.captions[0] == "image 0 caption 0"  # stripped, sorted by image id
    ims = coco.load_images([0, 11], 8)
    assert ims.shape == (2, 8, 8, 3) and ims.dtype == np.uint8
    assert ims[..., 0].max() < 20 and ims[..., 2].max() < 20 and ims[..., 1].min() > 180  # centre crop: green only
    x = to_model_range(ims)
    assert x.shape == (2, 3, 8, 8) and -1 <= x.min() and x.max() <= 1
    pick = coco.eval_pairs(4, seed=0)
    assert len(set(coco.image_ids[pick].tolist())) == 4  # distinct images, one caption each
    assert (pick == coco.eval_pairs(4, seed=0)).all() and not (pick == coco.eval_pairs(4, seed=1)).all()
    with pytest.raises(DataError, match=r"captions_val2017.json: 6 images, fewer than the 7 asked for"):
        coco.eval_pairs(7)


def test_images_decoded_by_worker_threads_are_the_same_images_in_the_same_order(tmp_path):
    from PIL import Image

    coco = load_captions(str(write_coco(tmp_path / "coco")), "val2017")
    for k, path in enumerate(dict.fromkeys(coco.files)):  # each image file a distinct grey level
        Image.new("RGB", (40, 20), (30 * k, 30 * k, 30 * k)).save(path)
    index = [11, 0, 5, 3, 8, 0]
    alone = coco.load_images(index, 8)
    assert len({int(im[0, 0, 0]) for im in alone}) == 5  # five distinct images (index 0 twice)
    assert (coco.load_images(index, 8, workers=4) == alone).all()
    with pytest.raises(DataError, match=r"not a readable image"):
        coco.files[3].write_bytes(b"not a jpeg")
        coco.load_images(index, 8, workers=4)


def test_root_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(write_coco(tmp_path / "c")))
    assert len(load_captions(None)) == 12
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(DataError, match=r"COCO not configured: coco.root is unset and \$ADD_BENCH_COCO is empty"):
        load_captions(None)


def test_bad_coco_folders(tmp_path):
    with pytest.raises(DataError, match=r"coco.root=.*nowhere: no such directory"):
        load_captions(str(tmp_path / "nowhere"))
    root = write_coco(tmp_path / "coco")
    with pytest.raises(DataError, match=r"coco.split='test2017': accepted are train2017, val2017"):
        load_captions(str(root), "test2017")
    with pytest.raises(DataError, match=r"annotations/captions_train2017.json: file not found; download COCO 2017"):
        load_captions(str(root), "train2017")
    ann = root / "annotations" / "captions_val2017.json"
    ann.write_text('{"images": []}')
    with pytest.raises(DataError, match=r"captions_val2017.json: not a COCO captions file \(KeyError"):
        load_captions(str(root))
    write_coco(root)
    coco = load_captions(str(root))
    (root / "val2017" / "000000000001.png").unlink()
    (root / "val2017" / "000000000002.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"000000000001.png: image file not found"):
        coco.load_images([2], 8)
    with pytest.raises(DataError, match=r"000000000002.png: not a readable image"):
        coco.load_images([4], 8)
