"""The sweep runner: expansion, shared cells, resume after SIGKILL, failures, locks, bad input."""

import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_train_overrides

from add_bench import sweep
from add_bench.errors import ConfigError
from add_bench.networks.unets import weights_file

REPO = Path(__file__).resolve().parent.parent


def tiny_preset(assets, folder: Path, **extra) -> Path:
    values = dict(o.split("=", 1) for o in tiny_train_overrides(assets, **{"steps": 3, **extra}))
    cfg = {}
    for k, v in values.items():
        node = cfg
        *parents, leaf = k.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(v)
    path = folder / "tiny_preset.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ablation_file(folder: Path, preset: Path, name="mini", cells=None) -> Path:
    cells = cells or [
        {"name": "exp", "label": "exp", "default": True, "paper": {"fid": 20.6, "cs": 0.319}},
        {"name": "sds", "label": "sds", "paper": {"fid": 22.3, "cs": 0.325}, "set": {"loss.weighting": "sds"}},
    ]
    path = folder / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "table": "1d",
                "title": "mini",
                "base": str(preset),
                "seeds": [0],
                "eval_steps": [1, 2],
                "cells": cells,
            }
        )
    )
    return path


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADD_BENCH_CACHE", str(tmp_path / "cache"))
    from add_bench import metrics

    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "cache" / "fid_stats")
    return tmp_path


def test_every_ablation_and_probe_file_loads_and_its_default_row_is_the_default_cell():
    """A probe is read beside Table 1 only if its default row is Table 1's default cell, seed for seed, in
    the probe's own setting: a file's ``set`` (e.g. another teacher) applied to Table 1's default cell."""

    @functools.cache
    def defaults(overrides: tuple[str, ...]):
        path = REPO / "ablations" / "loss_weighting.yaml"
        return {c.seed: c.id for a in sweep.load_ablations(path, list(overrides)) for c in a.cells if c.default}

    files = sorted((REPO / "ablations").rglob("*.yaml"))
    assert {"training_length.yaml", "teacher_quality.yaml", "collapse.yaml"} <= {f.name for f in files}
    setting = {}
    for path in files:
        data = yaml.safe_load(path.read_text())
        if "include" in data:
            continue
        over = [f"{k}={v}" for k, v in (data.get("set") or {}).items()]
        setting[path.name] = over
        for a in sweep.load_ablations(path, ["seeds=[0,1,2]"]):
            rows = {c.seed: c.id for c in a.cells if c.default}
            assert rows == defaults(("seeds=[0,1,2]", *over)), f"{path}: {a.name}'s default row is not the default cell"
    assert setting["loss_weighting.yaml"] == [] and setting["regression.yaml"] != []  # the check compares settings


def test_every_ablation_file_expands_and_the_default_cell_is_shared():
    abls = sweep.load_ablations(REPO / "ablations" / "table1.yaml")
    names = {a.name for a in abls}
    assert names == {
        "feature_network",
        "conditioning",
        "student_init",
        "loss_terms",
        "loss_weighting",
        "teacher_type",
        "teacher_steps",
    }
    defaults = {c.id for a in abls for c in a.cells if c.default}
    assert len(defaults) == 1  # the default row is one cell in all seven
    assert all(any(c.default for c in a.cells) for a in abls)
    ids = [c.id for a in abls for c in a.cells]
    assert len(set(ids)) == len(ids) - 6
    three = sweep.load_ablations(REPO / "ablations" / "loss_weighting.yaml", ["seeds=[0,1,2]", "steps=50"])[0]
    assert [c.seed for c in three.cells] == [0, 1, 2] * 3 and all(c.config.steps == 50 for c in three.cells)
    assert len({c.id for c in three.cells}) == 9


def test_cell_id_ignores_how_a_cell_is_run_but_not_what_it_computes():
    path = REPO / "ablations" / "loss_weighting.yaml"
    base = [c.id for c in sweep.load_ablations(path)[0].cells]
    run_differently = sweep.load_ablations(path, ["threads=1", "ckpt_every=7", "keep_checkpoints=3", "log_every=3"])[0]
    assert [c.id for c in run_differently.cells] == base
    for override in ("steps=999", "optim.student_lr=0.001", "eval.num_samples=100", "seeds=[1]"):
        assert all(a != b for a, b in zip(base, [c.id for c in sweep.load_ablations(path, [override])[0].cells]))


def test_committed_cells_keep_their_ids():
    """Every committed cell's stored config hashes to its folder name, so fields added to the schema
    later (declared with config.added) never orphan finished cells."""
    from add_bench.config import TrainConfig, load

    folders = sorted((REPO / "results" / "cells").glob("*/config.yaml"))
    assert folders, "no committed cells under results/cells"
    for path in folders:
        assert sweep.cell_id(load(TrainConfig, path)) == path.parent.name, path


def leaf_keys(values: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        out |= leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key}
    return out


def test_a_field_missing_from_a_committed_cell_is_declared_added():
    """A schema field that a committed cell's config.yaml lacks entered the schema after that cell: it
    must be declared with config.added (or be an execution key), else the cell's id changes."""
    from omegaconf import OmegaConf

    from add_bench.config import TrainConfig, added_fields

    declared = added_fields(TrainConfig)
    schema = leaf_keys(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    for path in sorted((REPO / "results" / "cells").glob("*/config.yaml")):
        for key in sorted(schema - leaf_keys(yaml.safe_load(path.read_text()))):
            parts = key.split(".")
            known = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            assert known & (set(declared) | set(sweep.EXECUTION_KEYS)), (
                f"TrainConfig field '{key}' is not in the committed cell {path} and is not declared "
                f"with config.added(version, default) at its dataclass field"
            )


def test_added_fields_are_the_hand_kept_list_they_replace():
    from add_bench.config import SCHEMA_VERSION, TrainConfig, added_fields

    declared = added_fields(TrainConfig)
    assert {key: a.reproduces for key, a in declared.items()} == {
        "eval.evalnet_ssl": "evalnet_ssl",
        "student.zero_terminal_snr": True,
        "student.timestep_draw": "uniform",
        "discriminator.steps": 1,
        "discriminator.minibatch_std": 0,
        "loss.regression_weight": 0.0,
        "loss.regression_pairs": 2048,
        "loss.regression_steps": 10,
        "loss.denoising_weight": 0.0,
        "loss.denoising_weighting": "v",
        "eval.coco": {"root": None, "split": "val2017", "resolution": 512},
        "eval.cluster": {"inception": None, "clip_model": "ViT-g-14", "clip_weights": None},
        "coco": {"root": None, "split": "train2017", "resolution": 512},
        "loss.space": "pixel",
        "method": "add",
        "precision": "fp32",
        "micro_batch_size": 0,
        "sampling": {"sampler": None, "cfg_scale": 1.0},
        "progressive": {
            "start_steps": 8,
            "guided_steps": 1000,
            "steps_per_stage": 1000,
            "lr": 1e-4,
            "betas": [0.9, 0.999],
            "warmup_steps": 50,
        },
    }
    assert SCHEMA_VERSION == max(a.version for a in declared.values()) and min(a.version for a in declared.values()) > 1


def test_a_field_added_inside_an_added_sub_config_keeps_older_ids():
    """Cells from before the sub-config (it is absent) and from before the inner field keep their ids."""
    from dataclasses import dataclass

    from add_bench.config import added, added_fields, without

    @dataclass
    class Inner:
        a: int = 1
        b: int = added(9, 2)

    @dataclass
    class Outer:
        x: int = 0
        inner: Inner = added(8, default_factory=Inner)

    declared = added_fields(Outer)
    assert declared["inner"].reproduces == {"a": 1}
    assert without({"x": 0, "inner": {"a": 1, "b": 2}}, declared) == {"x": 0}
    assert without({"x": 0, "inner": {"a": 1, "b": 3}}, declared) == {"x": 0, "inner": {"a": 1, "b": 3}}


def test_added_keys_count_only_away_from_their_original_value():
    path = REPO / "ablations" / "loss_weighting.yaml"
    base = sweep.load_ablations(path)[0].cells[0].id
    assert sweep.load_ablations(path, ["eval.coco.resolution=512"])[0].cells[0].id == base
    for override in ("eval.coco.resolution=256", "eval.cluster.clip_model=ViT-L-14", "eval.coco.root=/data/coco"):
        assert sweep.load_ablations(path, [override])[0].cells[0].id != base, override


CLUSTER_ENV = (
    "ADD_BENCH_SD21",
    "ADD_BENCH_SDXL",
    "ADD_BENCH_COCO",
    "ADD_BENCH_DINOV1_S",
    "ADD_BENCH_DINOV2_S",
    "ADD_BENCH_DINOV2_L",
    "ADD_BENCH_CLIP_L",
    "ADD_BENCH_INCEPTION",
    "ADD_BENCH_CLIP",
)


def test_table1_on_the_sd21_preset(monkeypatch):
    """The same ablation files on the cluster preset: the paper's networks by path, scale-only rows, and
    cells stored with their paths resolved."""
    from omegaconf import OmegaConf

    for var in CLUSTER_ENV:
        monkeypatch.setenv(var, f"/models/{var.lower()}")
    abls = {a.name: a for a in sweep.load_ablations(REPO / "ablations" / "table1.yaml", ["base=sd21"])}
    fn = abls["feature_network"]
    assert [c.label for c in fn.cells] == ["ViT-S DINOv1", "ViT-S DINOv2", "ViT-L DINOv2", "ViT-L CLIP"]
    nets = {c.name: (c.config.feature_network.name, c.config.feature_network.weights) for c in fn.cells}
    assert nets == {
        "dinov1_s": ("dinov1_vits16", "/models/add_bench_dinov1_s"),
        "dino_s": ("dinov2_vits14", "/models/add_bench_dinov2_s"),
        "dino_l": ("dinov2_vitl14", "/models/add_bench_dinov2_l"),
        "clip_s": ("openclip_vitl14", "/models/add_bench_clip_l"),
    }
    default = next(c for c in fn.cells if c.default).config
    assert default.teacher.network == default.student.network == "/models/add_bench_sd21"
    assert default.eval.metrics == "cluster" and default.loss.nfsd_negative == "null"
    # c_text never comes from the network of the CLIP score (evaluation stays independent of training)
    assert (default.discriminator.c_text_network, default.eval.cluster.clip_model) == ("openclip_vitl14", "ViT-g-14")
    assert "${" not in OmegaConf.to_yaml(default)
    assert len({c.id for a in abls.values() for c in a.cells if c.default}) == 1
    tt = {c.name: c for c in abls["teacher_type"].cells}
    assert (
        tt["large_large"].label == "SDXL / SDXL"
        and tt["large_large"].config.student.network == "/models/add_bench_sdxl"
    )
    monkeypatch.delenv("ADD_BENCH_SD21")
    with pytest.raises(ConfigError, match=r"cells\[0\] \(exp\) on base sd21: .*ADD_BENCH_SD21"):
        sweep.load_ablations(REPO / "ablations" / "loss_weighting.yaml", ["base=sd21"])


def test_launch_profiles_set_slurm_resources_and_the_results_root(monkeypatch, tmp_path):
    """SlurmConfig defaults < the preset's launch profile (presets/launch/<preset>.yaml) < --slurm; the sd21
    profile asks for a GPU and writes outside the repository ($ADD_BENCH_RUNS); cell ids do not depend on it."""
    from add_bench.launchers import SlurmConfig

    for var in CLUSTER_ENV:
        monkeypatch.setenv(var, f"/models/{var.lower()}")
    monkeypatch.delenv("ADD_BENCH_RUNS", raising=False)
    abls = sweep.load_ablations(REPO / "ablations" / "loss_weighting.yaml", ["base=sd21"])
    launches = sweep.launch_profiles(abls, ["partition=a100", "additional_parameters.account=abc"])
    sd21 = launches["loss_weighting"]
    assert sd21.profile == sweep.PRESETS_DIR / "launch" / "sd21.yaml"
    assert sd21.slurm.gpus_per_node >= 1 and sd21.slurm.mem_gb > SlurmConfig().mem_gb
    assert sd21.slurm.partition == "a100" and sd21.slurm.additional_parameters == {"account": "abc"}
    assert "launch/sd21.yaml with --slurm partition=a100" in sd21.describe()
    from add_bench.launchers import eval_request

    for name in ("sd21", "sdxl"):  # the GPU presets evaluate each cell in its own job on one GPU, unless told not to
        launch = sweep.launch_profile(sweep.PRESETS_DIR / f"{name}.yaml")
        evaluation = eval_request(launch.slurm)
        assert launch.slurm.eval_job and evaluation.gpus_per_node == 1 and evaluation.tasks_per_node == 1
        assert set(launch.slurm.eval) >= {"gpus_per_node", "mem_gb", "timeout_min"}, launch.slurm.eval
        assert not sweep.launch_profile(sweep.PRESETS_DIR / f"{name}.yaml", ["eval_job=false"]).slurm.eval_job
    with pytest.raises(ConfigError, match=r"launch/sd21.yaml: runs=.*ADD_BENCH_RUNS.*outside the repository.*--out"):
        sweep.default_out(launches)
    monkeypatch.setenv("ADD_BENCH_RUNS", str(tmp_path / "runs"))
    assert sweep.default_out(launches) == tmp_path / "runs" / "sweeps"
    embedded = sweep.launch_profiles(sweep.load_ablations(REPO / "ablations" / "loss_weighting.yaml"))
    assert embedded["loss_weighting"].profile is None and embedded["loss_weighting"].slurm == SlurmConfig()
    assert sweep.default_out(embedded) == tmp_path / "runs" / "sweeps"
    elsewhere = sweep.Launch(tmp_path / "p.yaml", SlurmConfig(), str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match=r"different results roots .*; give --out"):
        sweep.default_out({"a": embedded["loss_weighting"], "b": elsewhere})
    monkeypatch.delenv("ADD_BENCH_RUNS")
    assert sweep.default_out(embedded) == sweep.DEFAULT_OUT
    (tmp_path / "launch").mkdir()
    (tmp_path / "p.yaml").write_text("steps: 3\n")
    for text, message in [
        ("slurm: {gpu: 1}", r"launch/p.yaml: unknown config key 'slurm.gpu'; accepted keys under slurm: addition"),
        ("slurm: {mem_gb: 0}", r"launch/p.yaml: slurm.mem_gb=0.0: must be a positive number of GB"),
        ("slurm: {additional_parameters: {time: 5}}", r"launch/p.yaml: .*--time itself \(set slurm.timeout_min\)"),
    ]:
        (tmp_path / "launch" / "p.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            sweep.launch_profile(tmp_path / "p.yaml")


def test_missing_weights_and_metric_paths_fail_before_anything_is_submitted(tmp_path, monkeypatch, capsys):
    """The sd21 preset with local paths of which some are missing: --dry-run and a SLURM submission list each
    missing path with its config key and the cells that read it, and submit nothing."""
    from test_launchers import fake_slurm_commands

    models = tmp_path / "models"
    for var in CLUSTER_ENV:
        monkeypatch.setenv(var, str(models / var.lower()))
    (models / "add_bench_sd21").mkdir(parents=True)
    for name in ("add_bench_dinov2_s", "add_bench_clip_l"):
        (models / name).touch()
    for split in ("train2017", "val2017"):
        (models / "add_bench_coco" / split).mkdir(parents=True)
    (models / "add_bench_coco" / "annotations").mkdir()
    (models / "add_bench_coco" / "annotations" / "captions_val2017.json").touch()
    (models / "add_bench_inception").mkdir()  # without clean-fid's file
    scripts = fake_slurm_commands(tmp_path, monkeypatch)
    abl, out = str(REPO / "ablations" / "loss_weighting.yaml"), tmp_path / "out"
    for options in (["--dry-run"], ["--launcher", "slurm"]):
        assert sweep.main([abl, "base=sd21", "--out", str(out), *options]) == 2
        err = capsys.readouterr().err
        assert "4 path(s) that cells read are missing; nothing was run or submitted" in err
        cells = r"; cells: \w{12} \(loss_weighting/exp seed 0\), \w{12} \(loss_weighting/sds seed 0\), \w{12} \(loss"
        for line in (
            rf"discriminator.c_img_weights={models}/add_bench_dinov2_l: no such file{cells}",
            rf"coco.root={models}/add_bench_coco: no annotations/captions_train2017.json in it{cells}",
            rf"eval.cluster.inception={models}/add_bench_inception: no inception-2015-12-05.pt in it{cells}",
            rf"eval.cluster.clip_weights={models}/add_bench_clip: no such file{cells}",
        ):
            assert re.search(line, err), (line, err)
    assert not list(scripts.iterdir()) and not (out / "cells").exists()  # nothing submitted, nothing written
    (models / "add_bench_dinov2_l").touch()
    (models / "add_bench_clip").touch()
    (models / "add_bench_coco" / "annotations" / "captions_train2017.json").touch()
    (models / "add_bench_inception" / "inception-2015-12-05.pt").touch()
    assert sweep.main([abl, "base=sd21", "--out", str(out), "--dry-run"]) == 0
    monkeypatch.setenv("ADD_BENCH_CLIP_L", str(models / "elsewhere"))  # a local sweep checks before it runs
    assert sweep.main([abl, "base=sd21", "--out", str(out)]) == 2
    assert "discriminator.c_text_weights=" in capsys.readouterr().err and not (out / "cells").exists()


def test_a_stable_diffusion_folder_without_weights_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """ADD_BENCH_SD21 at a folder of configs only (add_bench/presets/model_configs/sd21, what --dry-run's estimate
    reads): a SLURM submission and a local run stop before anything runs, naming the folder, the config keys and
    each part's missing weights with the files accepted; the same folder with weight files (a sharded UNet) passes."""
    import shutil

    from test_launchers import fake_slurm_commands

    from add_bench.networks.sd import missing_files

    models = tmp_path / "models"
    for var in CLUSTER_ENV:
        monkeypatch.setenv(var, str(models / var.lower()))
    models.mkdir()
    for name in ("add_bench_dinov2_s", "add_bench_dinov2_l", "add_bench_clip_l", "add_bench_clip"):
        (models / name).touch()
    for split in ("train2017", "val2017"):
        (models / "add_bench_coco" / split).mkdir(parents=True)
        (models / "add_bench_coco" / "annotations").mkdir(exist_ok=True)
        (models / "add_bench_coco" / "annotations" / f"captions_{split}.json").touch()
    (models / "add_bench_inception").mkdir()
    (models / "add_bench_inception" / "inception-2015-12-05.pt").touch()
    configs = sweep.PRESETS_DIR / "model_configs" / "sd21"
    monkeypatch.setenv("ADD_BENCH_SD21", str(configs))
    scripts = fake_slurm_commands(tmp_path, monkeypatch)
    abl, out = str(REPO / "ablations" / "loss_weighting.yaml"), tmp_path / "out"
    for options in (["--launcher", "slurm"], []):
        assert sweep.main([abl, "base=sd21", "--out", str(out), *options]) == 2
        err = capsys.readouterr().err
        assert "2 path(s) that cells read are missing; nothing was run or submitted" in err, err
        for key in ("teacher.network", "student.network"):
            line = next(line for line in err.splitlines() if line.strip().startswith(f"{key}={configs}:"))
            assert (
                "a diffusers Stable Diffusion folder without unet/ weights (diffusion_pytorch_model.safetensors or "
                in line
            )
            assert "vae/ weights (diffusion_pytorch_model.safetensors" in line
            assert (
                "text_encoder/ weights (model.safetensors or pytorch_model.bin, or sharded: model.safetensors.index"
                in line
            )
            assert "tokenizer/ files (tokenizer.json, or vocab.json and merges.txt)" in line
    assert not list(scripts.iterdir()) and not (out / "cells").exists()  # nothing submitted, nothing written

    sd = shutil.copytree(configs, models / "sd21")
    shards = {
        "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
    }
    (sd / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    for name in ("unet/" + shards["a"], "vae/diffusion_pytorch_model.bin", "text_encoder/model.safetensors"):
        (sd / name).touch()
    (sd / "tokenizer" / "tokenizer.json").touch()
    assert missing_files(sd) == [f"unet/{shards['b']}"]  # a shard the index lists
    (sd / "unet" / shards["b"]).touch()
    assert missing_files(sd) == []
    monkeypatch.setenv("ADD_BENCH_SD21", str(sd))
    assert sweep.main([abl, "base=sd21", "--out", str(out), "--dry-run"]) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\ncells: [\n", r"x.yaml: line \d+, column \d+: malformed YAML"),
        (
            "name: x\ncells:\n  - {name: a, set: {loss.weightin: exp}}\n",
            r"cells\[0\] \(a\): .*unknown config key 'loss.weightin'",
        ),
        ("name: x\ncells:\n  - {name: a, set: {steps: many}}\n", r"cells\[0\] \(a\): .*config key 'steps'"),
        (
            "name: x\ncells:\n  - {name: a, set: {feature_network.name: vgg16}}\n",
            r"feature_network.name='vgg16': unknown; accepted:",
        ),
        (
            "name: x\ncells:\n  - {name: a, set: {loss.weighting: l2}}\n",
            r"loss.weighting='l2': unknown; accepted: exp, nfsd, sds",
        ),
        ("name: x\ncells:\n  - {name: a, colour: red}\n", r"cells\[0\] \(a\): unknown key\(s\) colour"),
        (
            "name: x\ncells:\n  - {name: a, by_base: {embedded: {paper: {}}}}\n",
            r"cells\[0\] \(a\): by_base.embedded: unknown key\(s\) paper; accepted: label, set",
        ),
        ("name: x\nbase: sd99\ncells:\n  - {name: a}\n", r"base='sd99': unknown; accepted: embedded, sd21, sdxl"),
        ("name: x\ncolour: red\ncells: []\n", r"x.yaml: unknown key\(s\) colour; accepted: base, cells, .*title"),
        ("name: x\n", r"x.yaml: missing key 'cells'"),
        ("name: x\ncells: {a: 1}\n", r"x.yaml: cells: expected a list of rows, got dict"),
        ("name: x\nseeds: [a]\ncells: []\n", r"x.yaml: key 'seeds\[0\]': Value 'a' .* could not be converted"),
        ("name: x\ncells:\n  - {name: a, steps: 0}\n", r"cells\[0\] \(a\): steps=0: expected a positive integer"),
        ("name: x\ncells:\n  - {name: a, bases: sd21}\n", r"cells\[0\] \(a\): key 'bases': "),
        ("name: x\ncells:\n  - {label: a}\n", r"cells\[0\]: each cell needs a 'name'"),
    ],
)
def test_bad_ablation_files(tmp_path, text, message):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        sweep.load_ablations(f)


def test_bad_command_line_override(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'stepz'"):
        sweep.load_ablations(REPO / "ablations" / "loss_weighting.yaml", ["stepz=3"])


def run_cli(args, env_extra, **kw):
    env = {**os.environ, **env_extra, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "add_bench.sweep", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def cell_numbers(out: Path) -> dict:
    res = {}
    for m in sorted((out / "cells").glob("*/metrics.json")):
        rows = json.loads(m.read_text())["rows"]
        res[m.parent.name] = [(r["steps"], r["fid"], r["align_prob"], r["align_acc"]) for r in rows]
    return res


def progress(out: Path) -> int:
    """Work the sweep has kept: logged training steps (trimmed back to the checkpoint on resume) + finished cells."""
    cells = out / "cells"
    return sum(len(p.read_text().splitlines()) for p in cells.glob("*/log.jsonl")) + len(
        list(cells.glob("*/metrics.json"))
    )


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tiny_assets, env):
    steps = 12
    preset = tiny_preset(tiny_assets, env, steps=steps, ckpt_every=1)
    abl = ablation_file(env, preset)
    extra = {"ADD_BENCH_CACHE": str(env / "cache")}
    ref = run_cli([str(abl), "--out", str(env / "ref")], extra)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    rng = random.Random(0)
    kills, killed = 0, env / "killed"
    while kills < 5:
        before = progress(killed) if (killed / "cells").is_dir() else 0
        p = run_cli([str(abl), "--out", str(killed)], extra)
        # a random moment once this run has done work of its own (not only start-up)
        deadline = time.time() + 120
        while p.poll() is None and progress(killed) <= before and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        if p.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    final = run_cli([str(abl), "--out", str(killed)], extra)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert kills == 5
    assert cell_numbers(killed) == cell_numbers(env / "ref") and len(cell_numbers(env / "ref")) == 2
    for log in (killed / "cells").glob("*/log.jsonl"):
        logged = [json.loads(l)["step"] for l in log.read_text().splitlines()]
        assert logged == list(range(1, steps + 1))  # every step once: nothing lost, nothing run twice


def test_failing_cell_is_recorded_and_others_finish(tiny_assets, env):
    preset = tiny_preset(tiny_assets, env)
    abl = ablation_file(
        env,
        preset,
        cells=[
            {"name": "ok", "default": True},
            {"name": "broken", "set": {"teacher.network": str(env / "no_such_teacher")}},
        ],
    )
    ablations = sweep.load_ablations(abl)
    sweep.run_sweep(ablations, env / "out")
    ok, broken = (ablations[0].cells[i].id for i in (0, 1))
    assert sweep.cell_status(env / "out" / "cells" / ok) == "done"
    err = json.loads((env / "out" / "cells" / broken / "error.json").read_text())
    assert "no_such_teacher" in err["error"] and "CheckpointError" in err["error"]
    manifest = json.loads((env / "out" / "mini" / "cells.json").read_text())
    assert [c["name"] for c in manifest["cells"]] == ["ok", "broken"]


def test_cells_option_runs_only_the_named_rows(tiny_assets, env, capsys):
    preset = tiny_preset(tiny_assets, env)
    abl = ablation_file(
        env, preset, cells=[{"name": "a", "default": True}, {"name": "b", "set": {"loss.lambda_distill": 1.0}}]
    )
    assert sweep.main([str(abl), "--out", str(env / "out"), "--cells", "b", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert re.search(r"\ba\s+0\s+\w+\s+skipped", plan) and re.search(r"\bb\s+0\s+\w+\s+new", plan)
    assert sweep.main([str(abl), "--out", str(env / "out"), "--cells", "b"]) == 0
    a, b = (c.id for c in sweep.load_ablations(abl)[0].cells)
    assert sweep.cell_status(env / "out" / "cells" / b) == "done"
    provenance = json.loads((env / "out" / "cells" / b / "metrics.json").read_text())["provenance"]
    assert provenance["schema_version"] == sweep.SCHEMA_VERSION
    assert not (env / "out" / "cells" / a).exists()  # not even a folder for the row not selected
    rows = pd.read_csv(env / "out" / "mini" / "table.csv").set_index("name")
    assert rows.loc["a", "status"] == "pending" and rows.loc["b", "status"] == "done"  # both rows listed
    assert sweep.main([str(abl), "--out", str(env / "out"), "--cells", "b,c"]) == 2
    assert "--cells c: no such row" in capsys.readouterr().err


def test_second_sweep_on_a_folder_in_use_is_refused(tmp_path):
    with sweep.FolderLock(tmp_path, "results folder"):
        with pytest.raises(ConfigError, match=r"results folder in use by pid \d+"):
            with sweep.FolderLock(tmp_path, "results folder"):
                pass
    with sweep.FolderLock(tmp_path, "results folder"):  # released after use
        pass


def test_without_flock_the_lock_is_an_exclusive_file_and_a_dead_owners_file_is_taken_over(tmp_path, monkeypatch):
    import errno
    import subprocess

    def no_flock(fd, op):
        if op & sweep.fcntl.LOCK_UN:
            return
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(sweep.fcntl, "flock", no_flock)
    excl = tmp_path / ".lock.excl"
    with sweep.FolderLock(tmp_path, "results folder"):
        assert excl.read_text() == f"pid {os.getpid()} on {os.uname().nodename}"
        with pytest.raises(ConfigError, match=r"results folder in use by pid \d+ .*this filesystem has no flock"):
            with sweep.FolderLock(tmp_path, "results folder"):
                pass
    assert not excl.exists()  # released: removed
    dead = subprocess.Popen(["true"])
    dead.wait()
    excl.write_text(f"pid {dead.pid} on {os.uname().nodename}")  # left by a process that no longer runs
    with sweep.FolderLock(tmp_path, "results folder"):
        assert excl.read_text().startswith(f"pid {os.getpid()} ")
    excl.write_text(f"pid {os.getpid()} on another-node")  # another host's: cannot be checked, so refused
    with pytest.raises(ConfigError, match=r"in use by pid \d+ on another-node .*delete the file"):
        with sweep.FolderLock(tmp_path, "results folder"):
            pass


def test_results_folder_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits; use a path under a file instead
        blocker = tmp_path / "file"
        blocker.write_text("")
        target = blocker / "sub"
    else:
        target = ro / "sub"
    with pytest.raises(ConfigError, match=r"results folder not writable"):
        with sweep.FolderLock(target, "results folder"):
            pass


def test_dry_run_lists_cells_status_and_cost(tiny_assets, env, capsys):
    preset = tiny_preset(tiny_assets, env)
    abl = ablation_file(env, preset)
    assert sweep.main([str(abl), "--out", str(env / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "exp" in out and "sds" in out and "new" in out and "2 unique cells, 0 done" in out
    total = float(re.search(r"estimated (\d+) min of work", out).group(1))
    assert sweep.main([str(abl), "--out", str(env / "o"), "--dry-run", "--workers", "2"]) == 0
    wall = re.search(r"≈ (\d+) min wall in 1 round\(s\) of 2 workers", capsys.readouterr().out)
    assert wall and abs(float(wall.group(1)) - total / 2) <= 1  # 2 cells side by side: half the work
    assert sweep.main([str(abl), "--out", str(env / "o"), "--dry-run", "--workers", "1"]) == 0
    assert "round(s)" not in capsys.readouterr().out
    import add_bench.launchers as launchers

    with pytest.MonkeyPatch.context() as mp:  # 2 workers on 1 core share it: no faster than one after another
        mp.setattr(launchers, "usable_cores", lambda: 1)
        assert sweep.main([str(abl), "--out", str(env / "o"), "--dry-run", "--workers", "2"]) == 0
    wall = re.search(r"≈ (\d+) min wall in 1 round\(s\) of 2 workers", capsys.readouterr().out)
    assert wall and abs(float(wall.group(1)) - total) <= 1
    assert not (env / "o" / "cells").exists()  # a dry run writes nothing


def test_collect_writes_manifests_and_tables_without_running(tmp_path):
    """--collect: manifests (repo-relative source) and tables from whatever exists, nothing trained."""
    assert (
        sweep.main(
            [str(REPO / "ablations" / "loss_weighting.yaml"), "--collect", "--out", str(tmp_path), "seeds=[0,1]"]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "loss_weighting" / "cells.json").read_text())
    assert manifest["source"] == "ablations/loss_weighting.yaml"
    assert [c["seed"] for c in manifest["cells"]] == [0, 1] * 3
    assert not (tmp_path / "cells").exists()  # no cell was prepared or run
    assert "pending" in (tmp_path / "loss_weighting" / "table.md").read_text()


def test_a_cell_whose_teacher_changes_is_stale_left_out_of_tables_and_rerun(tiny_assets, env, capsys):
    """Cell ids hash configs, which name weights folders but not their content: a cell records the
    versions it read, reads as stale once one changes, and the next sweep archives and re-runs it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from add_bench.provenance import blob_id

    teacher = env / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    preset = tiny_preset(tiny_assets, env, **{"student.network": teacher, "teacher.network": teacher})
    abl = ablation_file(env, preset, cells=[{"name": "a", "default": True}])
    ablations, out = sweep.load_ablations(abl), env / "out"
    sweep.run_sweep(ablations, out)
    wd = out / "cells" / ablations[0].cells[0].id
    first = json.loads((wd / "metrics.json").read_text())
    # the random feature network and c_img are seeded, not read from a folder
    assert set(first["inputs"]) == {
        "teacher",
        "student",
        "c_text network",
        "evaluation network",
        "evaluation embedding",
    }
    old_blob = blob_id(weights_file(teacher))
    assert first["inputs"]["teacher"] == {"path": str(teacher), "blob": old_blob, "aliases": []}
    assert sweep.cell_status(wd) == "done"

    state = load_file(weights_file(teacher))  # "retrain" the teacher
    name = next(iter(state))
    state[name] = state[name] + 0.01
    save_file(state, weights_file(teacher))
    assert sweep.cell_status(wd) == "stale"
    sweep.collect(ablations, out)
    row = pd.read_csv(out / "mini" / "table.csv").iloc[0]
    assert row["status"] == "stale" and pd.isna(row["fid_mean"])  # the old numbers are left out
    md = (out / "mini" / "table.md").read_text()
    assert f"stale: computed with other weights of: teacher ({teacher})" in md and "stale 1" in md

    sweep.run_sweep(ablations, out)
    assert sweep.cell_status(wd) == "done"
    second = json.loads((wd / "metrics.json").read_text())
    assert second["inputs"]["teacher"]["blob"] == blob_id(weights_file(teacher)) != old_blob
    [archived] = (wd / "stale").iterdir()  # nothing computed is lost
    assert json.loads((archived / "metrics.json").read_text()) == first
    assert (archived / "samples.npz").is_file() and weights_file(archived / "student").is_file()
    why = json.loads((archived / "why.json").read_text())["changed_inputs"]
    assert why == [f"teacher ({teacher})", f"student ({teacher})"]
    assert "inputs changed since it ran" in capsys.readouterr().err


def test_cells_finished_before_inputs_were_recorded_are_checked_against_git(tmp_path, monkeypatch):
    """A committed cell without an ``inputs`` record: its weights' versions are read from git at its commit."""
    import shutil

    from add_bench import methods, provenance

    def only_teacher_small(config: str) -> bool:  # teacher and student both exactly teacher_small
        networks = [
            line.split(":", 1)[1].strip() for line in config.splitlines() if line.strip().startswith("network:")
        ]
        return networks == ["teacher_small", "teacher_small"]

    src = next(
        m.parent
        for m in sorted((REPO / "results" / "cells").glob("*/metrics.json"))
        if "inputs" not in json.loads(m.read_text()) and only_teacher_small((m.parent / "config.yaml").read_text())
    )
    cell = tmp_path / src.name
    cell.mkdir()
    shutil.copy(src / "config.yaml", cell)
    metrics = json.loads((src / "metrics.json").read_text())

    def write(commit):
        metrics["provenance"]["git_commit"] = commit
        (cell / "metrics.json").write_text(json.dumps(metrics))

    own = metrics["provenance"]["git_commit"]
    assert provenance.blob_at_commit(own, "add_bench/weights/teacher_small/model.safetensors")  # known at its commit
    write(own)
    assert methods.changed_inputs(cell) == []  # the same tensors, since moved to diffusers' layout (converted_from)

    real = provenance.blob_at_commit
    monkeypatch.setattr(
        provenance,
        "blob_at_commit",  # as if teacher_small had been retrained since
        lambda commit, path: "0" * 40 if "teacher_small" in path else real(commit, path),
    )
    write("f" * 40)
    assert methods.changed_inputs(cell) == [
        "teacher (add_bench/weights/teacher_small)",
        "student (add_bench/weights/teacher_small)",
    ]
    monkeypatch.setattr(provenance, "blob_at_commit", lambda commit, path: None)  # unknown: not called stale
    write("e" * 40)
    assert methods.changed_inputs(cell) == []


def test_command_line_sweep_values_and_combinations():
    from add_bench.sweep import command_line_ablation

    data, rest = command_line_ablation(
        [
            "loss.weighting=exp,sds",
            "student.timesteps=[999,499],[999]",
            "steps=10",
            "seeds=[0,1]",
            "discriminator.augment='color,cutout'",
        ]
    )
    # one value (quoted when it holds a comma) and sweep-level keys: applied to every row
    assert rest == ["steps=10", "seeds=[0,1]", "discriminator.augment='color,cutout'"]
    assert data.name == "loss.weighting+student.timesteps"
    assert [c.set for c in data.cells] == [
        {"loss.weighting": "exp", "student.timesteps": [999, 499]},
        {"loss.weighting": "exp", "student.timesteps": [999]},
        {"loss.weighting": "sds", "student.timesteps": [999, 499]},
        {"loss.weighting": "sds", "student.timesteps": [999]},
    ]
    data, _ = command_line_ablation(["seed=range(0,3)"])  # Hydra's sweep functions
    assert [c.set for c in data.cells] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    with pytest.raises(ConfigError, match="key with several values"):
        command_line_ablation(["steps=10"])


def test_command_line_sweep_rejects_an_unknown_value(capsys):
    from add_bench.sweep import main

    assert main(["loss.weighting=exp,bogus", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "loss.weighting" in err


def test_overrides_follow_hydras_grammar(tmp_path):
    """One run's overrides: key=value, ~key (back to the schema default), a quoted comma; a sweep, +key and a
    malformed line are refused with the override named."""
    from add_bench.config import TrainConfig, load

    preset = tmp_path / "preset.yaml"
    preset.write_text("steps: 10\nloss: {weighting: sds}\n")
    cfg = load(TrainConfig, preset, ["~loss.weighting", "discriminator.augment='color,cutout'", "batch_size=8"])
    assert (cfg.steps, cfg.loss.weighting, cfg.discriminator.augment, cfg.batch_size) == (10, "exp", "color,cutout", 8)
    for bad, message in (
        ("loss.weighting=exp,sds", "several values are a sweep"),
        ("+loss.weighting=sds", "adds a key"),
        ("steps=", "config key 'steps'"),
        ("=3", "expected key=value"),
        ("~nope", "no key 'nope'"),
        ("nope=3", "unknown config key 'nope'"),
    ):
        with pytest.raises(ConfigError, match=message):
            load(TrainConfig, overrides=[bad])
