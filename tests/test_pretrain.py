"""Checkpoint save/resume continues bit-exactly; bad checkpoints and configs fail with one clear line."""

import json

import pytest
import torch

from add_bench import checkpoint
from add_bench.config import TeacherPretrainConfig, load
from add_bench.errors import CheckpointError, ConfigError
from add_bench.networks.unets import load_state, load_unet
from add_bench.pretrain import main, pretrain_teacher


def tiny_cfg(data, steps, **kw):
    return load(
        TeacherPretrainConfig,
        overrides=[
            "size=tiny",
            f"steps={steps}",
            "batch_size=8",
            "warmup_steps=2",
            "ckpt_every=3",
            "log_every=1",
            "ema_warmup_steps=2",
            "threads=1",
            f"data.root={data}",
            "data.val_size=50",
            "data.download=false",
            *[f"{k}={v}" for k, v in kw.items()],
        ],
    )


def test_resume_is_bit_exact(fake_data, tmp_path):
    full = tmp_path / "full"
    assert pretrain_teacher(tiny_cfg(fake_data, 8), full / "work", full / "w")
    part = tmp_path / "part"
    # interrupt twice (a budget of ~0 minutes stops after one step, writing a checkpoint), then finish
    assert not pretrain_teacher(tiny_cfg(fake_data, 8), part / "work", part / "w", budget_minutes=1e-9)
    assert not pretrain_teacher(tiny_cfg(fake_data, 8), part / "work", part / "w", budget_minutes=1e-9)
    assert checkpoint.load(part / "work")["step"] == 2 and not (part / "w").exists()
    assert pretrain_teacher(tiny_cfg(fake_data, 8), part / "work", part / "w")
    a, b = load_state(full / "w"), load_state(part / "w")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = checkpoint.load(full / "work"), checkpoint.load(part / "work")
    for k, v in ca["objects"]["unet"].items():
        assert torch.equal(v, cb["objects"]["unet"][k]), k
    net = load_unet(full / "w")  # shipped weights load through the card
    assert net(torch.randn(1, 1, 28, 28), torch.tensor([5]), class_labels=torch.tensor([10])).sample.shape == (
        1,
        1,
        28,
        28,
    )


def test_card_records_the_command_with_its_overrides(fake_data, tmp_path):
    import json

    overrides = [
        "size=tiny",
        "steps=2",
        "batch_size=4",
        "warmup_steps=1",
        "ema_warmup_steps=1",
        "threads=1",
        f"data.root={fake_data}",
        "data.val_size=50",
        "data.download=false",
    ]
    assert main(["teacher", *overrides, "--name", "t x", f"--workdir={tmp_path}/w", f"--out={tmp_path}/o"]) == 0
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    # the exact command line (shell-quoted) that re-makes these weights, overrides included
    assert card["provenance"]["command"] == (
        "python -m add_bench.pretrain teacher " + " ".join(overrides) + " --name 't x'"
    )
    assert card["steps"] == 2 and card["provenance"]["config"]["steps"] == 2


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere/checkpoint.pt: checkpoint not found"):
        checkpoint.load(tmp_path / "nothere" / "checkpoint.pt")
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: corrupt checkpoint"):
        checkpoint.load(bad)
    w = tmp_path / "weights"
    w.mkdir()
    with pytest.raises(CheckpointError, match=r"weights/card.json: missing"):
        load_unet(w)
    (w / "card.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"card.json: corrupt JSON"):
        load_unet(w)
    (w / "card.json").write_text('{"unet": {"patch": 2}}')
    (w / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors"):
        load_state(w)


def test_unknown_config_key_and_wrong_type():
    with pytest.raises(ConfigError, match=r"overrides: unknown config key 'stepz'; accepted keys: .*steps"):
        load(TeacherPretrainConfig, overrides=["stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.rooot'; accepted keys under data: .*root"):
        load(TeacherPretrainConfig, overrides=["data.rooot=/x"])
    with pytest.raises(ConfigError, match=r"config key 'steps': .*abc"):
        load(TeacherPretrainConfig, overrides=["steps=abc"])
    with pytest.raises(ConfigError, match=r"size='huge': unknown; accepted: large, small, tiny"):
        from add_bench.networks.unets import build_unet

        build_unet("huge")


def test_cli_error_is_one_line(capsys, tmp_path):
    assert main(["teacher", "steps=0", f"--workdir={tmp_path}/w", f"--out={tmp_path}/o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: steps=0: must be a positive integer"]
    assert main(["teacher", f"data.root={tmp_path}/missing", f"--workdir={tmp_path}/w", f"--out={tmp_path}/o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing: no such directory" in err[0] and "dataset-fashion-mnist" in err[0]


def test_yaml_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("steps: 3\nbatch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load(TeacherPretrainConfig, f)
    f.write_text("steps: 3\nlrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'lrr'"):
        load(TeacherPretrainConfig, f)


@pytest.mark.parametrize("what", ["evalnet", "evalnet_ssl"])
def test_evaluation_networks_train_through_the_shared_loop_and_resume_exactly(fake_data, tmp_path, what):
    """The evaluation networks' loops (loop.drive): a run interrupted by its budget and resumed ends with the
    same weights and the same log as an uninterrupted one."""
    from safetensors.torch import load_file

    from add_bench.config import EmbedNetPretrainConfig, EvalNetPretrainConfig
    from add_bench.pretrain import pretrain_evalnet, pretrain_evalnet_ssl

    common = ["batch_size=16", "threads=1", f"data.root={fake_data}", "data.val_size=50", "data.download=false"]
    if what == "evalnet":
        cfg, fn = load(EvalNetPretrainConfig, overrides=[*common, "epochs=1"]), pretrain_evalnet
    else:
        cfg, fn = load(EmbedNetPretrainConfig, overrides=[*common, "steps=6", "width=4"]), pretrain_evalnet_ssl
    assert fn(cfg, tmp_path / "full", tmp_path / "w_full")
    assert not fn(cfg, tmp_path / "part", tmp_path / "w_part", budget_minutes=1e-9)
    assert fn(cfg, tmp_path / "part", tmp_path / "w_part")
    a, b = load_file(tmp_path / "w_full" / "model.safetensors"), load_file(tmp_path / "w_part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(r) for r in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert rows and [r["step"] for r in rows] == [r["step"] for r in resumed]
    assert [r["loss"] for r in rows] == [r["loss"] for r in resumed]
