"""The ADD trainer: frozen networks, gradient paths, student timesteps, resume, divergence, config errors."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_train_overrides

from add_bench import checkpoint
from add_bench import train as train_mod
from add_bench.config import TrainConfig, load
from add_bench.data import load_split
from add_bench.errors import ConfigError, TrainingDiverged
from add_bench.networks.unets import weights_file


def cfg_for(assets, **extra):
    return load(TrainConfig, overrides=tiny_train_overrides(assets, **extra))


def batch(assets, n=8):
    x, y = load_split("train", assets["data"], 50).tensors()
    return x[:n], y[:n]


def optimisers(nets):
    return (
        torch.optim.Adam(nets.student.unet.parameters(), 1e-4, betas=(0.0, 0.99)),
        torch.optim.Adam(nets.discriminator.parameters(), 1e-4, betas=(0.0, 0.99)),
    )


def test_frozen_networks_get_no_gradient_and_generator_loss_reaches_student(tiny_assets):
    cfg = cfg_for(tiny_assets, **{"loss.distillation": False})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    x0, y = batch(tiny_assets)
    gen = torch.Generator().manual_seed(0)
    grads = {}

    class NoStep(torch.optim.Adam):  # record the student's gradient before the update
        def step(self, closure=None):
            grads["student"] = [p.grad.clone() for p in nets.student.unet.parameters() if p.grad is not None]

    opt_s = NoStep(nets.student.unet.parameters(), 1e-4)
    _, opt_d = optimisers(nets)
    train_mod.add_step(nets, cfg, x0, y, gen, opt_s, opt_d, step=0)
    # the adversarial generator loss flowed back through the frozen feature network into the student
    assert grads["student"] and sum(g.abs().sum() for g in grads["student"]) > 0
    for name, module in (("teacher", nets.teacher.unet), ("feature network", nets.feature_network)):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters()), name
    assert not nets.teacher.unet.training and not nets.feature_network.training
    # the discriminator was updated by its own loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.discriminator.parameters())


def test_distillation_only_leaves_discriminator_untouched(tiny_assets):
    cfg = cfg_for(tiny_assets, **{"loss.adversarial": False})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    before = {k: v.clone() for k, v in nets.discriminator.state_dict().items()}
    opt_s, opt_d = optimisers(nets)
    x0, y = batch(tiny_assets)
    row = train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(0), opt_s, opt_d, 0)
    assert "loss_d" not in row and row["loss_distill"] > 0
    assert all(torch.equal(before[k], v) for k, v in nets.discriminator.state_dict().items())


def test_student_sees_x_s_at_exactly_t_student(tiny_assets):
    cfg = cfg_for(tiny_assets, **{"student.timesteps": "[999,499]"})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    seen = []
    inner = nets.student.unet.forward

    def spy(x, t, class_labels=None):
        seen.append((x.detach().clone(), t.clone()))
        return inner(x, t, class_labels=class_labels)

    nets.student.unet.forward = spy
    opt_s, opt_d = optimisers(nets)
    x0, y = batch(tiny_assets)
    for step in range(3):
        train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(step), opt_s, opt_d, step)
    ts = torch.cat([t for _, t in seen])
    assert set(ts.tolist()) <= {999, 499} and len(set(ts.tolist())) == 2
    # x_s = α_s·x0 + σ_s·ε: at s = 999 (α = 0) the input is pure noise, uncorrelated with x0
    x, t = seen[0]
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([999, 499])[torch.randint(0, 2, (8,), generator=g)]
    eps = torch.randn(x0.shape, generator=g)
    alpha, sigma = nets.student.schedule.alpha_sigma(s)
    torch.testing.assert_close(x, alpha * x0 + sigma * eps)


@pytest.mark.parametrize("zero", [True, False])
def test_student_top_step_is_pure_noise_and_the_teacher_keeps_its_schedule(tiny_assets, tmp_path, zero):
    """student.zero_terminal_snr: α = 0 at s = 999 on the student's schedule only (SD2.1's α_999 ≈ 0.068
    stays the teacher's); the exported student's card records the schedule it was trained on."""
    cfg = cfg_for(tiny_assets, **{"student.zero_terminal_snr": zero})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    teacher_alpha = nets.teacher.schedule.alpha_sigma(999, ndim=0)[0].item()
    student_alpha = nets.student.schedule.alpha_sigma(999, ndim=0)[0].item()
    assert abs(teacher_alpha - 0.0683) < 1e-3
    assert student_alpha == (0.0 if zero else teacher_alpha)
    torch.testing.assert_close(nets.student.schedule.alphas_cumprod[:999], nets.teacher.schedule.alphas_cumprod[:999])
    from add_bench.evaluate import load_denoiser

    out = train_mod.export_student(nets, cfg, tmp_path / "student", wall=0.0, step=0)
    assert load_denoiser(str(out))[0].schedule.alpha_sigma(999, ndim=0)[0].item() == student_alpha


def test_discriminator_accuracy_is_logged_per_student_timestep(tiny_assets):
    """d_fake_acc_s<τ> = share of x̂θ tokens the discriminator calls fake, for the samples drawn at s = τ."""
    cfg = cfg_for(tiny_assets, **{"student.timesteps": "[999,499]"})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    calls = []  # generator pass on x̂θ, then the discriminator update: real x0, then x̂θ
    inner = nets.discriminator.forward

    def spy(features, c_text=None, c_img=None):
        logits = inner(features, c_text, c_img)
        calls.append([l.detach() for l in logits])
        return logits

    nets.discriminator.forward = spy
    opt_s, opt_d = optimisers(nets)
    x0, y = batch(tiny_assets)
    row = train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(0), opt_s, opt_d, 0)
    g = torch.Generator().manual_seed(0)  # replay the step's draw of s
    s = torch.tensor([999, 499])[torch.randint(0, 2, (8,), generator=g)]
    assert len(calls) == 3
    fake_ok = torch.cat([l.lt(0).float() for l in calls[2]], dim=1).mean(1)
    for tau in (999, 499):
        assert row[f"d_fake_acc_s{tau}"] == pytest.approx(fake_ok[s == tau].mean().item())
    assert not any(k.startswith("d_fake_acc_s") and k not in ("d_fake_acc_s999", "d_fake_acc_s499") for k in row)


def test_lazy_r1_is_taken_every_kth_step_weighted_by_k(tiny_assets):
    rows = {}
    for every in (1, 3):
        cfg = cfg_for(tiny_assets, **{"discriminator.r1_gamma": 1.0, "discriminator.r1_every": every})
        torch.manual_seed(0)
        nets = train_mod.build_networks(cfg)
        opt_s, opt_d = optimisers(nets)
        x0, y = batch(tiny_assets)
        rows[every] = [
            train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(step), opt_s, opt_d, step)
            for step in range(4)
        ]
    # same networks, same draws: step 0 carries k·γ·R1, steps 1 and 2 none, step 3 the next k·γ·R1
    assert rows[1][0]["loss_r1"] > 0
    assert rows[3][0]["loss_r1"] == pytest.approx(3 * rows[1][0]["loss_r1"], rel=1e-5)
    assert rows[3][1]["loss_r1"] == 0 and rows[3][2]["loss_r1"] == 0 and rows[3][3]["loss_r1"] > 0


def test_resumed_run_equals_uninterrupted(tiny_assets, tmp_path):
    cfg = cfg_for(tiny_assets, steps=5)
    full = train_mod.train(cfg, tmp_path / "full", progress=False)
    assert train_mod.train(cfg, tmp_path / "part", budget_minutes=1e-9, progress=False) is None
    assert train_mod.train(cfg, tmp_path / "part", budget_minutes=1e-9, progress=False) is None
    assert checkpoint.load(tmp_path / "part")["step"] == 2
    part = train_mod.train(cfg, tmp_path / "part", progress=False)
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "part")
    for obj in ("student", "ema", "discriminator"):
        for k, v in a["objects"][obj].items():
            assert torch.equal(v, b["objects"][obj][k]), (obj, k)
    assert weights_file(full).read_bytes() == weights_file(part).read_bytes()
    logs = [l for l in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 5  # one row per step, none lost or repeated across the interruptions


@pytest.mark.parametrize("keep", [2, 0])
def test_keep_checkpoints_keeps_the_newest_and_resume_stays_exact(tiny_assets, tmp_path, keep):
    """keep_checkpoints=K: after every save only the K newest checkpoints remain (0: all), checkpoint.pt is the
    newest (a link, not a copy), and a run interrupted after every step resumes to the uninterrupted result."""
    full = train_mod.train(cfg_for(tiny_assets, steps=5, ckpt_every=1), tmp_path / "full", progress=False)
    assert not checkpoint.kept(tmp_path / "full")  # keep_checkpoints=1: checkpoint.pt only
    cfg, part = cfg_for(tiny_assets, steps=5, ckpt_every=1, keep_checkpoints=keep), tmp_path / "part"
    saves = 0
    while (student := train_mod.train(cfg, part, budget_minutes=1e-9, progress=False)) is None:
        saves += 1
        steps = [int(p.stem.split("-")[1]) for p in checkpoint.kept(part)]
        assert steps == list(range(max(1, saves - keep + 1) if keep else 1, saves + 1)), (saves, steps)
        assert (part / "checkpoint.pt").samefile(checkpoint.kept(part)[-1])
    assert [p.name for p in checkpoint.kept(part)] == [
        f"checkpoint-0000000{s}.pt" for s in ([4, 5] if keep else range(1, 6))
    ]
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(part)
    for obj in ("student", "ema", "discriminator"):
        for k, v in a["objects"][obj].items():
            assert torch.equal(v, b["objects"][obj][k]), (obj, k)
    assert weights_file(full).read_bytes() == weights_file(student).read_bytes()
    with pytest.raises(ConfigError, match=r"keep_checkpoints=-1: must be an integer ≥ 0"):
        train_mod.train(cfg_for(tiny_assets, keep_checkpoints=-1), tmp_path / "bad", progress=False)


REQUEUE_HANDLER = """
import json, signal, sys
from pathlib import Path

from add_bench import checkpoint, train
from add_bench.config import TrainConfig, load

workdir = Path(sys.argv[1])


def requeue(signum, frame):  # as submitit's handler in a SLURM job: the job's checkpoint(), scontrol requeue, exit
    (workdir / "requeued.json").write_text(json.dumps({"signal": signum, "step": checkpoint.load(workdir)["step"]}))
    sys.exit(-1)


signal.signal(signal.SIGUSR2, requeue)
train.train(load(TrainConfig, overrides=sys.argv[2:]), workdir, progress=False)
"""


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGUSR2"])
def test_a_stop_signal_checkpoints_the_current_step_and_resume_is_exact(tiny_assets, tmp_path, sig):
    """A stop signal mid-run (SIGUSR1 to `python -m add_bench.train`; SIGUSR2 to a process whose handler
    requeues, as submitit's in a SLURM job) checkpoints the step the run is at, not the last ckpt_every; then
    the command stops with status 3, or the requeue handler runs after the checkpoint is written. Resuming
    gives the uninterrupted run's weights bit for bit."""
    import signal
    import time

    from add_bench.provenance import REPO_ROOT

    overrides = tiny_train_overrides(tiny_assets, steps=24, ckpt_every=1000)
    wd, log = tmp_path / "signalled", tmp_path / "signalled" / "log.jsonl"
    if sig == "SIGUSR1":
        cmd = [sys.executable, "-m", "add_bench.train", *overrides, "--workdir", str(wd)]
    else:
        cmd = [sys.executable, "-c", REQUEUE_HANDLER, str(wd), *overrides]
    p = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while p.poll() is None and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        assert time.time() < deadline, "no training steps within 300 s"
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(getattr(signal, sig))
    err = p.communicate(timeout=300)[1]
    step = checkpoint.load(wd)["step"]
    assert 3 <= step < 24 and len(log.read_text().splitlines()) == step, err  # the step it was at: nothing lost
    assert f"{sig} at step {step}/24: checkpoint saved" in err
    if sig == "SIGUSR1":
        assert p.returncode == 3, err
    else:
        assert p.returncode == 255, err
        assert json.loads((wd / "requeued.json").read_text()) == {"signal": signal.SIGUSR2, "step": step}
    cfg = load(TrainConfig, overrides=overrides)
    resumed = train_mod.train(cfg, wd, progress=False)
    full = train_mod.train(cfg, tmp_path / "full", progress=False)
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(wd)
    for obj in ("student", "ema", "discriminator"):
        for k, v in a["objects"][obj].items():
            assert torch.equal(v, b["objects"][obj][k]), (obj, k)
    assert weights_file(resumed).read_bytes() == weights_file(full).read_bytes()
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == list(range(1, 25))


@pytest.mark.parametrize(
    "schedule, factors",
    [
        ("constant", [0.5, 1, 1, 1, 1]),  # warm-up (step+1)/2, then the base rate
        # cosine after a 2-step warm-up, to 0 at step 5: ½(1 + cos(π·(step − 2)/3)) for steps 2, 3, 4
        ("cosine", [0.5, 1, 1, 0.75, 0.25]),
    ],
)
def test_learning_rate_schedule_is_logged_per_step(tiny_assets, tmp_path, schedule, factors):
    cfg = cfg_for(
        tiny_assets,
        steps=5,
        **{"optim.lr_schedule": schedule, "optim.student_lr": 1e-3, "optim.discriminator_lr": 4e-3},
    )
    train_mod.train(cfg, tmp_path, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["lr_student"] for r in rows] == pytest.approx([1e-3 * f for f in factors])
    assert [r["lr_discriminator"] for r in rows] == pytest.approx([4e-3 * f for f in factors])


def test_nan_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny_assets, tmp_path, monkeypatch):
    cfg = cfg_for(tiny_assets, steps=6)
    calls = {"n": 0}
    real = train_mod.distillation_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(train_mod, "distillation_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="generator loss is nan at step 3; the last good checkpoint is kept"):
        train_mod.train(cfg, tmp_path / "run", progress=False)
    assert checkpoint.load(tmp_path / "run")["step"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.weighting=l1", r"loss.weighting='l1': unknown; accepted: exp, nfsd, sds"),
        ("feature_network.name=vgg", r"feature_network.name='vgg': unknown; accepted: .*dino_s"),
        ("student.init=imagenet", r"student.init='imagenet': unknown; accepted: pretrained, random"),
        ("teacher.steps=0", r"teacher.steps=0: must be a positive integer"),
        ("discriminator.r1_every=0", r"discriminator.r1_every=0: must be a positive integer"),
        ("data_workers=-1", r"data_workers=-1: threads decoding a batch.s images; need ≥ 0"),
        ("optim.lr_schedule=linear", r"optim.lr_schedule='linear': unknown; accepted: constant, cosine"),
        ("loss.lambda_distill=abc", r"config key 'loss.lambda_distill'"),
        ("loss.lamda=2", r"unknown config key 'loss.lamda'; accepted keys under loss: .*lambda_distill"),
    ],
)
def test_config_errors_name_the_key(tiny_assets, override, message):
    with pytest.raises(ConfigError, match=message):
        train_mod.build_networks(load(TrainConfig, overrides=tiny_train_overrides(tiny_assets) + [override]))


def test_training_never_imports_the_evaluation_network():
    code = (
        "import sys, add_bench.train, add_bench.losses, add_bench.progressive; "
        "bad = [m for m in sys.modules if m in ('add_bench.networks.evalnet', 'add_bench.metrics')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_bench_reports_parts_and_ratio(tiny_assets, capsys, tmp_path):
    from add_bench import bench

    args = tiny_train_overrides(tiny_assets) + ["--repeats", "1", "--out", str(tmp_path / "b.json")]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    stored = json.loads((tmp_path / "b.json").read_text())
    assert stored["provenance"]["command"] == " ".join(["python -m add_bench.bench", *args])  # how to re-measure
    for part in (
        "student_fwd_bwd",
        "teacher_target",
        "feature_network_fake_fwd_bwd",
        "discriminator_heads_fwd_bwd",
        "add_step",
        "sum_of_parts",
        "ratio_step_to_parts",
    ):
        assert part in out
    values = {l.split()[0]: float(l.split()[1]) for l in out.strip().splitlines()}
    assert values["sum_of_parts"] == pytest.approx(
        sum(
            values[k]
            for k in (
                "student_fwd_bwd",
                "teacher_target",
                "feature_network_fake_fwd_bwd",
                "feature_network_real_fwd",
                "discriminator_heads_fwd_bwd",
            )
        )
        + values.get("r1_extra_per_step", 0.0),
        rel=1e-3,
    )
    assert values["ratio_step_to_parts"] == pytest.approx(values["add_step"] / values["sum_of_parts"], rel=1e-2)


def test_bench_parallel_reports_the_layouts_and_their_ratios(tiny_assets, capsys):
    from add_bench import bench

    assert bench.main(tiny_train_overrides(tiny_assets) + ["--parallel", "--steps", "2"]) == 0
    values = {l.split()[0]: float(l.split()[1]) for l in capsys.readouterr().out.strip().splitlines()}
    n = int(values["cores"])
    one, many = values[f"steps_per_s_1_workers_x_{n}_threads"], values[f"steps_per_s_{n}_workers_x_1_threads"]
    assert one > 0 and many > 0
    assert values["ratio_workers_to_threads"] == pytest.approx(many / one, rel=1e-3)
    over = values[f"steps_per_s_{n + 1}_workers_x_1_threads"]  # one more 1-thread worker than cores
    assert over > 0 and values["ratio_oversubscribed_to_threads"] == pytest.approx(over / one, rel=1e-3)


def test_cfg_job_prints_the_resolved_config(capsys):
    import yaml

    assert train_mod.main(["loss.weighting=sds", "~student.timesteps", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"]["weighting"] == "sds" and printed["student"]["timesteps"] == [999, 749, 499, 249]
    assert printed["steps"] == TrainConfig().steps


def test_student_and_teacher_keep_their_own_schedules(tiny_assets, tmp_path):
    """Table 1e pairs a student and a teacher from different folders: each keeps the schedule it was trained on."""
    from add_bench.config import ScheduleConfig, to_dict
    from add_bench.networks.unets import build_unet, save_weights, unet_config

    cosine = ScheduleConfig(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    other = tmp_path / "teacher_cosine"
    save_weights(
        other,
        build_unet("tiny"),
        {"kind": "teacher", "unet": unet_config("tiny"), "schedule": to_dict(cosine), "null_label": 10},
        fp16=False,
    )
    cfg = cfg_for(tiny_assets, **{"teacher.network": str(other), "student.zero_terminal_snr": False})
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    assert nets.teacher.schedule.cfg.beta_schedule == "squaredcos_cap_v2"
    assert nets.student.schedule.cfg.beta_schedule == "scaled_linear"  # the tiny student's own (SD2.1's)
    opt_s, opt_d = optimisers(nets)
    x0, y = batch(tiny_assets)
    row = train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(0), opt_s, opt_d, 0)
    assert torch.isfinite(torch.tensor(row["loss_g"]))
