"""Can the discriminator catch a generator? Train fresh heads against its frozen samples and watch.

    python -m add_bench.discriminator_probe runs/sweeps/cells/<id>/student --out results/discriminator_probe \
        --variant "discriminator.augment='color,translation,cutout'" --variant discriminator.augment=color \
        --variant "discriminator.augment=''"

In ADD training the discriminator and the student move together, so a discriminator near chance can mean
"the samples are good" or "the discriminator cannot learn". This probe tells the two apart. It freezes a
generator (any student or teacher folder, sampled with its own sampler, 1 step by default) and pairs each
of its samples with a real training image of the same class; that image gives c_img, as x0 does for
s = 999 in training. Then it trains the trainer's own discriminator on the real images against the
samples: the same feature network, heads, conditioning, DiffAugment, R1 and optimiser
(``train.class_discriminator_side``, ``train.discriminator_step``), from ``[config.yaml] [key=value ...]``.

Every ``--eval-every`` steps it records the held-out accuracy of each head and of their sum on pairs never
trained on, without augmentation. A sample counts as called real when the head's logits, averaged over
tokens, are positive; for the sum, Σ_k of them, the quantity L_adv^G pushes on. A logistic-regression
probe on each feature level's mean token is the yardstick: how separable the frozen features are at all.

Each ``--variant key=value`` is one run: the shared config with that override, on the same samples, seed
and batch order (none given: one run of the shared config). The output folder gets ``probe.json`` (every
curve, the generator's card and weights hash, provenance), ``table.md`` and ``table.csv``. Embedded
benchmark only: the generator is a class-conditional weights folder (a Stable Diffusion folder is not
taken).
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from add_bench.augment import diff_augment
from add_bench.config import TrainConfig, check_positive, load
from add_bench.data import load_split, to_model_range
from add_bench.errors import ConfigError, command_line
from add_bench.evaluate import default_sampler, generate, load_denoiser
from add_bench.loop import set_threads
from add_bench.networks.unets import weights_file
from add_bench.provenance import atomic_write_json, atomic_write_text, provenance, resolve_weights
from add_bench.train import adam, class_discriminator_side, conditioning, discriminator_step


def paired_real(fake_labels: torch.Tensor, real_x: torch.Tensor, real_y: torch.Tensor, gen: torch.Generator):
    """For each fake label a distinct real image of the same class, drawn without replacement."""
    out = torch.empty((len(fake_labels), *real_x.shape[1:]), dtype=real_x.dtype)
    for c in fake_labels.unique().tolist():
        want = (fake_labels == c).nonzero().flatten()
        have = (real_y == c).nonzero().flatten()
        if len(have) < len(want):
            raise ConfigError(f"class {c}: {len(want)} pairs asked for, the training split has {len(have)} images")
        out[want] = real_x[have[torch.randperm(len(have), generator=gen)[: len(want)]]]
    return out


def linear_probe_accuracy(real: torch.Tensor, fake: torch.Tensor, n_train: int, l2: float = 1e-3) -> float:
    """Held-out accuracy of an L2-regularised logistic regression, real vs fake, on standardised (N, D) features;
    the first ``n_train`` rows of each are the training set."""
    x = torch.cat([real[:n_train], fake[:n_train]])
    y = torch.cat([torch.ones(n_train), torch.zeros(n_train)])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits((x - mu) / sd @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        right = torch.cat([(real[n_train:] - mu) / sd @ w + b > 0, (fake[n_train:] - mu) / sd @ w + b <= 0])
    return right.float().mean().item()


@torch.no_grad()
def held_out_accuracy(discriminator, c_text, c_img, real_features, fake_features) -> dict:
    """Per head and for the sum of heads: ½ (share of real called real + share of fake called fake)."""
    real_logits = [r.mean(1) for r in discriminator(real_features, c_text, c_img)]
    fake_logits = [f.mean(1) for f in discriminator(fake_features, c_text, c_img)]

    def acc(r, f):
        return round(0.5 * (r.gt(0).float().mean() + f.lt(0).float().mean()).item(), 4)

    return {
        "acc": acc(sum(real_logits), sum(fake_logits)),
        "acc_per_head": [acc(r, f) for r, f in zip(real_logits, fake_logits)],
        "abs_logit_per_head": [
            round(0.5 * (r.abs().mean() + f.abs().mean()).item(), 4) for r, f in zip(real_logits, fake_logits)
        ],
    }


def probe(
    cfg: TrainConfig,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor,
    n_train: int,
    steps: int,
    eval_every: int,
    seed: int,
    progress: bool = True,
) -> dict:
    """Fresh heads from ``cfg`` trained ``steps`` batches on real[:n_train] vs fake[:n_train]; the rest is held out."""
    torch.manual_seed(seed)
    dcfg = cfg.discriminator
    feature_network, c_img_network, c_text, disc = class_discriminator_side(cfg)
    frozen = SimpleNamespace(c_text=c_text, c_img_network=c_img_network)  # what ``conditioning`` reads
    opt_d = adam(disc.parameters(), cfg.optim.discriminator_lr, cfg)
    with torch.no_grad():  # unaugmented features, once: the linear probe and the held-out scoring share them
        levels = list(zip(feature_network(real), feature_network(fake)))
    linear = [round(linear_probe_accuracy(r.mean(2), f.mean(2), n_train), 4) for r, f in levels]
    test = (
        *conditioning(frozen, real[n_train:], labels[n_train:]),
        [r[n_train:] for r, _ in levels],
        [f[n_train:] for _, f in levels],
    )
    gen = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for step in tqdm(range(steps + 1), desc=f"probe {dcfg.augment or 'no augment'}", leave=False, disable=not progress):
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, **held_out_accuracy(disc, *test)})
        if step == steps:
            break
        idx = torch.randint(0, n_train, (cfg.batch_size,), generator=gen)
        c_text_b, c_img_b = conditioning(frozen, real[idx], labels[idx])
        with torch.no_grad():  # as in training: the fake features first, then the real ones inside the step
            fake_features = feature_network(diff_augment(fake[idx], dcfg.augment, gen))
        discriminator_step(
            feature_network, disc, cfg, real[idx], fake_features, c_text_b, c_img_b, gen, opt_d, step + 1
        )
    return {"linear_probe_acc_per_level": linear, "curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def make_pairs(generator: str, sampling_steps: int, sampler: str | None, n: int, cfg: TrainConfig, seed: int):
    """``n`` balanced-class samples of the frozen generator (uint8-rounded, as evaluated) and their real partners."""
    denoiser, card = load_denoiser(generator)
    sampler = sampler or default_sampler(card["kind"])
    out = generate(denoiser, sampler, sampling_steps, n, seed=seed, batch_size=500, progress=False)
    fake = to_model_range(out.samples.images)
    labels = torch.from_numpy(out.samples.labels).long()
    real_x, real_y = load_split(
        "train", cfg.data.root, cfg.data.val_size, cfg.data.split_seed, cfg.data.download
    ).tensors()
    real = paired_real(labels, real_x, real_y, torch.Generator().manual_seed(seed))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))  # train / held-out split
    return real[order], fake[order], labels[order], sampler, card


def write_probe_tables(out: Path, runs: list[dict]) -> None:
    rows = []
    for r in runs:
        last = r["curve"][-1]
        early = next((c for c in r["curve"] if c["step"] >= last["step"] // 6), last)
        rows.append(
            {
                "variant": r["variant"] or "(shared config)",
                f"acc @ {early['step']}": early["acc"],
                f"acc @ {last['step']}": last["acc"],
                "acc per head (last)": " / ".join(f"{a:.3f}" for a in last["acc_per_head"]),
                "|logit| (last)": round(sum(last["abs_logit_per_head"]) / len(last["abs_logit_per_head"]), 3),
                "linear probe per level": " / ".join(f"{a:.3f}" for a in r["linear_probe_acc_per_level"]),
                "seconds": r["seconds"],
            }
        )
    df = pd.DataFrame(rows)
    atomic_write_text(out / "table.csv", df.to_csv(index=False))
    atomic_write_text(
        out / "table.md",
        "# Discriminator probe\n\n" + df.to_markdown(index=False) + "\n\n"
        "Held-out accuracy of fresh discriminator heads trained against the frozen generator's samples "
        "(½ real-called-real + ½ fake-called-fake, sum of heads, no augmentation at test); "
        "linear probe = logistic regression on each feature level's mean token. "
        "Written by `python -m add_bench.discriminator_probe`; provenance in `probe.json`.\n",
    )


@command_line(ValueError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.discriminator_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("generator", help="student or teacher weights folder (or shipped name) whose samples are the fakes")
    p.add_argument("--config", help="TrainConfig YAML (default: the schema's defaults = the embedded default cell)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one run per --variant: a TrainConfig override on top of the shared ones (repeatable)",
    )
    p.add_argument("--steps", type=int, default=300, help="discriminator updates per run")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument(
        "--samples", type=int, default=2560, help="generated samples (and real partners), training + held-out"
    )
    p.add_argument("--held-out", type=int, default=512)
    p.add_argument("--sampling-steps", type=int, default=1)
    p.add_argument("--sampler", default=None, help="default: add for a student, ddim for a teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("overrides", nargs="*", help="TrainConfig overrides key=value, applied to every run")
    a = p.parse_intermixed_args(argv)
    for name in ("steps", "eval_every", "samples", "held_out", "sampling_steps"):
        check_positive(getattr(a, name), "--" + name.replace("_", "-"))
    if a.held_out >= a.samples:
        raise ConfigError(f"--held-out {a.held_out} must be smaller than --samples {a.samples}")
    bad = [v for v in a.variant if "=" not in v]
    if bad:
        raise ConfigError(f"--variant {bad[0]}: expected KEY=VALUE (e.g. discriminator.augment=color)")
    variants = a.variant or [None]
    cfgs = [load(TrainConfig, a.config, a.overrides + ([v] if v else [])) for v in variants]
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the output folder ({e.strerror})") from e
    set_threads(cfgs[0].threads)
    start = time.time()
    real, fake, labels, sampler, card = make_pairs(a.generator, a.sampling_steps, a.sampler, a.samples, cfgs[0], a.seed)
    n_train = a.samples - a.held_out
    runs = []
    for v, cfg in zip(variants, cfgs):
        print(f"discriminator probe: {v or 'shared config'}", file=sys.stderr)
        resolved = {} if v is None else {v.split("=")[0]: OmegaConf.select(cfg, v.split("=")[0])}
        runs.append(
            {
                "variant": v,
                "resolved": resolved,
                **probe(cfg, real, fake, labels, n_train, a.steps, a.eval_every, a.seed),
            }
        )
    weights = weights_file(resolve_weights(a.generator))
    result = {
        "generator": str(a.generator),
        "generator_card": card,
        "sampler": sampler,
        "generator_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None,
        "sampling_steps": a.sampling_steps,
        "train_pairs": n_train,
        "held_out_pairs": a.held_out,
        "overrides": a.overrides,
        "runs": runs,
        "provenance": provenance(
            cfgs[0],
            a.seed,
            time.time() - start,
            command=shlex.join(["python", "-m", "add_bench.discriminator_probe", *sys.argv[1:]]),
        ),
    }
    atomic_write_json(out / "probe.json", result)
    write_probe_tables(out, runs)
    print(f"discriminator probe: wrote {out / 'probe.json'}, {out / 'table.md'}, {out / 'table.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
