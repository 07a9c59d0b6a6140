"""UNet weights (teachers, exported students) are saved in diffusers' layout: diffusers loads them alone."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel

from add_bench.diffusion import Denoiser, sample_ddim, schedule_from_card
from add_bench.errors import CheckpointError
from add_bench.networks.unets import first_layout_bytes, load_unet, read_card, weights_file


def test_a_teacher_loads_and_samples_with_diffusers_alone(tiny_assets):
    folder = tiny_assets["teacher"]
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    patch = read_card(folder)["unet"]["patch"]
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 7, 10])  # 10 = the null class
    scheduler.set_timesteps(4)
    x = F.pixel_unshuffle(noise, patch)  # the UNet works on the 2×2 space-to-depth image
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    by_diffusers = F.pixel_shuffle(x, patch)
    suite = Denoiser(load_unet(folder), schedule_from_card(read_card(folder)), 10)
    torch.testing.assert_close(by_diffusers, sample_ddim(suite, noise, labels, 4), rtol=1e-4, atol=1e-4)
    assert weights_file(folder).relative_to(folder).as_posix() == "unet/diffusion_pytorch_model.safetensors"


def git_blob(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def test_a_first_layout_folder_converts_losslessly_and_its_cells_stay_current(tiny_assets, tmp_path, monkeypatch):
    """``convert_to_diffusers`` keeps every tensor bit for bit (the old file's bytes can be rebuilt from the
    new one) and records the old blob, which ``changed_inputs`` accepts as the same weights."""
    import json
    import shutil

    from add_bench import methods
    from add_bench.networks.unets import convert_to_diffusers, first_layout_bytes
    from add_bench.provenance import blob_id, weights_versions

    old = tmp_path / "teacher_first_layout"
    old.mkdir()
    (old / "model.safetensors").write_bytes(first_layout_bytes(tiny_assets["teacher"]))
    shutil.copy(Path(tiny_assets["teacher"]) / "card.json", old)
    old_blob = blob_id(old / "model.safetensors")
    x = torch.randn(2, 4, 14, 14, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([999, 10]), torch.tensor([3, 10])
    with torch.no_grad():
        before = load_unet(old).unet(x, t, class_labels=labels).sample

    assert convert_to_diffusers(old) == {"file": "model.safetensors", "blob": old_blob}
    assert not (old / "model.safetensors").exists() and weights_file(old).name == "diffusion_pytorch_model.safetensors"
    assert git_blob(first_layout_bytes(old)) == old_blob
    assert json.loads((old / "card.json").read_text())["converted_from"]["blob"] == old_blob
    with torch.no_grad():
        after = UNet2DModel.from_pretrained(old, subfolder="unet").eval()(x, t, class_labels=labels).sample
    assert torch.equal(before, after)
    assert weights_versions({"teacher": old})["teacher"]["aliases"] == [old_blob]
    with pytest.raises(CheckpointError, match="no model.safetensors to convert"):
        convert_to_diffusers(old)

    def cell_recorded(blob):
        monkeypatch.setattr(methods, "recorded_inputs", lambda cell: ({"teacher": old}, {"teacher": blob}))
        return methods.changed_inputs(tmp_path)

    assert cell_recorded(old_blob) == []  # computed on the first layout: the same tensors
    assert cell_recorded(blob_id(weights_file(old))) == []
    assert cell_recorded("0" * 40) == [f"teacher ({old})"]  # other weights


SHIPPED = sorted((Path(__file__).parents[1] / "add_bench" / "weights").glob("*/card.json"))


@pytest.mark.parametrize("card", [c for c in SHIPPED if "unet" in c.read_text()], ids=lambda c: c.parent.name)
def test_every_shipped_unet_is_in_diffusers_layout(card):
    import json

    folder = card.parent
    assert not (folder / "model.safetensors").exists()
    UNet2DModel.from_pretrained(folder, subfolder="unet")
    if converted := json.loads(card.read_text()).get("converted_from"):
        assert git_blob(first_layout_bytes(folder)) == converted["blob"]  # the old file, bit for bit
