"""Pre-train the embedded benchmark's shipped networks.

    python -m add_bench.pretrain teacher [size=small|large] [key=value ...]
    python -m add_bench.pretrain evalnet [key=value ...]
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
from tqdm import tqdm

from add_bench import checkpoint
from add_bench.config import EvalNetPretrainConfig, TeacherPretrainConfig, check_positive, choose, load, to_dict
from add_bench.data import NUM_CLASSES, load_split
from add_bench.diffusion import Schedule
from add_bench.errors import AddBenchError, TrainingDiverged
from add_bench.losses import TEACHER_WEIGHTINGS, denoising_loss
from add_bench.networks.evalnet import EvalNet
from add_bench.networks.unets import build_unet, num_params, save_weights, unet_config
from add_bench.loop import Run, lr_at, set_threads
from add_bench.provenance import REPO_ROOT, WEIGHTS_DIR, provenance


# ------------------------------------------------------------------------------------ teacher
def pretrain_teacher(cfg: TeacherPretrainConfig, workdir: Path, out: Path, budget_minutes: float = 0,
                     command: str | None = None) -> bool:
    """Train (or resume) a teacher; return True when finished and exported. ``command`` goes on the card."""
    choose(dict.fromkeys(TEACHER_WEIGHTINGS), cfg.loss_weighting, "loss_weighting")
    check_positive(cfg.steps, "steps")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_split("train", cfg.data.root, cfg.data.val_size, cfg.data.split_seed, cfg.data.download).tensors()
    schedule = Schedule(cfg.schedule)
    unet = build_unet(cfg.size)
    ema = checkpoint.EMA(unet, cfg.ema_decay, cfg.ema_warmup_steps)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(workdir, {"unet": unet, "ema": ema, "opt": opt}, gen, cfg.steps, cfg.ckpt_every, budget_minutes)
    print(f"teacher {cfg.size}: {num_params(unet) / 1e6:.2f}M parameters; work folder {workdir}, "
          f"weights → {out}", file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"teacher-{cfg.size}", dynamic_ncols=True)
    loss_avg = None
    while not run.done:
        for g in opt.param_groups:
            g["lr"] = lr_at(run.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
        loss = denoising_loss(unet, schedule, x_train[idx], y_train[idx], gen, cfg.cond_drop_prob,
                              NUM_CLASSES, cfg.loss_weighting, cfg.min_snr_gamma)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"teacher loss is {loss.item()} at step {run.step}; last good checkpoint "
                                   f"kept in {workdir}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(unet, run.step)
        run.step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if run.step % cfg.log_every == 0:
            run.log.write(step=run.step, loss=loss.item(), loss_avg=loss_avg, grad_norm=gnorm.item(),
                          lr=opt.param_groups[0]["lr"], wall_time_s=run.wall_time_s)
        if run.end_of_step():
            bar.close()
            return False
    bar.close()
    wall, step = run.wall_time_s, run.step
    card = {
        "kind": "teacher", "name": out.name, "unet": unet_config(cfg.size), "schedule": to_dict(cfg.schedule),
        "null_label": NUM_CLASSES, "params": num_params(unet), "weights": "EMA, fp16",
        "data": f"Fashion-MNIST train split ({len(x_train)} images; val carve-out {cfg.data.val_size})",
        "steps": step, "train_wall_time_s": round(wall, 1),
        "provenance": provenance(cfg, cfg.seed, wall, command=command or f"python -m add_bench.pretrain teacher size={cfg.size}"),
        "metrics": {},
    }
    save_weights(out, ema.module, card)
    print(f"wrote {out}/model.safetensors and card.json ({wall / 60:.1f} min)", file=sys.stderr)
    return True


# ------------------------------------------------------------------------------------ evalnet
def pretrain_evalnet(cfg: EvalNetPretrainConfig, workdir: Path, out: Path, budget_minutes: float = 0,
                     command: str | None = None) -> bool:
    check_positive(cfg.epochs, "epochs")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    d = cfg.data
    x_train, y_train = load_split("train", d.root, d.val_size, d.split_seed, d.download).tensors()
    x_val, y_val = load_split("val", d.root, d.val_size, d.split_seed, d.download).tensors()
    net = EvalNet()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(x_train) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    run = Run(workdir, {"net": net, "opt": opt}, gen, total, steps_per_epoch, budget_minutes)
    bar = tqdm(total=total, initial=run.step, desc="evalnet", dynamic_ncols=True)
    while not run.done:
        net.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(run.step, cfg.lr, steps_per_epoch // 2, total, 0.01)
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
        x = random_shift(x_train[idx], cfg.max_shift, gen)
        loss = F.cross_entropy(net(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if run.step % steps_per_epoch == 0 or run.done:
            run.log.write(step=run.step, epoch=run.step / steps_per_epoch, loss=loss.item(),
                          val_acc=accuracy(net, x_val, y_val), wall_time_s=run.wall_time_s)
        if run.end_of_step():
            bar.close()
            return False
    bar.close()
    wall, step = run.wall_time_s, run.step
    x_test, y_test = load_split("test", d.root, download=d.download).tensors()
    metrics = {"val_accuracy": accuracy(net, x_val, y_val), "test_accuracy": accuracy(net, x_test, y_test)}
    card = {
        "kind": "evalnet", "name": out.name, "params": num_params(net), "feature_dim": EvalNet.feature_dim,
        "weights": "fp32", "data": f"Fashion-MNIST train split ({len(x_train)} images)",
        "steps": step, "train_wall_time_s": round(wall, 1),
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
    cols = (dx[:, None] + torch.arange(w)[None])
    return pad[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    correct = sum((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


# ------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["featnet"]:  # embedded feature networks: their own command line
        from add_bench.featnet_pretrain import main as featnet_main
        return featnet_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m add_bench.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["teacher", "evalnet"])
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--config", help="YAML file of config values")
    p.add_argument("--name", help="weights name (default teacher_<size> / evalnet)")
    p.add_argument("--workdir", help="checkpoint/log folder (default runs/<name>)")
    p.add_argument("--out", help="weights folder (default add_bench/weights/<name>)")
    p.add_argument("--budget-minutes", type=float, default=0, help="stop cleanly after this long; re-run resumes")
    a = p.parse_args(argv)
    try:
        if a.what == "teacher":
            cfg = load(TeacherPretrainConfig, a.config, a.overrides)
            name = a.name or f"teacher_{cfg.size}"
            run = pretrain_teacher
        else:
            cfg = load(EvalNetPretrainConfig, a.config, a.overrides)
            name = a.name or "evalnet"
            run = pretrain_evalnet
        workdir = Path(a.workdir) if a.workdir else REPO_ROOT / "runs" / name
        out = Path(a.out) if a.out else WEIGHTS_DIR / name
        # the card records the command that made the weights; --budget-minutes only splits the run
        command = shlex.join(["python", "-m", "add_bench.pretrain", a.what, *a.overrides]
                             + (["--config", a.config] if a.config else []) + (["--name", a.name] if a.name else []))
        done = run(cfg, workdir, out, a.budget_minutes, command)
    except AddBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
