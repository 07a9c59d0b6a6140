"""Data-parallel ADD over processes (add_bench.distributed), for real: two CPU processes joined by gloo,
as torchrun or SLURM tasks would start them on GPUs (NCCL). Tiny embedded cells."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from add_bench import checkpoint, distributed
from add_bench.errors import ConfigError

TINY = [
    "steps=4",
    "batch_size=8",
    "ckpt_every=2",
    "log_every=1",
    "threads=1",
    "device=cpu",
    "optim.warmup_steps=1",
    "feature_network.name=random",
    "discriminator.c_img_network=random",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, world: int, port: int, target: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        globals()[target](rank, *args)
    finally:
        distributed.finish()


def run_processes(target: str, *args, world: int = 2) -> None:
    mp.start_processes(_process, args=(world, free_port(), target, args), nprocs=world, start_method="spawn")


def _grads(rank: int, out: str) -> None:
    """Each process: the gradient of its half of a batch, averaged over the processes."""
    distributed.init(torch.device("cpu"))
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    net(x.chunk(2)[rank]).pow(2).mean().backward()
    distributed.average_gradients(net)
    torch.save([p.grad for p in net.parameters()], Path(out) / f"grad{rank}.pt")


def test_averaged_gradients_equal_the_full_batch_gradient(tmp_path):
    run_processes("_grads", str(tmp_path))
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    net(x).pow(2).mean().backward()
    for rank in (0, 1):
        for got, want in zip(torch.load(tmp_path / f"grad{rank}.pt"), [p.grad for p in net.parameters()]):
            torch.testing.assert_close(got, want)


def _train(rank: int, workdir: str, overrides: list[str], budget: float, faulty: bool) -> None:
    from add_bench import train as train_mod
    from add_bench.config import TrainConfig, load

    if faulty and rank == 1:  # a faulty process: its averaged gradients come out slightly wrong
        average = distributed.average_gradients

        def wrong(module):
            average(module)  # still joins every all-reduce, so nothing hangs
            for q in module.parameters():
                if q.grad is not None:
                    q.grad.add_(1e-3)

        distributed.average_gradients = wrong
    cfg = load(TrainConfig, overrides=overrides)
    try:
        train_mod.train(cfg, Path(workdir), budget_minutes=budget, progress=False)
    except Exception as e:  # noqa: BLE001 - reported to the test through a file
        (Path(workdir) / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}")


def test_two_processes_train_in_sync_resume_exactly_and_one_writes(tmp_path):
    run_processes("_train", str(tmp_path / "full"), TINY, 0, False)
    assert not list((tmp_path / "full").glob("error*.txt"))
    state = checkpoint.load(tmp_path / "full")
    assert state["step"] == 4 and "generators" not in state["extra"]  # one stream, the same in every process
    rows = [json.loads(r) for r in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: each step logged once
    # the per-term gradient norms are of the averaged gradient, the same in every process
    assert all(r["grad_ratio_adv_distill"] == r["grad_norm_student_adv"] / r["grad_norm_student_distill"] for r in rows)
    assert (tmp_path / "full" / "student" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # interrupted after its first checkpoint (a budget that ends at once), then resumed: the same run
    run_processes("_train", str(tmp_path / "part"), TINY, 1e-9, False)
    assert checkpoint.load(tmp_path / "part")["step"] == 1
    run_processes("_train", str(tmp_path / "part"), TINY, 0, False)
    a, b = state, checkpoint.load(tmp_path / "part")
    for obj in ("student", "ema", "discriminator"):
        for k, v in a["objects"][obj].items():
            assert torch.equal(v, b["objects"][obj][k]), (obj, k)

    # a checkpoint of an older version (one stream per process) resumes only with as many processes
    from add_bench import train as train_mod
    from add_bench.config import TrainConfig, load
    from add_bench.errors import CheckpointError

    old = checkpoint.load(tmp_path / "part")
    old["extra"]["generators"] = [old["generator"], old["generator"]]
    torch.save(old, tmp_path / "part" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) with one random stream each"):
        train_mod.train(load(TrainConfig, overrides=TINY + ["steps=6"]), tmp_path / "part", progress=False)
    assert checkpoint.load(tmp_path / "part")["step"] == 4


def test_processes_out_of_sync_are_caught(tmp_path):
    run_processes("_train", str(tmp_path), TINY, 0, True)
    errors = sorted(p.read_text() for p in tmp_path.glob("error*.txt"))
    assert errors and all("TrainingDiverged: step 2: the processes' student" in e for e in errors), errors
    assert not (tmp_path / "student").exists()


def test_batch_must_split_and_devices_are_checked(monkeypatch):
    from types import SimpleNamespace

    with pytest.raises(ConfigError, match=r"batch_size=10 \(the global batch\) does not split over 4 processes"):
        distributed.local_batch(SimpleNamespace(batch_size=10), distributed.Processes(0, 4, 0))
    assert distributed.local_batch(SimpleNamespace(batch_size=12), distributed.Processes(1, 4, 1)) == 3
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='cuda:1': no CUDA device is visible here; accepted: auto, cpu"):
        distributed.resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"device='tpu': unknown; accepted: auto, cpu, cuda, cuda:N"):
        distributed.resolve_device("tpu")


def sweep_cell_as(tmp_path: Path, assets: dict, monkeypatch, runs: dict[str, tuple[int, list[str]]], **preset):
    """A one-row ablation on the tiny preset run through the sweep's own local launch path, once per entry of
    ``runs`` (name → (--procs-per-cell, overrides)); name → the cell's folder."""
    from test_sweep import ablation_file, tiny_preset

    from add_bench import metrics, sweep

    monkeypatch.setenv("ADD_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "cache" / "fid_stats")
    abl = ablation_file(tmp_path, tiny_preset(assets, tmp_path, **preset), cells=[{"name": "exp", "default": True}])
    folders = {}
    for name, (procs, overrides) in runs.items():
        out = tmp_path / name
        assert sweep.main([str(abl), *overrides, "--out", str(out), "--procs-per-cell", str(procs)]) == 0
        (cell,) = sweep.load_ablations(abl, overrides)[0].cells
        folders[name] = out / "cells" / cell.id
    return folders


def assert_same_cell(one: Path, two: Path, steps: int, batch: int) -> None:
    """Two runs of a cell trained the same: losses and final weights within float tolerance, the same random
    stream, the discriminator computing the same logits; ``two`` logged each step once and was evaluated."""
    rows = [[json.loads(r) for r in (wd / "log.jsonl").read_text().splitlines()] for wd in (one, two)]
    assert [r["step"] for r in rows[1]] == list(range(1, steps + 1))  # written once, by process 0
    for a, b in zip(*rows):
        for key in ("loss_g", "loss_g_adv", "loss_distill", "loss_d", "d_real", "d_fake", "grad_norm_student"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    a, b = checkpoint.load(one), checkpoint.load(two)
    assert torch.equal(a["generator"], b["generator"])  # the same draws, whatever the process count
    for obj in ("student", "ema"):
        for k, v in a["objects"][obj].items():
            torch.testing.assert_close(b["objects"][obj][k], v, rtol=1e-4, atol=1e-5)
    # the discriminator by what it computes: the conv biases in front of its BatchNormLocal get a gradient of
    # float noise (the normalisation removes them) that Adam scales to lr-sized steps, so they differ and
    # change nothing
    from add_bench import train as train_mod
    from add_bench.config import TrainConfig, load

    nets = train_mod.build_networks(load(TrainConfig, one / "config.yaml"))
    x = torch.rand((batch, 1, 28, 28), generator=torch.Generator().manual_seed(3)) * 2 - 1
    labels = torch.arange(batch) % 10
    c_text, c_img = train_mod.conditioning(nets, x, labels)
    logits = []
    for state in (a, b):
        nets.discriminator.load_state_dict(state["objects"]["discriminator"])
        with torch.no_grad():
            logits.append(nets.discriminator(nets.feature_network(x), c_text, c_img))
    for got, want in zip(*logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert json.loads((two / "metrics.json").read_text())["rows"]  # evaluated by process 0


def test_a_sweep_cell_run_as_two_processes_equals_one_process(tiny_assets, tmp_path, monkeypatch):
    """The sweep's own local launch path (--procs-per-cell 2: two gloo processes per cell) trains the cell
    the one-process sweep trains: batch_size is the global batch and every process draws all of it from the
    cell's seed, keeping its half. Losses and final weights agree within float tolerance; one process writes."""
    # 16 = two local batches of 8: the discriminator's BatchNormLocal groups of 8 fall within one process
    cells = sweep_cell_as(tmp_path, tiny_assets, monkeypatch, {"p1": (1, []), "p2": (2, [])}, batch_size=16, steps=3)
    assert cells["p1"].name == cells["p2"].name  # one cell: the process count is not part of its id
    assert_same_cell(cells["p1"], cells["p2"], steps=3, batch=16)


def test_two_processes_with_micro_batches_equal_one_process_without(tiny_assets, tmp_path, monkeypatch):
    """Data parallelism and gradient accumulation together: 2 gloo processes, each splitting its 16 of the global
    batch of 32 into 2 micro-batches of 8 (BatchNormLocal's groups), train the cell one process trains on the
    whole batch at once, within float tolerance."""
    runs = {"whole": (1, ["micro_batch_size=0"]), "micro": (2, ["micro_batch_size=8"])}
    cells = sweep_cell_as(tmp_path, tiny_assets, monkeypatch, runs, batch_size=32, steps=2)
    assert_same_cell(cells["whole"], cells["micro"], steps=2, batch=32)


def test_a_global_batch_that_does_not_split_stops_the_sweep_before_anything_runs(
    tiny_assets, tmp_path, capsys, monkeypatch
):
    """A global batch, or micro-batches, that do not split over a cell's processes: an error naming the cell, the
    values and what is accepted, before anything is prepared, run or submitted."""
    import re

    from test_launchers import fake_slurm_commands
    from test_sweep import ablation_file, tiny_preset

    from add_bench import sweep

    abl = ablation_file(tmp_path, tiny_preset(tiny_assets, tmp_path, batch_size=16))
    out = tmp_path / "out"
    for extra, message in (
        (
            ["--procs-per-cell", "3"],
            r"error: --procs-per-cell 3: cell \w+ \(mini/exp seed 0\): batch_size=16 \(the global batch\) does not "
            r"split over 3 processes; accepted: a multiple of 3",
        ),
        (["--procs-per-cell", "3", "--dry-run"], r"batch_size=16 \(the global batch\) does not split over 3"),
        (["--procs-per-cell", "2", "--workers", "2"], r"--workers 2 with --procs-per-cell 2: .* accepted: --workers 1"),
        (["--procs-per-cell", "2", "--launcher", "slurm"], r"--procs-per-cell 2: accepted: .* --slurm tasks_per_node"),
    ):
        assert sweep.main([str(abl), "--out", str(out), *extra]) == 2
        assert re.search(message, capsys.readouterr().err), extra
        assert not (out / "cells").exists()  # nothing prepared, nothing trained
    # micro-batches that divide the global batch (checked when the cell is loaded) but not each process's share
    micro = ablation_file(tmp_path, tiny_preset(tiny_assets, tmp_path, batch_size=24, micro_batch_size=8), "micro")
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "tiny_preset.yaml").write_text("slurm: {gpus_per_node: 2, tasks_per_node: 2}")
    scripts = fake_slurm_commands(tmp_path, monkeypatch)
    message = (
        r"cell \w+ \(micro/exp seed 0\), 2 processes: micro_batch_size=8 does not divide batch_size=24 \(12 per "
        r"process\): accepted: 0 \(the whole batch\) or a divisor of 12 \(1, 2, 3, 4, 6\), or another process count"
    )
    for extra, where in (
        (["--procs-per-cell", "2"], "--procs-per-cell 2: "),
        (["--procs-per-cell", "2", "--dry-run"], "--procs-per-cell 2: "),
        (["--launcher", "slurm"], r"launch profile \S+/launch/tiny_preset.yaml: "),
    ):
        assert sweep.main([str(micro), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(where + message, err), (extra, err)
        assert not (out / "cells").exists() and not list(scripts.iterdir())  # nothing prepared, run or submitted
    ablations = sweep.load_ablations(micro)
    for procs in (1, 3, 4):  # 24, 8 (micro-batches of 8) or 6 (one micro-batch of 6) per process
        sweep.check_splits(ablations, out, None, "local", {}, procs)
    teacher_only = ablation_file(tmp_path, tiny_preset(tiny_assets, tmp_path), cells=[{"name": "exp", "default": True}])
    with pytest.raises(ConfigError, match=r"--procs-per-cell 2: cell \w+ \(mini/exp seed 0\): method='teacher' with 2"):
        sweep.check_splits(sweep.load_ablations(teacher_only, ["method=teacher"]), out, None, "local", {}, 2)
