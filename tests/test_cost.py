"""The dry run's GPU plan (add_bench.cost, add_bench.memory) on a tiny Stable Diffusion preset equals a hand
calculation: the parameters counted on the loaded networks, the measured per-sample costs composed by hand."""

import json
import re

import pytest
import torch
import yaml
from cluster_assets import save_tiny_open_clip, save_tiny_sd, write_coco
from conftest import tiny_train_overrides

from add_bench import memory, sweep
from add_bench import train as train_mod
from add_bench.config import TrainConfig, load


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory, tiny_assets):
    """A preset file on the tiny SD folder, with a launch profile beside it that names the GPU."""
    root = tmp_path_factory.mktemp("cost")
    sd, coco, clip = save_tiny_sd(root / "sd"), write_coco(root / "coco", split="train2017"), root / "clip.pt"
    save_tiny_open_clip(clip)
    values = {
        "steps": 1000,
        "batch_size": 4,
        "student.network": str(sd),
        "teacher.network": str(sd),
        "teacher.cfg_scale": 1.5,
        "feature_network.name": "random",
        "discriminator.c_img_network": "random",
        "discriminator.c_text_network": "openclip_vits32",
        "discriminator.c_text_weights": str(clip),
        "coco.root": str(coco),
        "coco.resolution": 16,
    }
    evaluation = {k: v for k, v in (o.split("=", 1) for o in tiny_train_overrides(tiny_assets)) if k.startswith("eval")}
    nested: dict = {}
    for key, value in (values | evaluation).items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump(nested))
    (root / "launch").mkdir()
    (root / "launch" / "tiny.yaml").write_text("gpu: A100-80GB\n")
    return preset, [f"{k}={v}" for k, v in values.items()], root


def hand_calculation(overrides: list[str], teacher_steps: int) -> tuple[float, float, float]:
    """(peak GiB, seconds per step, GPU-hours) of a tiny cell on an A100-80GB in fp32, written out."""
    cfg = load(TrainConfig, overrides=[*overrides, f"teacher.steps={teacher_steps}"])
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)  # the networks the cell loads, counted directly

    def count(module):
        return sum(p.numel() for p in module.parameters())

    p_student, p_teacher, p_vae = count(nets.student.unet), count(nets.teacher.unet), count(nets.sd.vae)
    p_text, p_features, p_heads = count(nets.sd.text_encoder), count(nets.feature_network), count(nets.discriminator)
    p_c_text = count(nets.text_encoder.model) - 1  # open_clip's text tower without logit_scale
    # c_img: the same network as F (random, no weights), held once
    fixed = 20 * p_student + 16 * p_heads + 4 * (p_teacher + p_vae + p_text + p_features + p_c_text) + 2**30
    # per-sample costs measured on the meta device (add_bench.memory): 8×8 latents, 16 px images
    folder = str(cfg.student.network)
    unet, (decode, encode) = memory.unet_pass(folder, 8, True), memory.vae_passes(folder, 16)
    teacher, features = memory.unet_pass(folder, 8, False), memory.vision_pass("random", True)
    per_sample = unet.activations + decode.activations + features.activations  # fp32, no checkpointing
    peak = (fixed + 4 * per_sample) * 1.15  # the whole batch of 4 at once; ALLOCATOR_OVERHEAD
    flops = (
        3 * unet.flops  # student forward + backward
        + 3 * decode.flops  # x̂θ decoded, forward + backward
        + encode.flops  # the real image's latent
        + 3 * features.flops  # F on the fakes, forward + backward
        + features.flops  # F on the reals
        + features.flops  # c_img (the same network)
        + teacher_steps * 2 * teacher.flops  # CFG 1.5: conditional and unconditional
        + decode.flops  # the target decoded
    )
    seconds = 4 * flops / (19.5e12 * 0.35)  # batch 4; A100 fp32 peak; MFU
    return peak / 2**30, seconds, 1000 * seconds / 3600


def test_dry_run_gpu_plan_is_the_hand_calculation(tiny_preset, capsys):
    preset, overrides, root = tiny_preset
    sweep.main(["teacher.steps=1,2", f"base={preset}", "--dry-run", "--out", str(root / "out")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "A100-80GB" in line]
    assert len(lines) == 2
    for steps, line in zip((1, 2), lines):
        gib, seconds, hours = hand_calculation(overrides, steps)
        micro, shown_gib, shown_seconds, shown_hours = line.split()[-4:]
        assert (int(micro), shown_gib, shown_seconds, shown_hours) == (
            4,
            f"{gib:.2f}",
            f"{seconds:.3g}",
            f"{hours:.2f}",
        )
        cfg = load(TrainConfig, overrides=[*overrides, f"teacher.steps={steps}"])
        est = memory.estimate(cfg, "A100-80GB")
        assert est.peak / 2**30 == pytest.approx(gib, rel=1e-12)
        assert est.seconds_per_step == pytest.approx(seconds, rel=1e-12)


def test_a_cell_that_does_not_fit_is_refused_with_its_memory(tiny_preset, capsys):
    preset, _, root = tiny_preset
    args = ["teacher.steps=1,2", f"base={preset}", "batch_size=40000", "--dry-run", "--gpu", "A100-40GB"]
    assert sweep.main([*args, "--out", str(root / "out")]) == 2  # 40000 samples at once
    message = capsys.readouterr().err
    assert re.search(r"2 cell\(s\) do not fit", message)
    where = r"cell \w{12} \(teacher.steps/1 seed 0\): ≈ [\d.]+ GiB at micro-batch 40000 on one A100-40GB \(40 GiB\)"
    assert re.search(where, message) and "samples per micro-batch fit" in message


def test_a_submission_whose_cell_does_not_fit_the_profiles_gpu_is_refused_before_anything_is_submitted(
    tiny_preset, capsys
):
    """The launch profile names an A100-80GB: a SLURM submission checks the fit as the dry run does and
    stops before sbatch (no job ids recorded)."""
    preset, _, root = tiny_preset
    out = root / "submit"
    args = ["teacher.steps=1,2", f"base={preset}", "batch_size=40000", "--launcher", "slurm", "--out", str(out)]
    assert sweep.main(args) == 2
    assert re.search(r"2 cell\(s\) do not fit", capsys.readouterr().err)
    assert not (out / "cells" / "slurm_jobs.json").exists()


def test_unknown_gpu_names_the_accepted_ones(tiny_preset, capsys):
    preset, _, root = tiny_preset
    args = ["teacher.steps=1,2", f"base={preset}", "--dry-run", "--gpu", "B200", "--out", str(root / "out")]
    assert sweep.main(args) == 2
    assert "--gpu='B200': unknown; accepted: A100-40GB, A100-80GB, H100-80GB, L40S-48GB" in capsys.readouterr().err


def test_the_shipped_architecture_configs_have_the_published_parameter_counts():
    """add_bench/presets/model_configs (the plan's SD2.1 and SDXL, configs only): built on the meta device, each
    network has the parameter count of the released model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from add_bench.cost import model_configs_dir

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    published = {
        ("sd21", "unet"): 865_910_724,
        ("sd21", "vae"): 83_653_863,
        ("sd21", "text_encoder"): 340_387_840,
        ("sdxl", "unet"): 2_567_463_684,
        ("sdxl", "vae"): 83_653_863,
        ("sdxl", "text_encoder"): 123_060_480,
        ("sdxl", "text_encoder_2"): 694_659_840,
    }
    builders = {
        "unet": lambda f: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(f)),
        "vae": lambda f: AutoencoderKL.from_config(AutoencoderKL.load_config(f)),
        "text_encoder": lambda f: CLIPTextModel(CLIPTextConfig.from_pretrained(f)),
        "text_encoder_2": lambda f: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(f)),
    }
    for (model, part), n in published.items():
        with torch.device("meta"):
            assert count(builders[part](model_configs_dir() / model / part)) == n, (model, part)


def test_the_cost_command_writes_each_cells_estimate(tiny_preset, tmp_path):
    from add_bench import cost

    preset, overrides, _ = tiny_preset
    out = tmp_path / "plan.json"
    assert cost.main(["ablations/loss_weighting.yaml", f"base={preset}", "--gpu", "A100-80GB", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert [r["cell"] for r in plan["rows"]] == ["exp", "sds", "nfsd"] and plan["cells"] == 3
    for row in plan["rows"]:
        cfg = load(TrainConfig, overrides=[*overrides, f"loss.weighting={row['cell']}"])
        est = memory.estimate(cfg, "A100-80GB")
        assert row["gpu_hours"] == pytest.approx(est.gpu_hours) and row["micro_batch"] == est.micro_batch
    assert plan["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in plan["rows"]))
    assert plan["provenance"]["command"].startswith("python -m add_bench.cost ablations/loss_weighting.yaml")
