"""Shared fixtures: tiny Fashion-MNIST-format IDX files written by the tests (no network, no real data)."""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

# pytest-xdist (``-n auto`` in pyproject.toml) runs one test process per core: each keeps to one torch thread,
# so the processes do not oversubscribe the cores (a test's own subprocesses choose their threads themselves)
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the group marks into node ids
def pytest_collection_modifyitems(items):
    """The tests that submit to the one local SLURM cluster run in one test process, one after another
    (``--dist loadgroup``): its start/stop fixture and its two slots are not shared between processes."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_fake_fashion_mnist(folder: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Class-dependent blobs so that a classifier and a diffusion model have something to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        yy, xx = np.mgrid[:28, :28]
        images = np.stack(
            [
                255 * np.exp(-(((yy - 6 - 1.5 * c) ** 2) + (xx - 14) ** 2) / 30.0) + rng.normal(0, 10, (28, 28))
                for c in labels
            ]
        ).clip(0, 255)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> Path:
    return make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, fake_data) -> dict[str, str]:
    """Random-weight tiny networks saved and loaded through the real code paths: a teacher (tiny UNet)
    and a clip_s-format text/image model for c_text. The feature network is the weight-free ``random``."""
    import torch

    from add_bench.config import ScheduleConfig, to_dict
    from add_bench.data import PROMPTS
    from add_bench.networks.featnets import FEATURE_NETWORKS, ClipS, prompt_vocab
    from add_bench.networks.unets import build_unet, save_weights, unet_config

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    teacher = root / "teacher_tiny"
    save_weights(
        teacher,
        build_unet("tiny"),
        {"kind": "teacher", "unet": unet_config("tiny"), "schedule": to_dict(ScheduleConfig()), "null_label": 10},
        fp16=False,
    )
    arch = dict(FEATURE_NETWORKS["clip_s"].arch)
    clip = root / "clip_tiny"
    vocab = prompt_vocab(PROMPTS)
    save_weights(
        clip,
        ClipS(arch, vocab, 16),
        {"kind": "featnet", "objective": "clip", "arch": arch, "vocab": vocab, "clip_embed_dim": 16},
        fp16=False,
    )
    from add_bench.networks.evalnet import EmbedNet, EvalNet

    evalnet = root / "evalnet_tiny"
    save_weights(evalnet, EvalNet().eval(), {"kind": "evalnet"}, fp16=False)
    evalnet_ssl = root / "evalnet_ssl_tiny"
    save_weights(evalnet_ssl, EmbedNet(4).eval(), {"kind": "evalnet_ssl", "width": 4}, fp16=False)
    return {
        "teacher": str(teacher),
        "clip": str(clip),
        "data": str(fake_data),
        "evalnet": str(evalnet),
        "evalnet_ssl": str(evalnet_ssl),
    }


def tiny_train_overrides(assets: dict[str, str], **extra) -> list[str]:
    base = {
        "steps": 4,
        "batch_size": 8,
        "ckpt_every": 2,
        "log_every": 1,
        "threads": 1,
        "student.network": assets["teacher"],
        "teacher.network": assets["teacher"],
        "feature_network.name": "random",
        "discriminator.c_img_network": "random",
        "discriminator.c_text_weights": assets["clip"],
        "data.root": assets["data"],
        "data.val_size": 50,
        "data.download": False,
        "optim.warmup_steps": 2,
        "eval.num_samples": 60,
        "eval.batch_size": 30,
        "eval.evalnet": assets["evalnet"],
        "eval.evalnet_ssl": assets["evalnet_ssl"],
        "eval.data.root": assets["data"],
        "eval.data.download": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
