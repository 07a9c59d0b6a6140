"""Pre-train the embedded feature networks (dino_s, dino_l, clip_s) on the Fashion-MNIST train split.

    python -m add_bench.pretrain featnet <name> [key=value ...] [--budget-minutes M]
    (same as: python -m add_bench.featnet_pretrain <name> ...)

* ``dino_s``, ``dino_l``: DINO self-distillation (Caron et al. 2021). A student ViT + projection head
  (MLP → L2-normalised bottleneck → weight-normed prototype layer) matches the output distribution of
  a teacher (EMA of the student, momentum cosine-annealed to 1) across multi-crop views: 2 global
  28×28 crops seen by both, a few 12×12 local crops seen by the student only. The teacher's outputs
  are centred (EMA of the batch mean) and sharpened (temperature 0.04 vs the student's 0.1).
* ``clip_s``: contrastive image–prompt training (InfoNCE with a learnable temperature). Image tower
  = the ViT's CLS embedding + a linear map; text tower = word embeddings of the class prompt,
  mean-pooled + a linear map (``add_bench.networks.featnets.TextTower``). A batch's distinct captions
  are the 10 class prompts, so image→text is a softmax over the 10 prompt embeddings and text→image
  averages the InfoNCE term over the images of that class (several positives per caption).

The work folder (``runs/featnet_<name>/``: checkpoint.pt, log.jsonl) resumes exactly; the finished
network ships in ``add_bench/weights/featnet_<name>/`` (model.safetensors with ``vit.*`` keys, plus
the clip_s text tower; card.json with the architecture, objective and a k-NN accuracy).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from add_bench import checkpoint
from add_bench.config import DataConfig, add_cfg_option, check_positive, choose, load, print_job
from add_bench.data import NUM_CLASSES, PROMPTS, load_split
from add_bench.errors import command_line
from add_bench.loop import clipped_update, drive, pretraining_batch, set_threads, start_pretraining
from add_bench.networks.featnets import FEATURE_NETWORKS, ClipS, make_vit, prompt_vocab
from add_bench.networks.unets import num_params, save_weights
from add_bench.provenance import REPO_ROOT, WEIGHTS_DIR, provenance


@dataclass
class FeatNetPretrainConfig:
    """``python -m add_bench.featnet_pretrain <name>``: an embedded feature network (dino_s, dino_l, clip_s)."""

    steps: int = 1000  # per-network defaults in FEATNET_DEFAULTS
    batch_size: int = 64
    lr: float = 1e-3  # AdamW peak, linear warm-up then cosine decay
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.04  # not applied to biases, norms, embeddings of dim 1
    grad_clip: float = 3.0
    # DINO
    teacher_momentum: float = 0.99  # EMA momentum of the teacher, cosine-annealed to 1 at the last step
    # (DINO's 0.996 is for ~10⁵ steps; our runs are ~10³ steps)
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    out_dim: int = 256  # prototypes
    head_hidden_dim: int = 256
    head_bottleneck_dim: int = 64
    freeze_last_layer_steps: int = 50  # the prototype layer gets no update at first (DINO)
    local_crops: int = 4
    local_size: int = 12  # pixels (patch 4 → 9 tokens)
    global_scale_min: float = 0.4  # random-resized-crop area fraction, global crops: [min, 1]
    local_scale_min: float = 0.1  # local crops: [min, global_scale_min]
    jitter: float = 0.4  # brightness/contrast factors in [1 - jitter, 1 + jitter], applied with p = 0.8
    # CLIP
    clip_embed_dim: int = 64
    clip_scale_min: float = 0.6  # crop area fraction for clip_s's single view
    # run
    knn_k: int = 20  # card metric: weighted k-NN accuracy of CLS embeddings, val split
    knn_train: int = 10000  # train-split images that form the k-NN memory bank
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 20
    threads: int = 0
    # TensorBoard events beside log.jsonl (<workdir>/tensorboard): how the run is logged, not what it computes
    tensorboard: bool = True
    data: DataConfig = field(default_factory=DataConfig)


# Per-network overrides of FeatNetPretrainConfig. dino_s and dino_l share one recipe (1,300 steps), so
# Table 1a compares network capacity, not training length.
FEATNET_DEFAULTS: dict[str, dict[str, Any]] = {
    "dino_s": dict(steps=1300),
    "dino_l": dict(steps=1300),
    "clip_s": dict(steps=3500, lr=2e-3, weight_decay=0.05, warmup_steps=200),
}


# ------------------------------------------------------------------------------------ augmentation
def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Per-image random crop (area fraction in ``scale``, aspect in ``ratio``), random horizontal flip,
    resized to size×size (bilinear); one affine grid per image."""
    n = len(x)
    area = torch.empty(n).uniform_(*scale, generator=gen)
    aspect = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of the side
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """Random brightness then contrast factors in [1 - s, 1 + s] (on [0, 1] intensities), with probability p."""
    n = len(x)
    on = (torch.rand(n, generator=gen) < p).float().view(n, 1, 1, 1)
    b, c = (1 + (torch.rand(2, n, 1, 1, 1, generator=gen) * 2 - 1) * strength * on).unbind(0)
    y = (x + 1) / 2 * b
    m = y.mean((1, 2, 3), keepdim=True)
    return (((y - m) * c + m).clamp(0, 1)) * 2 - 1


def multi_crop(x: torch.Tensor, cfg: FeatNetPretrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2 global crops (2B, 1, 28, 28) and cfg.local_crops local crops (L·B, 1, s, s), jittered."""

    def view(size: int, lo: float, hi: float) -> torch.Tensor:
        return color_jitter(random_resized_crop(x, size, (lo, hi), gen), cfg.jitter, gen)

    size = x.shape[-1]
    glob = torch.cat([view(size, cfg.global_scale_min, 1.0) for _ in range(2)])
    loc = torch.cat([view(cfg.local_size, cfg.local_scale_min, cfg.global_scale_min) for _ in range(cfg.local_crops)])
    return glob, loc


# ------------------------------------------------------------------------------------ DINO
class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normed prototype layer (its norm fixed at 1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.last = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINO(nn.Module):
    """Backbone ViT (its CLS embedding) + DINOHead; student and (as an EMA copy) teacher."""

    def __init__(self, arch: dict[str, Any], cfg: FeatNetPretrainConfig):
        super().__init__()
        self.vit = make_vit(arch)
        self.head = DINOHead(arch["embed_dim"], cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim)

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        """Each argument a batch of same-size crops; outputs concatenated in order."""
        return self.head(torch.cat([self.vit(c) for c in crops]))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global crop and the
    student distribution of every other crop; the centre is an EMA of the teacher's batch mean."""

    def __init__(self, out_dim: int, teacher_temp: float, student_temp: float, center_momentum: float):
        super().__init__()
        self.tt, self.st, self.m = teacher_temp, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_crops: int) -> torch.Tensor:
        s = (student_out / self.st).log_softmax(-1).chunk(n_crops)
        t = ((teacher_out - self.center) / self.tt).softmax(-1).detach().chunk(2)
        terms = [-(ti * sv).sum(-1).mean() for i, ti in enumerate(t) for v, sv in enumerate(s) if v != i]
        with torch.no_grad():
            self.center.mul_(self.m).add_(teacher_out.mean(0, keepdim=True), alpha=1 - self.m)
        return sum(terms) / len(terms)


class DinoTask:
    def __init__(self, arch: dict[str, Any], cfg: FeatNetPretrainConfig):
        self.cfg = cfg
        self.student = DINO(arch, cfg)
        self.teacher = checkpoint.EMA(self.student, cfg.teacher_momentum)
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.teacher_temp, cfg.student_temp, cfg.center_momentum)
        self.trainable = self.student

    def objects(self) -> dict[str, Any]:
        return {"student": self.student, "teacher": self.teacher, "dino_loss": self.loss_fn}

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        glob, loc = multi_crop(x, self.cfg, gen)
        with torch.no_grad():
            t_out = self.teacher.module(glob)
        s_out = self.student(glob, loc)
        loss = self.loss_fn(s_out, t_out, 2 + self.cfg.local_crops)
        # collapse monitors: entropy of the mean teacher distribution (high = uses many prototypes)
        p = ((t_out - self.loss_fn.center) / self.cfg.teacher_temp).softmax(-1).mean(0)
        return loss, {"teacher_entropy": -(p * p.clamp_min(1e-12).log()).sum().item()}

    def before_step(self, step: int) -> None:
        if step < self.cfg.freeze_last_layer_steps:
            for p in self.student.head.last.parameters():
                p.grad = None

    def after_step(self, step: int) -> None:
        m0 = self.cfg.teacher_momentum  # cosine schedule m0 → 1
        self.teacher.decay = 1 - (1 - m0) * (math.cos(math.pi * step / self.cfg.steps) + 1) / 2
        self.teacher.update(self.student, step)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.module.vit(x)

    def export(self) -> tuple[nn.Module, dict[str, Any]]:
        return nn.ModuleDict({"vit": self.teacher.module.vit}), {"weights_of": "DINO teacher (EMA) backbone"}


# ------------------------------------------------------------------------------------ CLIP
def clip_loss(img: torch.Tensor, txt: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between images (N, E) and the prompts of all classes (C, E), labels y (N,)."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()  # (N, C)
    i2t = F.cross_entropy(logits, y)
    pos = F.one_hot(y, txt.shape[0]).t().float()  # (C, N): images of each caption
    lt = logits.t().log_softmax(-1)
    present = pos.sum(1) > 0
    t2i = (-(lt * pos).sum(1) / pos.sum(1).clamp(min=1))[present].mean()
    return (i2t + t2i) / 2


class ClipTask:
    def __init__(self, arch: dict[str, Any], cfg: FeatNetPretrainConfig):
        self.cfg = cfg
        self.model = ClipS(arch, prompt_vocab(PROMPTS), cfg.clip_embed_dim)
        self.trainable = self.model

    def objects(self) -> dict[str, Any]:
        return {"model": self.model}

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        x = color_jitter(random_resized_crop(x, x.shape[-1], (self.cfg.clip_scale_min, 1.0), gen), self.cfg.jitter, gen)
        img, txt = self.model.image_embedding(x), self.model.text_embedding(PROMPTS)
        return clip_loss(img, txt, y, self.model.logit_scale), {"temperature": self.model.logit_scale.exp().item()}

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=math.log(100))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.vit(x)

    def export(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.model, {
            "weights_of": "ViT + image projection + text tower",
            "vocab": self.model.text.vocab,
            "clip_embed_dim": self.cfg.clip_embed_dim,
            "prompts": list(PROMPTS),
        }


TASKS = {"dino": DinoTask, "clip": ClipTask}


# ------------------------------------------------------------------------------------ metric
@torch.no_grad()
def embed_all(fn, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def knn_accuracy(
    train_emb: torch.Tensor,
    train_y: torch.Tensor,
    test_emb: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int = NUM_CLASSES,
) -> float:
    """Weighted k-NN (DINO's protocol): cosine similarity, votes weighted by exp(sim / T)."""
    a, b = F.normalize(train_emb, dim=-1), F.normalize(test_emb, dim=-1)
    sim, idx = (b @ a.t()).topk(min(k, len(a)), dim=1)
    votes = torch.zeros(len(b), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------ loop
def trainable_featnets() -> list[str]:
    return [n for n, s in FEATURE_NETWORKS.items() if s.kind == "embedded" and s.objective in TASKS]


def pretrain_featnet(
    name: str, cfg: FeatNetPretrainConfig, workdir: Path, out: Path, budget_minutes: float = 0
) -> bool:
    """Train (or resume) an embedded feature network; return True when finished and exported."""
    choose(dict.fromkeys(trainable_featnets()), name, "featnet")
    check_positive(cfg.steps, "steps")
    spec = FEATURE_NETWORKS[name]
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = cfg.data
    x_train, y_train = load_split("train", data.root, data.val_size, data.split_seed, data.download).tensors()
    task = TASKS[spec.objective](dict(spec.arch), cfg)
    opt = torch.optim.AdamW(param_groups(task.trainable, cfg.weight_decay), lr=cfg.lr)
    run, loss_avg = start_pretraining(
        workdir,
        {**task.objects(), "opt": opt},
        gen,
        cfg,
        budget_minutes,
        f"featnet {name} ({spec.objective}): {num_params(task.trainable) / 1e6:.2f}M parameters; "
        f"work folder {workdir}, weights → {out}",
    )

    def step_fn(step: int) -> dict:
        idx = pretraining_batch(step, opt, cfg, len(x_train), gen)
        loss, stats = task.loss(x_train[idx], y_train[idx], gen)
        where = f"(featnet {name}) at step {step}; last good checkpoint kept in {workdir}; lower lr (now {cfg.lr})"
        row = clipped_update(
            loss, opt, task.trainable.parameters(), cfg.grad_clip, loss_avg, where, lambda: task.before_step(step)
        )
        task.after_step(step)
        return {**row, **stats}

    if not drive(run, step_fn, f"featnet-{name}", cfg.log_every, postfix=("loss_avg",)):
        return False
    wall, step = run.wall_time_s, run.step
    metrics = evaluate_featnet(task, cfg)
    module, extra = task.export()
    card = {
        "kind": "featnet",
        "name": name,
        "arch": dict(spec.arch),
        "objective": spec.objective,
        "layers": list(spec.layers),
        "dims": [spec.arch["embed_dim"]] * len(spec.layers),
        "params": num_params(module),
        "weights": "fp32",
        **extra,
        "data": f"Fashion-MNIST train split ({len(x_train)} images; val carve-out {data.val_size})",
        "steps": step,
        "train_wall_time_s": round(wall, 1),
        "provenance": provenance(cfg, cfg.seed, wall, command=f"python -m add_bench.pretrain featnet {name}"),
        "metrics": metrics,
    }
    save_weights(out, module, card, fp16=False)
    print(f"featnet {name}: {metrics}; wrote {out} ({wall / 60:.1f} min)", file=sys.stderr)
    return True


@torch.no_grad()
def evaluate_featnet(task, cfg: FeatNetPretrainConfig) -> dict[str, float]:
    """k-NN accuracy of the CLS embeddings on the val split (memory: knn_train train images);
    clip_s also: zero-shot accuracy (nearest class-prompt embedding) on the val split."""
    data = cfg.data
    x_tr, y_tr = load_split("train", data.root, data.val_size, data.split_seed, data.download).tensors()
    x_va, y_va = load_split("val", data.root, data.val_size, data.split_seed, data.download).tensors()
    pick = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))[: cfg.knn_train]
    acc = knn_accuracy(embed_all(task.embed, x_tr[pick]), y_tr[pick], embed_all(task.embed, x_va), y_va, cfg.knn_k)
    metrics = {f"knn{cfg.knn_k}_val_accuracy": round(acc, 4), "knn_train_images": len(pick)}
    if isinstance(task, ClipTask):
        task.model.eval()
        txt = task.model.text_embedding(PROMPTS)
        pred = (embed_all(task.model.image_embedding, x_va) @ txt.t()).argmax(1)
        metrics["zero_shot_val_accuracy"] = round((pred == y_va).float().mean().item(), 4)
    return metrics


# ------------------------------------------------------------------------------------ CLI
def load_featnet_config(
    name: str, path: str | None = None, overrides: list[str] | None = None
) -> FeatNetPretrainConfig:
    """Schema defaults ← the network's FEATNET_DEFAULTS ← YAML file ← key=value overrides."""
    from add_bench.config import load_yaml

    choose(dict.fromkeys(trainable_featnets()), name, "featnet")
    cfg = load(FeatNetPretrainConfig, path, overrides)
    explicit = set(load_yaml(path).keys() if path else ()) | {o.split("=", 1)[0] for o in overrides or []}
    for key, value in FEATNET_DEFAULTS.get(name, {}).items():
        if key not in explicit:
            setattr(cfg, key, value)
    return cfg


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.pretrain featnet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help=f"one of {', '.join(trainable_featnets())}")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--config", help="YAML file of config values")
    p.add_argument("--workdir", help="checkpoint/log folder (default runs/featnet_<name>)")
    p.add_argument("--out", help="weights folder (default add_bench/weights/featnet_<name>)")
    p.add_argument("--budget-minutes", type=float, default=0, help="stop cleanly after this long; re-run resumes")
    add_cfg_option(p)
    a = p.parse_args(argv)
    cfg = load_featnet_config(a.name, a.config, a.overrides)
    if a.cfg:
        print_job(cfg)
        return 0
    workdir = Path(a.workdir) if a.workdir else REPO_ROOT / "runs" / f"featnet_{a.name}"
    out = Path(a.out) if a.out else WEIGHTS_DIR / f"featnet_{a.name}"
    done = pretrain_featnet(a.name, cfg, workdir, out, a.budget_minutes)
    return 0 if done else 3


if __name__ == "__main__":
    sys.exit(main())
