"""A fake sweep results root with known numbers, in the exact layout ``add_bench.sweep`` writes.

``methods``: the default cell as two rows at 1 and 4 steps (the Table 2 layout), tables written.
``loss_weighting``: 3 cells × 2 seeds: ``exp`` (default) finished on both seeds (FID 10 / 12 at 1 step),
``sds`` pending (no result files), ``nfsd`` failed (error.json). ``teacher_steps``: 3 cells × 1 seed, all
finished, so rankings can be compared with the paper. Plus ``teacher/table.csv`` and samples.npz files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STEPS = (1, 2, 4)
# (ablation, cell, seed) → FID and align_prob at 1, 2, 4 steps
FINISHED = {
    ("loss_weighting", "exp", 0): ((10.0, 9.0, 8.0), (0.80, 0.82, 0.84)),
    ("loss_weighting", "exp", 1): ((12.0, 11.0, 9.0), (0.84, 0.86, 0.86)),
    ("teacher_steps", "k1", 0): ((10.0, 9.0, 8.0), (0.80, 0.82, 0.84)),
    ("teacher_steps", "k2", 0): ((11.0, 10.0, 9.5), (0.81, 0.83, 0.83)),
    ("teacher_steps", "k4", 0): ((9.0, 8.5, 8.0), (0.79, 0.80, 0.81)),
}
FAILED = {("loss_weighting", "nfsd"): "ValueError: NaN in the teacher target | boom"}
MANIFESTS = {
    "loss_weighting": (
        "1d",
        "Distillation weighting c(t)",
        [
            ("exp", "L_adv + λ·L_distill,exp", True, {"fid": 20.6, "cs": 0.319}),
            ("sds", "L_adv + λ·L_distill,sds", False, {"fid": 22.3, "cs": 0.325}),
            ("nfsd", "L_adv + λ·L_distill,nfsd", False, {"fid": 21.8, "cs": 0.327}),
        ],
        (0, 1),
    ),
    "teacher_steps": (
        "1f",
        "Teacher steps",
        [
            ("k1", "1", True, {"fid": 20.6, "cs": 0.319}),
            ("k2", "2", False, {"fid": 20.8, "cs": 0.321}),
            ("k4", "4", False, None),
        ],
        (0,),
    ),
}
TEACHER_CSV = """model,params,steps,cfg_scale,nfe,fid,fid_over_floor,align_prob,align_acc,sec_per_1000
real data (train split),,0,—,0,1.5,1,0.95,0.97,
teacher_small,1000000,1,1,1,80.0,53.3,0.3,0.35,2.0
teacher_small,1000000,4,1,4,20.0,13.3,0.7,0.75,8.0
teacher_small,1000000,50,1,50,5.0,3.33,0.9,0.92,100.0
teacher_small,1000000,4,3,8,15.0,10,0.85,0.88,16.0
teacher_small,1000000,50,3,100,4.0,2.67,0.95,0.96,200.0
"""


def cell_id(ablation: str, name: str, seed: int) -> str:
    # the default cell is shared between ablations, as in the real sweep
    return f"default_s{seed}" if name in ("exp", "k1") else f"{ablation[:4]}_{name}_s{seed}"


def metrics(cid: str, seed: int, fids, aligns, alignment_key: str) -> dict:
    rows = [
        {
            "steps": s,
            "sampler": "add",
            "cfg_scale": 1.0,
            "nfe": s,
            "sec_per_1000": 3.2 * s,
            "fid": f,
            alignment_key: a,
            "align_acc": a + 0.05,
        }
        for s, f, a in zip(STEPS, fids, aligns)
    ]
    return {
        "cell": cid,
        "kind": "student",
        "num_samples": 5000,
        "rows": rows,
        "train": {"steps": 1000, "wall_time_s": 540.0},
        "provenance": {
            "git_commit": "abc123",
            "seed": seed,
            "wall_time_s": 600.1,
            "machine": {"hostname": "testhost", "device": "cpu", "cpu_count": 2},
            "config": {},
        },
    }


def samples(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), 10)
    return {"labels": labels, **{f"steps_{s}": rng.integers(0, 256, (100, 28, 28), dtype=np.uint8) for s in STEPS}}


def make_fake_sweep(root: Path, alignment_key: str = "align_prob") -> Path:
    """Write the fake results root and return it."""
    for ablation, (table, title, cells, seeds) in MANIFESTS.items():
        entries = []
        for name, label, default, paper in cells:
            for seed in seeds:
                cid = cell_id(ablation, name, seed)
                entries.append(
                    {"name": name, "label": label, "default": default, "seed": seed, "id": cid, "paper": paper}
                )
                folder = root / "cells" / cid
                folder.mkdir(parents=True, exist_ok=True)
                if (ablation, name, seed) in FINISHED:
                    fids, aligns = FINISHED[(ablation, name, seed)]
                    (folder / "metrics.json").write_text(json.dumps(metrics(cid, seed, fids, aligns, alignment_key)))
                    np.savez_compressed(folder / "samples.npz", **samples(seed))
                elif (ablation, name) in FAILED:
                    (folder / "error.json").write_text(
                        json.dumps(
                            {"cell": cid, "error": FAILED[(ablation, name)], "traceback": "Traceback ...\nValueError"}
                        )
                    )
        (root / ablation).mkdir(parents=True, exist_ok=True)
        (root / ablation / "cells.json").write_text(
            json.dumps(
                {
                    "ablation": ablation,
                    "table": table,
                    "title": title,
                    "paper_metric_names": {"fid": "FID", "cs": "CLIP score"},
                    "eval_steps": list(STEPS),
                    "cells": entries,
                }
            )
        )
    # a method comparison (Table 2 layout): rows at their own step counts, here the default cell at 1 and 4
    (root / "methods").mkdir(parents=True, exist_ok=True)
    (root / "methods" / "cells.json").write_text(
        json.dumps(
            {
                "ablation": "methods",
                "table": "2",
                "title": "Methods",
                "eval_steps": list(STEPS),
                "paper_note": "The paper's numbers are SD1.5-based methods (Table 2).",
                "cells": [
                    {
                        "name": "add1",
                        "label": "ADD",
                        "default": True,
                        "seed": 0,
                        "id": "default_s0",
                        "steps": 1,
                        "paper": {"fid": 19.7, "cs": 0.326, "time": 0.09},
                    },
                    {
                        "name": "add4",
                        "label": "ADD",
                        "default": False,
                        "seed": 0,
                        "id": "default_s0",
                        "steps": 4,
                        "paper": None,
                    },
                ],
            }
        )
    )
    from add_bench.tables import write_tables

    write_tables(root / "methods")
    (root / "teacher").mkdir(parents=True, exist_ok=True)
    (root / "teacher" / "table.csv").write_text(TEACHER_CSV)
    return root
