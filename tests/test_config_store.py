"""The schema and the presets in Hydra's ConfigStore: ``hydra.compose`` gives the configs the sweep runs."""

from pathlib import Path

import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

from add_bench import sweep
from add_bench.config import PRESETS_DIR, PRIMARY_NODE, config_store, preset
from add_bench.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CLUSTER_ENV = ("ADD_BENCH_SD21", "ADD_BENCH_COCO", "ADD_BENCH_DINOV2_S", "ADD_BENCH_DINOV2_L", "ADD_BENCH_CLIP_L")
CLUSTER_ENV += ("ADD_BENCH_INCEPTION", "ADD_BENCH_CLIP", "ADD_BENCH_SDXL")


def composed(overrides: list[str]):
    config_store()
    with initialize(version_base=None, config_path=None):
        return compose(config_name=PRIMARY_NODE, overrides=overrides)


def test_the_base_group_holds_every_preset_file():
    assert config_store().list("base") == sorted(p.name for p in PRESETS_DIR.glob("*.yaml"))
    assert OmegaConf.to_container(preset("sd21")) == OmegaConf.to_container(OmegaConf.load(PRESETS_DIR / "sd21.yaml"))
    with pytest.raises(ConfigError, match=r"base='sd15': unknown; accepted: embedded, sd21, sdxl"):
        preset("sd15")
    assert OmegaConf.to_container(composed([])) == OmegaConf.to_container(composed(["base=embedded"]))


@pytest.mark.parametrize("base", ["embedded", "sd21", "sdxl"])
def test_hydra_compose_gives_the_sweeps_cell(base, monkeypatch):
    """The sds row of loss_weighting.yaml with two overrides on each preset: the same values, the same cell id."""
    for var in CLUSTER_ENV:
        monkeypatch.setenv(var, f"/models/{var.lower()}")
    overrides = ["steps=500", "discriminator.augment='color,cutout'"]
    ablation = sweep.load_ablations(REPO / "ablations" / "loss_weighting.yaml", [f"base={base}", *overrides])[0]
    cell = next(c for c in ablation.cells if c.name == "sds")
    cfg = composed([f"base={base}", "loss.weighting=sds", *overrides])
    assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(cell.config)
    assert sweep.cell_id(cfg) == cell.id
    assert cfg.steps == 500 and cfg.discriminator.augment == "color,cutout"


def test_launch_profiles_are_the_launch_group(monkeypatch):
    """compose(launch=sd21) gives the request and results root the sweep reads for a sweep on sd21."""
    from add_bench.config import LAUNCH_NODE
    from add_bench.launchers import SlurmConfig

    monkeypatch.setenv("ADD_BENCH_RUNS", "/scratch/add")
    assert config_store().list("launch") == ["default.yaml", "sd21.yaml", "sdxl.yaml"]
    config_store()
    with initialize(version_base=None, config_path=None):
        sd21 = compose(config_name=LAUNCH_NODE, overrides=["launch=sd21", "slurm.partition=a100"])
        default = compose(config_name=LAUNCH_NODE)
    launch = sweep.launch_profile(PRESETS_DIR / "sd21.yaml", ["partition=a100"])
    assert OmegaConf.to_container(sd21.slurm, resolve=True) == OmegaConf.to_container(
        OmegaConf.structured(launch.slurm)
    )
    assert Path(sd21.runs) / "sweeps" == launch.results_root() == Path("/scratch/add/sweeps")
    assert sd21.slurm.gpus_per_node == 1 and default.slurm == OmegaConf.structured(SlurmConfig())


def test_the_sdxl_preset_distils_sdxl_into_sdxl_in_micro_batches(monkeypatch):
    """ADD-XL: student and teacher the SDXL folder, at 512 px, 16 micro-batches of 2, bf16 and checkpointing,
    under its own launch profile (a GPU, more memory and time than sd21's)."""
    for var in CLUSTER_ENV + ("ADD_BENCH_RUNS",):
        monkeypatch.setenv(var, f"/models/{var.lower()}")
    ablation = sweep.load_ablations(REPO / "ablations" / "loss_weighting.yaml", ["base=sdxl"])[0]
    cfg = next(c for c in ablation.cells if c.default).config
    assert cfg.student.network == cfg.teacher.network == "/models/add_bench_sdxl"
    assert (cfg.coco.resolution, cfg.batch_size, cfg.micro_batch_size) == (512, 32, 2)
    assert cfg.precision == "bf16" and cfg.gradient_checkpointing
    sdxl, sd21 = (sweep.launch_profile(PRESETS_DIR / f"{name}.yaml") for name in ("sdxl", "sd21"))
    assert sdxl.gpu and sdxl.slurm.gpus_per_node >= 1
    assert sdxl.slurm.mem_gb > sd21.slurm.mem_gb and sdxl.slurm.timeout_min > sd21.slurm.timeout_min


def test_the_structured_schema_resets_with_tilde_and_refuses_plus():
    """``~key`` resets a key (a leaf, a sub-config) to the schema default, an entry of a mapping field to absent;
    ``+key`` is refused naming the key: it exists already, it is a mapping's entry (set it), or it is unknown."""
    from add_bench.config import TrainConfig, load
    from add_bench.launchers import slurm_request

    cfg = load(TrainConfig, overrides=["steps=5", "loss.weighting=sds", "~loss", "~steps=7"])
    assert (cfg.steps, cfg.loss.weighting) == (600, "exp")  # ~key=value: the value is not compared
    flags = {"additional_parameters": {"account": "abc", "qos": "high"}}
    assert slurm_request(flags, ["~additional_parameters.account"]).additional_parameters == {"qos": "high"}
    for override, message in (
        ("+steps=3", r"\+steps adds a key; every key of TrainConfig is in its schema already .* set it with steps="),
        ("+loss.bogus=1", r"TrainConfig has no key 'loss.bogus' .*; accepted keys under loss: adversarial, "),
        ("~bogus", r"no key 'bogus' to reset"),
    ):
        with pytest.raises(ConfigError, match=message):
            load(TrainConfig, overrides=[override])
    with pytest.raises(ConfigError, match=r"additional_parameters is a mapping whose entries are set without '\+'"):
        slurm_request({}, ["+additional_parameters.account=abc"])
