"""Pre-train the embedded benchmark's shipped networks.

    python -m add_bench.pretrain teacher [size=small|large] [key=value ...]
    python -m add_bench.pretrain evalnet [key=value ...]
    python -m add_bench.pretrain evalnet_ssl [key=value ...]
    python -m add_bench.pretrain featnet dino_s|dino_l|clip_s [key=value ...]   (add_bench.featnet_pretrain)

Each run keeps a work folder (``runs/<name>/``: checkpoint.pt, log.jsonl) and resumes from it
exactly; ``--budget-minutes M`` stops cleanly after M minutes (re-run the same command to go on).
When the run is complete the EMA weights are written to ``add_bench/weights/<name>/`` as fp16
safetensors with a ``card.json`` (config, git commit, data, steps, wall time, metrics).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from add_bench import checkpoint
from add_bench.config import (
    EmbedNetPretrainConfig,
    EvalNetPretrainConfig,
    TeacherPretrainConfig,
    add_cfg_option,
    check_positive,
    choose,
    load,
    print_job,
    to_dict,
)
from add_bench.data import NUM_CLASSES, load_split
from add_bench.diffusion import Denoiser, Schedule, sample_ddim, sample_grid
from add_bench.errors import command_line
from add_bench.loop import Run, clipped_update, drive, lr_at, pretraining_batch, set_threads, start_pretraining
from add_bench.losses import TEACHER_WEIGHTINGS, denoising_loss
from add_bench.networks.evalnet import EmbedNet, EvalNet
from add_bench.networks.unets import build_unet, num_params, save_weights, unet_config
from add_bench.provenance import REPO_ROOT, WEIGHTS_DIR, provenance

# ------------------------------------------------------------------------------------ teacher
SAMPLE_STEPS = 8  # DDIM steps of the sample grid at each checkpoint (10 classes × 4: 320 forward passes)


def pretrain_teacher(
    cfg: TeacherPretrainConfig, workdir: Path, out: Path, budget_minutes: float = 0, command: str | None = None
) -> bool:
    """Train (or resume) a teacher; return True when finished and exported. ``command`` goes on the card."""
    choose(dict.fromkeys(TEACHER_WEIGHTINGS), cfg.loss_weighting, "loss_weighting")
    check_positive(cfg.steps, "steps")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_split(
        "train", cfg.data.root, cfg.data.val_size, cfg.data.split_seed, cfg.data.download
    ).tensors()
    schedule = Schedule(cfg.schedule)
    unet = build_unet(cfg.size)
    ema = checkpoint.EMA(unet, cfg.ema_decay, cfg.ema_warmup_steps)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run, loss_avg = start_pretraining(
        workdir,
        {"unet": unet, "ema": ema, "opt": opt},
        gen,
        cfg,
        budget_minutes,
        f"teacher {cfg.size}: {num_params(unet) / 1e6:.2f}M parameters; work folder {workdir}, weights → {out}",
    )

    def step_fn(step: int) -> dict:
        idx = pretraining_batch(step, opt, cfg, len(x_train), gen)
        loss = denoising_loss(
            unet,
            schedule,
            x_train[idx],
            y_train[idx],
            gen,
            cfg.cond_drop_prob,
            NUM_CLASSES,
            cfg.loss_weighting,
            cfg.min_snr_gamma,
        )
        where = f"(teacher) at step {step}; last good checkpoint kept in {workdir}; lower lr (now {cfg.lr})"
        row = clipped_update(loss, opt, unet.parameters(), cfg.grad_clip, loss_avg, where)
        ema.update(unet, step)
        return row

    ema_teacher = Denoiser(ema.module, schedule, NUM_CLASSES)

    def samples_at_checkpoints(completed: int) -> None:  # the EMA teacher's DDIM samples, one row per class
        if run.checkpoint_due(completed):
            grid = lambda: sample_grid(ema_teacher, sample_ddim, SAMPLE_STEPS, x_train.shape[1:], NUM_CLASSES)
            run.log_samples(f"samples/ema_ddim_{SAMPLE_STEPS}_step", grid, completed)

    if not drive(
        run, step_fn, f"teacher-{cfg.size}", cfg.log_every, postfix=("loss_avg",), after_step=samples_at_checkpoints
    ):
        return False
    wall, step = run.wall_time_s, run.step
    card = {
        "kind": "teacher",
        "name": out.name,
        "unet": unet_config(cfg.size),
        "schedule": to_dict(cfg.schedule),
        "null_label": NUM_CLASSES,
        "params": num_params(unet),
        "weights": "EMA, fp16",
        "data": f"Fashion-MNIST train split ({len(x_train)} images; val carve-out {cfg.data.val_size})",
        "steps": step,
        "train_wall_time_s": round(wall, 1),
        "provenance": provenance(
            cfg, cfg.seed, wall, command=command or f"python -m add_bench.pretrain teacher size={cfg.size}"
        ),
        "metrics": {},
    }
    save_weights(out, ema.module, card)
    print(f"wrote {out} (unet/, scheduler/, card.json) ({wall / 60:.1f} min)", file=sys.stderr)
    return True


# ------------------------------------------------------------------------------------ evalnet
def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One plain optimiser step on ``loss``; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def seeded_start(cfg) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """Threads and seeds set from ``cfg``; its generator and the train split as tensors."""
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = cfg.data
    x_train, y_train = load_split("train", data.root, data.val_size, data.split_seed, data.download).tensors()
    return torch.Generator().manual_seed(cfg.seed), x_train, y_train


def pretrain_evalnet(
    cfg: EvalNetPretrainConfig, workdir: Path, out: Path, budget_minutes: float = 0, command: str | None = None
) -> bool:
    check_positive(cfg.epochs, "epochs")
    gen, x_train, y_train = seeded_start(cfg)
    data = cfg.data
    x_val, y_val = load_split("val", data.root, data.val_size, data.split_seed, data.download).tensors()
    net = EvalNet()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(x_train) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    run = Run(
        workdir, {"net": net, "opt": opt}, gen, total, steps_per_epoch, budget_minutes, tensorboard=cfg.tensorboard
    )

    def step_fn(step: int) -> dict:
        net.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, steps_per_epoch // 2, total, 0.01)
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
        x = random_shift(x_train[idx], cfg.max_shift, gen)
        loss = optimizer_step(opt, F.cross_entropy(net(x), y_train[idx]))
        return {"epoch": (step + 1) / steps_per_epoch, "loss": loss, "val_acc": lambda: accuracy(net, x_val, y_val)}

    if not drive(run, step_fn, "evalnet", steps_per_epoch):
        return False
    wall, step = run.wall_time_s, run.step
    x_test, y_test = load_split("test", data.root, download=data.download).tensors()
    metrics = {"val_accuracy": accuracy(net, x_val, y_val), "test_accuracy": accuracy(net, x_test, y_test)}
    card = {
        "kind": "evalnet",
        "name": out.name,
        "params": num_params(net),
        "feature_dim": EvalNet.feature_dim,
        "weights": "fp32",
        "data": f"Fashion-MNIST train split ({len(x_train)} images)",
        "steps": step,
        "train_wall_time_s": round(wall, 1),
        "provenance": provenance(cfg, cfg.seed, wall, command=command or "python -m add_bench.pretrain evalnet"),
        "metrics": metrics,
    }
    save_weights(out, net.eval(), card, fp16=False)
    print(f"evalnet: {metrics}; wrote {out}", file=sys.stderr)
    return True


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero = background −1 fill)."""
    if max_shift <= 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    n, _, h, w = x.shape
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (n,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h)[None]).clamp(max=h + 2 * max_shift - 1)
    cols = dx[:, None] + torch.arange(w)[None]
    return pad[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    correct = sum((net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


# ------------------------------------------------------------------------------------ evalnet_ssl
def augment_view(x: torch.Tensor, cfg: EmbedNetPretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """One random view of images in [-1, 1]: crop-and-resize with a shift, a contrast change, a cutout.
    No flips and no blur, so that the embedding still tells a mirrored or blurred garment apart."""
    n = len(x)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    scale = cfg.min_scale + (1 - cfg.min_scale) * u(n)
    shift = (2 * u(n, 2) - 1) * (2 * cfg.max_shift / x.shape[-1])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding = black background
    view = (view + 1) * (1 + cfg.contrast * (2 * u(n, 1, 1, 1) - 1)) - 1
    if cfg.cutout > 0:
        h = x.shape[-1]
        corner = (u(n, 2) * (h - cfg.cutout + 1)).long()
        rows = torch.arange(h)
        inside = (
            (rows[None, :, None] >= corner[:, 0, None, None])
            & (rows[None, :, None] < corner[:, 0, None, None] + cfg.cutout)
            & (rows[None, None, :] >= corner[:, 1, None, None])
            & (rows[None, None, :] < corner[:, 1, None, None] + cfg.cutout)
        )
        erase = inside & (u(n, 1, 1) < 0.5)
        view = torch.where(erase[:, None], torch.full_like(view, -1.0), view)
    return view.clamp(-1, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of its image, the 2N − 2 others negatives.
    ``z1``, ``z2``: unit-norm (N, D)."""
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


@torch.no_grad()
def embed(net: EmbedNet, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    net.eval()
    return torch.cat([net.features(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def embedding_checks(net: EmbedNet, cfg: EmbedNetPretrainConfig, x_train, y_train, x_test, y_test) -> dict[str, float]:
    """What the card reports: 5-NN class accuracy of test images against 10k train images (classes are
    not trained on, so this shows the embedding is semantic), and view retrieval: the share of test images
    whose augmented view is nearest to its own image among all 10k (instances stay apart)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    memory = torch.randperm(len(x_train), generator=gen)[:10_000]
    f_train, f_test = embed(net, x_train[memory]), embed(net, x_test)
    nearest = torch.cdist(f_test, f_train).topk(5, largest=False).indices
    knn = torch.mode(y_train[memory][nearest], dim=1).values
    f_view = embed(net, augment_view(x_test, cfg, gen))
    own = torch.cdist(f_view, f_test).argmin(1) == torch.arange(len(x_test))
    return {
        "knn5_test_accuracy": round(float((knn == y_test).float().mean()), 4),
        "view_retrieval_top1": round(float(own.float().mean()), 4),
    }


def pretrain_evalnet_ssl(
    cfg: EmbedNetPretrainConfig, workdir: Path, out: Path, budget_minutes: float = 0, command: str | None = None
) -> bool:
    check_positive(cfg.steps, "steps")
    gen, x_train, y_train = seeded_start(cfg)
    data = cfg.data
    net = EmbedNet(cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpoints = max(1, cfg.steps // 10)
    run = Run(
        workdir, {"net": net, "opt": opt}, gen, cfg.steps, checkpoints, budget_minutes, tensorboard=cfg.tensorboard
    )
    print(
        f"evalnet_ssl: {num_params(net) / 1e6:.2f}M parameters; work folder {workdir}, weights → {out}", file=sys.stderr
    )

    def step_fn(step: int) -> dict:
        net.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.steps // 20, cfg.steps, 0.01)
        x = x_train[torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)]
        loss = nt_xent(net(augment_view(x, cfg, gen)), net(augment_view(x, cfg, gen)), cfg.temperature)
        return {"loss": optimizer_step(opt, loss), "lr": opt.param_groups[0]["lr"]}

    if not drive(run, step_fn, "evalnet_ssl", 50):
        return False
    wall, step = run.wall_time_s, run.step
    x_test, y_test = load_split("test", data.root, download=data.download).tensors()
    metrics = embedding_checks(net, cfg, x_train, y_train, x_test, y_test)
    card = {
        "kind": "evalnet_ssl",
        "name": out.name,
        "params": num_params(net),
        "feature_dim": EmbedNet.feature_dim,
        "width": cfg.width,
        "objective": "SimCLR NT-Xent instance discrimination (no labels)",
        "weights": "fp32",
        "data": f"Fashion-MNIST train split ({len(x_train)} images)",
        "steps": step,
        "train_wall_time_s": round(wall, 1),
        "provenance": provenance(cfg, cfg.seed, wall, command=command or "python -m add_bench.pretrain evalnet_ssl"),
        "metrics": metrics,
    }
    save_weights(out, net.eval(), card, fp16=False)
    print(f"evalnet_ssl: {metrics}; wrote {out}", file=sys.stderr)
    return True


# ------------------------------------------------------------------------------------ CLI
@command_line
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["featnet"]:  # embedded feature networks: their own command line
        from add_bench.featnet_pretrain import main as featnet_main

        return featnet_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m add_bench.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["teacher", "evalnet", "evalnet_ssl"])
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--config", help="YAML file of config values")
    p.add_argument("--name", help="weights name (default teacher_<size> / evalnet)")
    p.add_argument("--workdir", help="checkpoint/log folder (default runs/<name>)")
    p.add_argument("--out", help="weights folder (default add_bench/weights/<name>)")
    p.add_argument("--budget-minutes", type=float, default=0, help="stop cleanly after this long; re-run resumes")
    add_cfg_option(p)
    a = p.parse_args(argv)
    if a.what == "teacher":
        cfg = load(TeacherPretrainConfig, a.config, a.overrides)
        name = a.name or f"teacher_{cfg.size}"
        run = pretrain_teacher
    elif a.what == "evalnet":
        cfg = load(EvalNetPretrainConfig, a.config, a.overrides)
        name = a.name or "evalnet"
        run = pretrain_evalnet
    else:
        cfg = load(EmbedNetPretrainConfig, a.config, a.overrides)
        name = a.name or "evalnet_ssl"
        run = pretrain_evalnet_ssl
    if a.cfg:
        print_job(cfg)
        return 0
    workdir = Path(a.workdir) if a.workdir else REPO_ROOT / "runs" / name
    out = Path(a.out) if a.out else WEIGHTS_DIR / name
    # the card records the command that made the weights; --budget-minutes only splits the run
    command = shlex.join(
        ["python", "-m", "add_bench.pretrain", a.what, *a.overrides]
        + (["--config", a.config] if a.config else [])
        + (["--name", a.name] if a.name else [])
    )
    done = run(cfg, workdir, out, a.budget_minutes, command)
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
