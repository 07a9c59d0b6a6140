"""Feature networks: token features with the CLS token added, frozen weights with input gradients,
local-file loading of the cluster networks (timm / open_clip) through the same code as in use,
clear errors, and the embedded pre-training (exact resume, export, loading back)."""

import json
import math

import pytest
import torch

from add_bench import checkpoint
from add_bench.errors import CheckpointError, ConfigError
from add_bench.featnet_pretrain import (
    clip_loss,
    knn_accuracy,
    load_featnet_config,
    pretrain_featnet,
    random_resized_crop,
)
from add_bench.networks.featnets import (
    FEATURE_NETWORKS,
    OpenClipFeatures,
    TimmFeatures,
    build_feature_network,
    load_open_clip_visual,
    prompt_embeddings,
)
from add_bench.networks.unets import load_state, read_card


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on a loaded 2-core machine run far faster on one thread (no OpenMP oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(n=3, c=1, size=28, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_embedded_features_have_cls_added_at_1_based_layers():
    f = build_feature_network("random")
    assert f.layers == [0, 2, 4, 6] and f.dims == [64] * 4 and f.cls_dim == 64
    seen = {}
    f.body.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("block2", o))  # block 2 (1-based)
    f.body.patch_drop.register_forward_hook(lambda m, i, o: seen.setdefault("embed", o))
    x = images()
    feats = f(x)
    assert [t.shape for t in feats] == [(3, 64, 49)] * 4
    for k, key in ((0, "embed"), (1, "block2")):
        h = seen[key]  # (N, 1 + 49, 64): CLS first
        assert h.shape == (3, 50, 64)
        assert torch.allclose(feats[k], (h[:, 1:] + h[:, :1]).transpose(1, 2))
    # c_img: the final-norm CLS token
    assert torch.allclose(f.cls_embedding(x), f.body.forward_features(x)[:, 0], atol=1e-6)
    # RGB input → gray (channel mean); the random network is the same for a fixed seed
    assert torch.allclose(f(x.expand(-1, 3, -1, -1))[2], feats[2], atol=1e-6)
    assert torch.equal(build_feature_network("random").body.pos_embed, f.body.pos_embed)
    assert [t.shape[1] for t in build_feature_network("random", layers=[1, 6])(x)] == [64, 64]


def test_frozen_weights_but_gradient_reaches_the_input():
    f = build_feature_network("random")
    f.train()
    assert not f.training and not any(m.training for m in f.modules())
    assert not any(p.requires_grad for p in f.parameters())
    x = images().requires_grad_(True)
    sum(t.square().mean() for t in f(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in f.parameters())


def test_errors_unknown_name_bad_layers_missing_weights(tmp_path):
    with pytest.raises(ConfigError, match=r"feature_network.name='dinov3'.*clip_s.*dinov2_vits14.*random"):
        build_feature_network("dinov3")
    with pytest.raises(ConfigError, match=r"feature_network.layers=\[0, 7\].*0..6"):
        build_feature_network("random", layers=[0, 7])
    missing = tmp_path / "no_such_folder"
    hint = "python -m add_bench.pretrain featnet dino_s"
    with pytest.raises(CheckpointError, match=rf"{missing}/model.safetensors.*{hint}"):
        build_feature_network("dino_s", weights=str(missing))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/vit.safetensors: .*not found"):
        build_feature_network("dinov2_vits14", weights=str(tmp_path / "vit.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/clip.pt: .*not found"):
        build_feature_network("openclip_vitl14", weights=str(tmp_path / "clip.pt"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=rf"{bad}: cannot load"):
        build_feature_network("dinov1_vits16", weights=str(bad))


def test_timm_vit_from_local_file_matches_the_original(tmp_path):
    import timm
    from safetensors.torch import save_file

    orig = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0).eval()
    path = tmp_path / "dino_vits16.safetensors"
    save_file({k: v.contiguous() for k, v in orig.state_dict().items()}, str(path))
    f = build_feature_network("dinov1_vits16", weights=str(path))
    assert f.layers == [0, 3, 6, 9, 12] and f.dims == [384] * 5
    x = images(2)
    feats = f(x)
    assert [t.shape for t in feats] == [(2, 384, 196)] * 5
    # reference: the original model on the same preprocessing (bilinear resize, 3 channels, ImageNet norm)
    pre = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=224, mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pre = ((pre + 1) / 2 - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        cls = orig(pre)
        last, inter = orig.forward_intermediates(
            pre, indices=[2, 5, 8, 11], return_prefix_tokens=True, output_fmt="NLC"
        )
    assert torch.allclose(f.cls_embedding(x), cls, atol=1e-4)
    for got, (patch, prefix) in zip(feats[1:], inter):  # timm's 0-based block index i = our layer i + 1
        assert torch.allclose(got, (patch + prefix[:, :1]).transpose(1, 2), atol=1e-4)


def test_dinov2_local_file_resamples_positions_to_224(tmp_path):
    import timm

    orig = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)  # 518 px
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(orig.state_dict(), path)
    f = build_feature_network("dinov2_vits14", weights=str(path), layers=[0, 1])
    assert f.body.pos_embed.shape == (1, 1 + 16 * 16, 384) and f.img_size == 224
    assert torch.equal(f.body.blocks[0].attn.qkv.weight, orig.blocks[0].attn.qkv.weight)
    assert [t.shape for t in f(images(1))] == [(1, 384, 256)] * 2


def test_open_clip_visual_from_local_file_matches_the_original(tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-S-32").eval()  # the smallest ViT config; same loader as ViT-L-14
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    visual, mean, std = load_open_clip_visual("ViT-S-32", path)
    f = OpenClipFeatures(visual, [0, 3, 12], mean, std)
    x = images(2)
    feats = f(x)
    assert [t.shape for t in feats] == [(2, 384, 49)] * 3
    pre = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=224, mode="bilinear", antialias=True)
    pre = ((pre + 1) / 2 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        ref = model.visual.forward_intermediates(pre, indices=[2, 11], output_fmt="NLC", output_extra_tokens=True)
        emb = model.encode_image(pre)
    for got, patch, prefix in zip(feats[1:], ref["image_intermediates"], ref["image_intermediates_prefix"]):
        assert torch.allclose(got, (patch + prefix).transpose(1, 2), atol=1e-4)
    assert torch.allclose(f.cls_embedding(x), emb, atol=1e-4) and f.cls_dim == emb.shape[1] == 384
    assert FEATURE_NETWORKS["openclip_vitl14"].arch == "ViT-L-14"


def test_augmentation_and_objective_pieces():
    g = torch.Generator().manual_seed(0)
    x = images(4)
    crops = random_resized_crop(x, 12, (0.1, 0.4), g)
    assert crops.shape == (4, 1, 12, 12) and crops.min() >= -1 and crops.max() <= 1
    full = random_resized_crop(x, 28, (1.0, 1.0), g, ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(full, x, atol=1e-5)  # the whole image, unflipped, is the identity
    emb = torch.nn.functional.normalize(torch.eye(10) + 0.01, dim=-1)
    y = torch.arange(10)
    scale = torch.tensor(math.log(100))
    assert clip_loss(emb, emb, y, scale) < clip_loss(emb, emb, y.roll(1), scale)
    feats = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    assert (
        knn_accuracy(
            feats, torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([0, 1]), k=2
        )
        == 1.0
    )


def tiny(name, data, steps, **kw):
    return load_featnet_config(
        name,
        overrides=[
            f"steps={steps}",
            "batch_size=8",
            "warmup_steps=2",
            "ckpt_every=2",
            "log_every=1",
            "threads=1",
            "knn_train=60",
            "local_crops=2",
            "freeze_last_layer_steps=1",
            f"data.root={data}",
            "data.val_size=50",
            "data.download=false",
            *[f"{k}={v}" for k, v in kw.items()],
        ],
    )


@pytest.mark.parametrize("name", ["dino_s", "clip_s"])
def test_pretrain_resumes_exactly_and_exports_a_loadable_featnet(name, fake_data, tmp_path):
    assert pretrain_featnet(name, tiny(name, fake_data, 4), tmp_path / "full", tmp_path / "w_full")
    # a run stopped by its time budget after step 1 and resumed gives the same weights
    part = tmp_path / "part"
    assert not pretrain_featnet(name, tiny(name, fake_data, 4), part, tmp_path / "w2", budget_minutes=1e-9)
    assert checkpoint.load(part)["step"] == 1
    assert pretrain_featnet(name, tiny(name, fake_data, 4), part, tmp_path / "w2")
    rows = [json.loads(r) for r in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    a, b = load_state(tmp_path / "w_full"), load_state(tmp_path / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = read_card(tmp_path / "w_full")
    assert card["kind"] == "featnet" and card["objective"] == ("dino" if name == "dino_s" else "clip")
    assert card["steps"] == 4 and 0 <= card["metrics"]["knn20_val_accuracy"] <= 1
    f = build_feature_network(name, weights=str(tmp_path / "w_full"))
    assert isinstance(f, TimmFeatures) and [t.shape for t in f(images(2))] == [(2, 64, 49)] * 4
    if name == "clip_s":
        c_text = prompt_embeddings(weights=str(tmp_path / "w_full"))
        assert c_text.shape == (10, 64) and torch.allclose(c_text.norm(dim=1), torch.ones(10), atol=1e-5)
        assert len(card["vocab"]) > 10 and "sneaker" in card["vocab"]


def test_pretrain_config_defaults_and_errors():
    assert load_featnet_config("clip_s").lr != load_featnet_config("dino_s").lr  # per-network defaults apply
    assert load_featnet_config("dino_l").steps == load_featnet_config("dino_s").steps  # one DINO recipe, two sizes
    assert load_featnet_config("dino_l", overrides=["steps=7"]).steps == 7
    with pytest.raises(ConfigError, match=r"featnet='random'.*accepted: clip_s, dino_l, dino_s"):
        load_featnet_config("random")
