"""End-to-end training on DTU scan 24 at 200x150 with a small model: the loss falls, a resumed
run continues bit for bit, and run.py lays out its run folder."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import systems
from tests.conftest import ROOT, tiny_overrides
from utils.checkpoint import CHECKPOINT_VERSION
from systems.config import load_config
from utils.config import to_primitive
from utils.misc import seed_everything

CPU_CONFIG = os.path.join(ROOT, "confs", "neus-dtu-wmask-cpu.yaml")
SMALL = tiny_overrides(  # the suite's tiny config, larger for scan 24 at 200x150
    "dataset.img_downscale=8",
    "model.geometry.xyz_encoding.n_levels=8",
    "model.geometry.xyz_encoding.log2_hashmap_size=14",
    "model.cos_anneal_steps=20",  # not tied to max_steps, which the resume tests change
    "trainer.train_num_rays=256",
    "trainer.num_samples_per_step=4096",
    "trainer.test_at_end=false",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def build_system(dtu_root, trial_dir, *overrides):
    """As run.py does: load the config, seed, build the system named by system.name."""
    config = load_config(CPU_CONFIG, [f"dataset.root_dir={dtu_root}", *SMALL, *overrides])
    seed_everything(config.seed)
    return systems.Trainer(
        config, systems.RunPaths.for_trial(str(trial_dir)), torch.device("cpu")
    )


def run_steps(system, n):
    """What fit() does per step (without logging, validation, checkpoints) -> the losses."""
    return [system.step().stats["loss"] for _ in range(n)]


def test_short_training_run_lowers_the_loss(cached_scene, tmp_path):
    """60 steps (lr warm-up shortened to 10 steps): mean loss of the last 10 steps is well below
    that of the first 10 (about 0.28 -> 0.11 on scan 24)."""
    system = build_system(cached_scene, tmp_path, "system.scheduler.warmup_steps=10")
    inv_s_at_start = system.model.variance.inv_s().item()
    losses = run_steps(system, 60)
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)
    # the learned sharpness grew: the rendering concentrates on a surface (about 20.1 -> 24.0 with
    # the CPU config's L1 + MSE colour loss; an untrained variance would stay at 20.1)
    assert system.model.variance.inv_s().item() > 1.15 * inv_s_at_start, (inv_s_at_start, system.model.variance.inv_s())


RESUME = ["model.sampler.update_every=4", "model.sampler.warmup_steps=6", "system.scheduler.warmup_steps=5"]
N = 12  # grid updates at steps 0, 4 (warm-up: all cells), 8 | 12, 16, 20 (random cells)


def assert_same_state(a, b):
    """Model parameters and buffers (occupancy occs / binaries, band level), optimizer,
    scheduler and ray count are identical."""
    model_a, model_b = a.model.state_dict(), b.model.state_dict()
    assert model_a.keys() == model_b.keys()
    assert {"occupancy.estimator.occs", "occupancy.estimator.binaries",
            "geometry.encoding.table", "geometry.encoding.current_level"} <= set(model_a)
    for key in model_a:
        torch.testing.assert_close(model_a[key], model_b[key], rtol=0, atol=0, msg=key)
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 0
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][index][key], rtol=0, atol=0)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert a.global_step == b.global_step and a.train_num_rays == b.train_num_rays


def test_resume_continues_exactly(cached_scene, tmp_path):
    """2N steps straight == N steps, save, a fresh (re-seeded) system, load, N more steps."""
    straight = build_system(cached_scene, tmp_path / "straight", *RESUME)
    run_steps(straight, 2 * N)
    rng_straight = torch.get_rng_state()

    first = build_system(cached_scene, tmp_path / "split", *RESUME)
    run_steps(first, N)
    binaries_at_save = first.model.occupancy.binaries.clone()
    path = first.save()
    assert os.path.basename(path) == f"ckpt_{N:06d}.pth"
    del first

    resumed = build_system(cached_scene, tmp_path / "split", *RESUME)  # re-seeds, fresh weights
    resumed.load(path)
    assert resumed.global_step == N
    assert torch.equal(resumed.model.occupancy.binaries, binaries_at_save)
    run_steps(resumed, N)
    assert torch.equal(torch.get_rng_state(), rng_straight)
    assert_same_state(straight, resumed)
    # the grid changed in the second half, so its state after resume really was exercised
    assert not torch.equal(straight.model.occupancy.binaries, binaries_at_save)


def test_renders_after_reload_match(cached_scene, tmp_path):
    """A reloaded model renders exactly as the trained one did (the schedules' state, cos
    annealing and hash-grid level, comes back with it): what --test and --mesh rely on."""
    system = build_system(cached_scene, tmp_path, "model.cos_anneal_steps=40")
    run_steps(system, 8)
    assert 0 < system.model.cos_anneal_ratio.item() < 1
    rays = system.dataset.view_rays(0)
    pick = torch.arange(0, rays["rays_o"].shape[0], 97)
    rays = {k: v[pick] for k, v in rays.items()}
    before = system.task.evaluation.render_image(rays, 1, pick.shape[0])
    path = system.save()
    reloaded = build_system(cached_scene, tmp_path, "model.cos_anneal_steps=40")
    reloaded.load(path)
    after = reloaded.task.evaluation.render_image(rays, 1, pick.shape[0])
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)


def test_checkpoint_loads_weights_only(cached_scene, tmp_path):
    """A checkpoint holds only tensors and plain values: torch.load(weights_only=True) reads it,
    with step, model, optimizer, scheduler, rng, config and the ray count."""
    system = build_system(cached_scene, tmp_path, *RESUME)
    run_steps(system, 2)
    path = system.save()
    state = torch.load(path, weights_only=True)
    assert {"version", "step", "model", "optimizer", "scheduler", "rng", "config", "train_num_rays"} <= set(state)
    assert state["step"] == 2 and state["version"] == CHECKPOINT_VERSION
    assert state["train_num_rays"] == system.train_num_rays
    assert state["config"] == to_primitive(system.full_config)
    assert state["config"]["trainer"]["train_num_rays"] == 256
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    torch.testing.assert_close(state["model"]["geometry.encoding.table"], system.model.geometry.encoding.table.detach())
    assert state["scheduler"]["last_epoch"] == 2
    assert not glob.glob(os.path.join(system.paths.ckpt_dir, ".tmp-*"))  # atomic write left nothing


def run_py(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_run_py_end_to_end_and_resume(dtu_root, tmp_path):
    """run.py --train for 5 steps writes <outputs>/<name>/<trial>/ with the configs, a code
    snapshot, the final checkpoint, the log and TensorBoard events; --resume goes on to step 7
    in the same folder and ends with the state of a straight 7-step run."""
    outputs = tmp_path / "outputs"
    result = run_py(
        "--config", CPU_CONFIG, "--train", "--outputs_dir", str(outputs),
        f"dataset.root_dir={dtu_root}", *SMALL, "trainer.max_steps=5", "trainer.log_every=5", "trainer.ckpt_every=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = glob.glob(str(outputs / "neus-dtu-dtu_scan24" / "*"))
    assert len(trials) == 1 and os.path.basename(trials[0]).startswith("@")  # tag '' + '@' + time
    trial = trials[0]
    for rel in ("config/parsed.yaml", "config/raw.yaml", "code/run.py", "code/encoder/hashgrid.py",
                "code/confs/neus-dtu-wmask-cpu.yaml", "ckpt/ckpt_000005.pth", "train.log"):
        assert os.path.isfile(os.path.join(trial, rel)), rel
    # step 0 is saved first (a rollback target for the NaN guard), then the final step
    assert sorted(os.listdir(os.path.join(trial, "ckpt"))) == ["ckpt_000000.pth", "ckpt_000005.pth"]
    assert glob.glob(os.path.join(trial, "logs", "events.out.tfevents.*"))
    assert not glob.glob(os.path.join(trial, "code", "**", "__pycache__"), recursive=True)
    log_text = open(os.path.join(trial, "train.log")).read()
    assert "step 5/5" in log_text and "ckpt_000005.pth" in log_text
    parsed = OmegaConf.load(os.path.join(trial, "config", "parsed.yaml"))
    assert parsed.trainer.max_steps == 5 and parsed.dataset.img_downscale == 8
    assert parsed.system.scheduler.gamma == pytest.approx(0.1 ** (1.0 / (5 - 100)))  # decay_start 100 (the CPU config)
    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(trial, "config", "raw.yaml")), resolve=False)
    assert raw["system"]["scheduler"]["gamma"].startswith("${calc_exp_lr_decay_rate:")
    assert raw["trainer"]["max_steps"] == 5
    assert torch.load(os.path.join(trial, "ckpt", "ckpt_000005.pth"), weights_only=True)["step"] == 5
    # the parsed config is itself a loadable config that gives the same run
    assert to_primitive(load_config(os.path.join(trial, "config", "parsed.yaml"))) == to_primitive(parsed)

    # --resume continues in the same trial folder from step 5 to the new max_steps
    result = run_py(
        "--config", CPU_CONFIG, "--train", "--resume", os.path.join(trial, "ckpt", "ckpt_000005.pth"),
        f"dataset.root_dir={dtu_root}", *SMALL, "trainer.max_steps=7", "trainer.log_every=5", "trainer.ckpt_every=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert glob.glob(str(outputs / "neus-dtu-dtu_scan24" / "*")) == [trial]
    assert sorted(os.listdir(os.path.join(trial, "ckpt"))) == ["ckpt_000000.pth", "ckpt_000005.pth", "ckpt_000007.pth"]
    log_text = open(os.path.join(trial, "train.log")).read()
    assert "from checkpoint" in log_text and "training from step 5 to 7" in log_text and "step 7/7" in log_text
    resumed = torch.load(os.path.join(trial, "ckpt", "ckpt_000007.pth"), weights_only=True)
    assert resumed["step"] == 7

    # ... and ends where a straight 7-step run ends, bit for bit
    result = run_py(
        "--config", CPU_CONFIG, "--train", "--outputs_dir", str(tmp_path / "straight"),
        f"dataset.root_dir={dtu_root}", *SMALL, "trainer.max_steps=7", "trainer.log_every=5", "trainer.ckpt_every=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (straight_path,) = glob.glob(str(tmp_path / "straight" / "*" / "*" / "ckpt" / "ckpt_000007.pth"))
    straight = torch.load(straight_path, weights_only=True)
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(resumed["optimizer"]["state"], straight["optimizer"]["state"], rtol=0, atol=0)
    assert torch.equal(resumed["rng"]["torch"], straight["rng"]["torch"])


def test_run_py_rejects_a_misspelt_override(tmp_path):
    result = run_py("--config", CPU_CONFIG, "--train", "--outputs_dir", str(tmp_path), "trainer.max_step=5")
    assert result.returncode == 2
    assert "trainer.max_step" in result.stderr and "max_steps" in result.stderr and "val_every" in result.stderr
    assert not os.listdir(tmp_path)  # nothing written before the config is valid


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    """get_rng_state -> save_checkpoint -> load_checkpoint -> set_rng_state replays the same
    torch, numpy and python random streams (with a cached gaussian pending in python and numpy)."""
    import random

    from utils.checkpoint import load_checkpoint, save_checkpoint
    from utils.misc import get_rng_state, set_rng_state

    seed_everything(3)
    random.gauss(0.0, 1.0)  # leaves python's second gaussian cached
    np.random.standard_normal()  # and numpy's
    path = str(tmp_path / "rng.pth")
    save_checkpoint(path, {"rng": get_rng_state()})
    draws = (torch.rand(4), np.random.standard_normal(3), random.gauss(0.0, 1.0), random.random())
    seed_everything(99)
    set_rng_state(load_checkpoint(path)["rng"])
    again = (torch.rand(4), np.random.standard_normal(3), random.gauss(0.0, 1.0), random.random())
    assert torch.equal(draws[0], again[0])
    np.testing.assert_array_equal(draws[1], again[1])
    assert draws[2:] == again[2:]


def test_ray_budget_counts_background_samples():
    """16384 samples a step: 1000 rays with 8000 foreground samples buy 2048 rays next; with
    40000 background samples at 0.3 each the step cost 8000 + 12000 = 20000, so 819 rays;
    clamped to [64, max]."""
    from systems.trainer import TrainerConfig, next_ray_count

    config = TrainerConfig(num_samples_per_step=16384, background_sample_cost=0.3, max_train_num_rays=8192)
    assert next_ray_count(1000, 8000, config) == 2048
    assert next_ray_count(1000, 8000, config, n_bg_samples=40000) == 819
    assert next_ray_count(1000, 100, config) == 8192
    assert next_ray_count(1000, 8000, config, n_bg_samples=10**7) == 64
