"""Score a generator (teacher or ADD student) at several step counts.

    python -m add_bench.evaluate add_bench/weights/teacher_small --steps 1 4 50 [--cfg-scale 2]
    python -m add_bench.evaluate runs/<cell> --steps 1 2 4 --out metrics.json --export-samples s.npz

A checkpoint is a weights folder (card.json and its weights: unet/ in diffusers' layout). The sampler defaults to DDIM for a
teacher and ADD multi-step sampling for a student (``--sampler ddim|dpm_solver|add``). Samples use balanced classes and a fixed seed, so
every step count starts from the same noise; ``--export-samples`` writes uint8 images (N, 28, 28) and
int labels so any other tool can score the same samples.

``--shards DIR``: the samples are made in shards of ``eval.batch_size`` (one sampling batch each), each
saved atomically to ``DIR/<sampler>_<steps>steps_cfg<scale>/`` with the generator state after it; a re-run
skips the finished shards (an interrupted evaluation resumes where it stopped, with the same samples) and
scores all of them together: the samples, and so the metrics, equal an evaluation without shards. A sweep
cell keeps its shards in ``<cell>/eval_shards/``. FID reference statistics are computed once per reference
set and cached (``metrics.STATS_CACHE``).

Cluster scale: a Stable Diffusion folder in diffusers' layout (``add_bench.networks.sd``) is sampled in
latent space from the captions of ``eval.num_samples`` COCO images and scored with ``metrics=cluster``:

    python -m add_bench.evaluate /models/sd21 --steps 1 4 --cfg-scale 7.5 metrics=cluster \
        coco.root=/data/coco cluster.inception=/weights/inception cluster.clip_weights=/weights/vit-g-14.bin
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from add_bench.config import EvalConfig, add_cfg_option, check_positive, load, print_job
from add_bench.data import balanced_labels, to_uint8
from add_bench.diffusion import SAMPLERS, Denoiser, Sampler, get_sampler, schedule_from_card
from add_bench.errors import CheckpointError, ConfigError, command_line
from add_bench.metrics import SampleSet, build_suite, metric_features, score
from add_bench.networks.unets import load_unet, read_card
from add_bench.provenance import atomic_path, atomic_write_json, provenance, resolve_weights


def load_denoiser(checkpoint: str | Path) -> tuple[Denoiser, dict[str, Any]]:
    folder = resolve_weights(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (expected card.json and unet/)")
    card = read_card(folder)
    if card.get("kind") not in ("teacher", "student"):
        raise CheckpointError(f"{folder}/card.json: kind={card.get('kind')!r}; accepted: teacher, student")
    return Denoiser(
        load_unet(folder), schedule_from_card(card), card["null_label"], card.get("student_timesteps")
    ), card


class Shards:
    """One evaluation's samples as shards in ``folder``: ``shard_<k>.npz`` holds sampling batch k's images, its
    seconds and the sampling generator's state after it, written atomically. ``spec`` (what decides the
    samples: weights, sampler, steps, seed, ...) is kept in ``spec.json``; shards made under another spec are
    an error, not mixed in."""

    def __init__(self, folder: Path, spec: dict[str, Any]):
        import json

        self.folder = Path(folder)
        path = self.folder / "spec.json"
        spec = json.loads(json.dumps(spec, default=str))
        if path.is_file():
            before = json.loads(path.read_text())
            changed = [
                f"{k}={before.get(k)!r}, now {spec.get(k)!r}"
                for k in spec.keys() | before
                if before.get(k) != spec.get(k)
            ]
            if changed:
                raise ConfigError(
                    f"{self.folder}: shards made with {'; '.join(sorted(changed))}; accepted: the same evaluation "
                    "settings, or another (or an emptied) shards folder"
                )
        else:
            atomic_write_json(path, spec)

    def path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.npz"

    def load(self, k: int) -> tuple[np.ndarray, float, torch.Tensor] | None:
        """Shard k's (images, seconds, generator state after it), or None when it is not finished."""
        if not self.path(k).is_file():
            return None
        with np.load(self.path(k)) as z:
            return z["images"], float(z["seconds"]), torch.from_numpy(z["generator"])

    def save(self, k: int, images: np.ndarray, seconds: float, generator: torch.Tensor) -> None:
        with atomic_path(self.path(k)) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, seconds=seconds, generator=generator.numpy())


@dataclass
class Generated:
    samples: SampleSet
    seconds: float
    nfe: int  # network evaluations per sample


def sample_in_batches(
    denoiser: Denoiser,
    sampler: str | Sampler,
    steps: int,
    noise: torch.Tensor,
    condition,
    to_images,
    gen: torch.Generator,
    batch_size: int,
    cfg_scale: float,
    progress: bool,
    shards: Shards | None = None,
) -> tuple[np.ndarray, float]:
    """Run ``sampler`` (a name in diffusion.SAMPLERS, or a sampler function) over ``noise`` in batches:
    ``condition(i, j)`` gives the batch's condition, ``to_images`` turns its output into uint8 images. Returns
    the images and the seconds taken. With ``shards``, each batch is a shard: a finished one is read back (and
    ``gen`` set to its state after it), a new one saved."""
    check_positive(steps, "steps")
    sample_fn = sampler if callable(sampler) else get_sampler(sampler)
    name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "sampler")
    device = denoiser.device
    out, seconds = [], 0.0
    batches = range(0, len(noise), batch_size)
    for k, i in enumerate(tqdm(batches, desc=f"{name} {steps} steps", leave=False, disable=not progress)):
        done = shards.load(k) if shards is not None else None
        if done is not None:
            images, took, state = done
            gen.set_state(state)
        else:
            start, j = time.perf_counter(), i + batch_size
            z = noise[i:j].to(device)
            images = to_images(sample_fn(denoiser, z, condition(i, j).to(device), steps, cfg_scale, gen))
            took = time.perf_counter() - start
            if shards is not None:
                shards.save(k, images, took, gen.get_state())
        out.append(images)
        seconds += took
    return np.concatenate(out), seconds


def nfe_per_sample(steps: int, cfg_scale: float) -> int:
    return steps * (2 if cfg_scale != 1.0 else 1)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    sampler: str | Sampler,
    steps: int,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 500,
    cfg_scale: float = 1.0,
    progress: bool = True,
    shards: Shards | None = None,
) -> Generated:
    """Balanced-class samples from fixed-seed noise; the same seed gives the same noise at every step count."""
    check_positive(steps, "steps")
    check_positive(num_samples, "num_samples")
    labels = balanced_labels(num_samples)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, 1, 28, 28), generator=gen)
    images, seconds = sample_in_batches(
        denoiser,
        sampler,
        steps,
        noise,
        lambda i, j: labels[i:j],
        to_uint8,
        gen,
        batch_size,
        cfg_scale,
        progress,
        shards,
    )
    return Generated(SampleSet(images, labels.numpy()), seconds, nfe_per_sample(steps, cfg_scale))


def is_stable_diffusion(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


@torch.no_grad()
def generate_text(
    sd,
    denoiser: Denoiser,
    sampler: str,
    steps: int,
    prompts: list[str],
    ids: np.ndarray,
    seed: int = 0,
    batch_size: int = 16,
    cfg_scale: float = 1.0,
    resolution: int = 512,
    progress: bool = True,
    shards: Shards | None = None,
) -> Generated:
    """Text-to-image samples of a Stable Diffusion model (latent space, then decoded): one per prompt,
    fixed-seed latent noise, so every step count starts from the same noise."""
    from add_bench.networks.sd import pixels_to_uint8

    check_positive(steps, "steps")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *sd.latent_shape(resolution)), generator=gen)
    images, seconds = sample_in_batches(
        denoiser,
        sampler,
        steps,
        noise,
        lambda i, j: sd.encode_prompts(prompts[i:j]),
        lambda z: pixels_to_uint8(sd.to_pixels(z)),
        gen,
        batch_size,
        cfg_scale,
        progress,
        shards,
    )
    return Generated(SampleSet(images, ids, list(prompts)), seconds, nfe_per_sample(steps, cfg_scale))


def load_generator(
    checkpoint: str | Path, cfg: EvalConfig, cfg_scale: float, device: str = "auto", shards: str | Path | None = None
):
    """(kind, make) where make(sampler, steps) → Generated: a class-conditional weights folder
    (embedded) or a Stable Diffusion folder prompted with COCO captions (cluster), sampled on
    ``device`` (auto: a GPU if one is visible); the noise is drawn on the CPU either way. ``shards``: a
    folder that keeps the samples of each (sampler, steps) in resumable shards (:class:`Shards`)."""
    from add_bench.distributed import processes, resolve_device
    from add_bench.provenance import weights_versions

    dev = resolve_device(device, processes().local_rank)
    folder = resolve_weights(checkpoint)

    def store(sampler: str, steps: int, **more: Any) -> Shards | None:
        if shards is None:
            return None
        spec = {
            "checkpoint": str(folder.resolve()),
            "weights": weights_versions({"generator": folder}).get("generator", {}).get("blob"),
            "sampler": sampler,
            "steps": steps,
            "cfg_scale": cfg_scale,
            "num_samples": cfg.num_samples,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            **more,
        }
        return Shards(Path(shards) / f"{sampler}_{steps}steps_cfg{cfg_scale:g}", spec)

    if is_stable_diffusion(folder):
        from add_bench.data.coco import eval_set
        from add_bench.networks.sd import load_stable_diffusion

        if cfg.metrics != "cluster":
            raise ConfigError(
                f"{folder}: a Stable Diffusion model is scored with metrics=cluster (Inception FID, "
                f"CLIP score on COCO captions); got metrics={cfg.metrics!r}"
            )
        sd = load_stable_diffusion(folder).to(dev)
        kind = read_card(folder).get("kind", "student") if (folder / "card.json").is_file() else "teacher"
        coco, pick = eval_set(cfg)
        prompts, ids = [coco.captions[i] for i in pick], coco.image_ids[pick]
        denoiser = sd.denoiser().to(dev)  # ∅ encoded once, for every step count
        return kind, lambda sampler, s: generate_text(
            sd,
            denoiser,
            sampler,
            s,
            prompts,
            ids,
            cfg.seed,
            cfg.batch_size,
            cfg_scale,
            cfg.coco.resolution,
            shards=store(sampler, s, coco_split=cfg.coco.split, resolution=cfg.coco.resolution),
        )
    denoiser, card = load_denoiser(folder)
    denoiser.to(dev)
    return card["kind"], lambda sampler, s: generate(
        denoiser, sampler, s, cfg.num_samples, cfg.seed, cfg.batch_size, cfg_scale, shards=store(sampler, s)
    )


def export_samples(path: str | Path, samples: SampleSet) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=samples.images, labels=samples.labels.astype(np.int64))


def default_sampler(kind: str) -> str:
    """A teacher is sampled with DDIM, a student with the ADD multi-step sampler."""
    return "ddim" if kind == "teacher" else "add"


def evaluate(
    checkpoint: str | Path,
    steps: list[int],
    cfg: EvalConfig,
    sampler: str | None = None,
    cfg_scale: float = 1.0,
    export: str | Path | None = None,
    suite=None,
    device: str = "auto",
    shards: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``checkpoint`` at each step count; ``shards``: a folder keeping the samples in resumable shards."""
    for s in steps:
        check_positive(s, "steps")
    if suite is None:  # first: missing metric weights fail before sampling
        from add_bench.distributed import processes, resolve_device

        suite = build_suite(cfg, resolve_device(device, processes().local_rank))
    kind, make = load_generator(checkpoint, cfg, cfg_scale, device, shards)
    sampler = sampler or default_sampler(kind)
    rows = []
    for s in steps:
        g = make(sampler, s)
        row = {
            "steps": s,
            "sampler": sampler,
            "cfg_scale": cfg_scale,
            "nfe": g.nfe,
            "sec_per_1000": round(1000 * g.seconds / cfg.num_samples, 3),
            **score(suite, g.samples),
        }
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), file=sys.stderr)
        if export:
            path = Path(export)
            export_samples(path if len(steps) == 1 else path.with_name(f"{path.stem}_{s}steps{path.suffix}"), g.samples)
    return {
        "checkpoint": str(checkpoint),
        "kind": kind,
        "num_samples": cfg.num_samples,
        "rows": rows,
        "metric_features": metric_features(suite),
    }


@command_line(ValueError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="weights folder or shipped name (e.g. teacher_small)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--sampler", choices=sorted(SAMPLERS), default=None, help="default: ddim for a teacher, add for a student"
    )
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--out", help="metrics JSON path (default: <checkpoint>/metrics.json)")
    p.add_argument("--export-samples", metavar="PATH.npz")
    p.add_argument("--device", default="auto", help="auto (a GPU if visible, else the CPU) | cpu | cuda | cuda:N")
    p.add_argument(
        "--shards",
        metavar="DIR",
        help="make the samples in shards of eval.batch_size saved to DIR; a re-run skips finished shards",
    )
    p.add_argument("overrides", nargs="*", help="EvalConfig overrides key=value (num_samples=1000, seed=1, ...)")
    add_cfg_option(p)
    a = p.parse_intermixed_args(argv)  # key=value overrides may follow the options
    cfg = load(EvalConfig, overrides=a.overrides)
    if a.cfg:
        print_job(cfg)
        return 0
    start = time.time()
    result = evaluate(
        a.checkpoint, a.steps, cfg, a.sampler, a.cfg_scale, a.export_samples, device=a.device, shards=a.shards
    )
    result["provenance"] = provenance(
        cfg, cfg.seed, time.time() - start, command=" ".join(["python -m add_bench.evaluate", *sys.argv[1:]])
    )
    out = Path(a.out) if a.out else resolve_weights(a.checkpoint) / "metrics.json"
    atomic_write_json(out, result)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
