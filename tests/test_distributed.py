"""Data-parallel training (torch.distributed, gloo on CPU, 2 processes): one step on 2 ranks
with B/2 rays each equals one step on 1 rank with the same B rays; after K steps every rank
holds the same parameters and occupancy grid; a torchrun run writes one run folder, stops
cleanly on SIGTERM and resumes in a single process (and the other way round)."""
import glob
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import models.occupancy
import systems.neus
from tests.conftest import ROOT
from process_data.synthetic import make_demo_scene
from tests.test_background import SMALL_BACKGROUND
from tests.test_reliability import CPU_CONFIG, TINY, build_system, poison
from utils import distributed as dist
from utils.checkpoint import load_checkpoint

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("one_thread")]
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
WORLD = 2
N_RAYS = 128  # the equivalence step's global batch: 64 rays per rank
K_STEPS = 12
POISONED_STEP = 5  # rank 1's loss is NaN at this step: both ranks must skip it
# the K-step run has a background model too: a second occupancy grid, more parameters for DDP
WITH_BACKGROUND = ["model.background.enabled=true", *SMALL_BACKGROUND, "system.loss.lambda_distortion_bg=0.01"]


@pytest.fixture(scope="module")
def scene_template(tmp_path_factory):
    """A 4-view 40x30 NeuS-format scene (image/, mask/, cameras_sphere.npz)."""
    return make_demo_scene(str(tmp_path_factory.mktemp("template") / "scene"), n_views=4, width=40, height=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch(system, n_rays):
    """The same n_rays rays on every rank (their own generator, not the ranks' streams)."""
    return system.dataset.sample_rays(n_rays, generator=torch.Generator().manual_seed(7))


def unstratified(monkeypatch):
    """March from the ray's entry point without jitter, so that samples depend on the rays alone."""
    sample = models.occupancy.OccupancyGrid.sample

    def fixed(self, rays_o, rays_d, step_size, stratified, **kwargs):
        return sample(self, rays_o, rays_d, step_size, False, **kwargs)

    monkeypatch.setattr(models.occupancy.OccupancyGrid, "sample", fixed)


def first_step(system, batch):
    """Step 0 as train_step takes it, on the given rays -> the parameters after it, and their
    gradients (compared too: Adam's first step is lr * sign(gradient), blind to its size)."""
    system.model.train()
    system.model.set_step(0)
    system.update_occupancy(0)
    stats = system.optimise(batch)
    assert stats["skipped"] == 0.0, stats
    named = dict(system.model.named_parameters())
    return {"parameters": {k: p.detach().clone() for k, p in named.items()},
            "gradients": {k: p.grad.clone() for k, p in named.items()},
            "loss": stats["loss"], "samples_per_ray": stats["samples_per_ray"]}


def continued(system, n_steps):
    """n_steps more steps from system.global_step -> the model state after them."""
    for _ in range(n_steps):
        system.train_step(system.global_step)
        system.global_step += 1
    return {k: v.clone() for k, v in system.model.state_dict().items()}


def worker(rank, port, scene, out_dir):
    """One rank: the equivalence step; K_STEPS of training; a checkpoint, 4 more steps, and the
    same 4 steps again after loading the checkpoint. Results to out_dir/rank<r>.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_from_env(torch.device("cpu"))
    monkeypatch = pytest.MonkeyPatch()
    try:
        unstratified(monkeypatch)
        system = build_system(scene, os.path.join(out_dir, "trial"))
        batch = {k: v[dist.rank_slice(N_RAYS)] for k, v in fixed_batch(system, N_RAYS).items()}
        equivalence = first_step(system, batch)
        monkeypatch.undo()

        system = build_system(scene, os.path.join(out_dir, "trial"), *WITH_BACKGROUND)
        torch.manual_seed(dist.rank_seed(system.full_config.seed, rank))
        poison(monkeypatch, {POISONED_STEP} if rank == 1 else set())
        first_rays = system.dataset.sample_rays(4)["rays_d"].clone()
        skipped = []
        for step in range(K_STEPS):
            skipped.append(system.train_step(step)["skipped"])
        state = {k: v.clone() for k, v in system.model.state_dict().items()}
        train_num_rays = system.train_num_rays

        system.global_step = K_STEPS
        checkpoint = system.save()
        straight = continued(system, 4)
        system.load(checkpoint)
        resumed = continued(system, 4)
        torch.save({"equivalence": equivalence, "first_rays": first_rays, "skipped": skipped, "state": state,
                    "train_num_rays": train_num_rays, "straight": straight, "resumed": resumed},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        monkeypatch.undo()
        dist.shutdown()


@pytest.fixture(scope="module")
def two_ranks(scene_template, tmp_path_factory):
    """Both ranks' results (see worker), from one spawn of 2 gloo processes."""
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    mp.start_processes(worker, args=(free_port(), scene_template, out_dir), nprocs=WORLD, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_one_step_on_two_ranks_equals_one_step_on_one(two_ranks, scene_template, tmp_path, monkeypatch):
    unstratified(monkeypatch)
    system = build_system(scene_template, tmp_path)
    single = first_step(system, fixed_batch(system, N_RAYS))
    worst = {"parameters": 0.0, "gradients": 0.0}
    for result in two_ranks:
        assert result["equivalence"]["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert result["equivalence"]["samples_per_ray"] == single["samples_per_ray"]
        for what in worst:
            for key, value in single[what].items():
                torch.testing.assert_close(result["equivalence"][what][key], value, msg=f"{what} {key}")
                worst[what] = max(worst[what], (result["equivalence"][what][key] - value).abs().max().item())
    print(f"one step, 1 rank x {N_RAYS} rays vs {WORLD} ranks x {N_RAYS // WORLD}: max |difference| "
          f"parameters {worst['parameters']:.3g}, gradients {worst['gradients']:.3g}")


def test_ranks_agree_after_k_steps(two_ranks):
    a, b = two_ranks
    assert not torch.equal(a["first_rays"], b["first_rays"]), "the ranks drew the same rays"
    assert a["skipped"] == b["skipped"] and a["skipped"][POISONED_STEP] == 1.0 and sum(a["skipped"]) == 1.0
    assert a["train_num_rays"] == b["train_num_rays"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:  # parameters, occupancy grid (occs, binaries), schedules
        torch.testing.assert_close(a["state"][key], b["state"][key], rtol=0, atol=0, msg=key)
    assert a["state"]["occupancy.estimator.binaries"].any() and a["state"]["background.estimator.binaries"].any()


def test_a_resumed_two_rank_run_continues_exactly(two_ranks):
    """Same world size: each rank continues its own saved random stream, so the steps after a
    reload repeat those that followed the save, bit for bit."""
    for result in two_ranks:
        for key, value in result["straight"].items():
            torch.testing.assert_close(result["resumed"][key], value, rtol=0, atol=0, msg=key)


# --- torchrun end to end ----------------------------------------------------------------------
def torchrun(outputs, scene, *args):
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={WORLD}", "run.py", "--config", CPU_CONFIG, "--train",
               "--outputs_dir", str(outputs), f"dataset.root_dir={scene}", *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def single(outputs, scene, mode, *args):
    command = [sys.executable, "run.py", "--config", CPU_CONFIG, mode, "--outputs_dir", str(outputs),
               f"dataset.root_dir={scene}", *TINY, *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


def logged_losses(train_log):
    with open(train_log) as f:
        return [float(m.group(1)) for m in re.finditer(r"step \d+/\d+ loss ([0-9.]+)", f.read())]


def test_torchrun_writes_one_run_stops_on_sigterm_and_resumes_in_one_process(scene_template, tmp_path):
    outputs = tmp_path / "outputs"
    run = torchrun(outputs, scene_template, "trainer.max_steps=400", "trainer.val_every=10")
    lines = []
    for line in run.stderr:  # stop once training is under way (the step-20 log line)
        lines.append(line)
        if "step 20/400" in line:
            run.send_signal(signal.SIGTERM)
            break
    _, rest = run.communicate(timeout=600)
    err = "".join(lines) + rest
    assert run.returncode != 0, err[-3000:]
    assert "resume with: torchrun" in err, err[-3000:]
    (trial,) = glob.glob(str(outputs / "*" / "*"))  # one run folder, not one per rank
    checkpoints = sorted(glob.glob(os.path.join(trial, "ckpt", "ckpt_*.pth")))
    state = load_checkpoint(checkpoints[-1])
    assert 20 <= state["step"] < 400 and len(state["rng_per_rank"]) == WORLD
    assert not any(k.startswith("module.") for k in state["model"])
    assert os.listdir(os.path.join(trial, "save")) and len(glob.glob(os.path.join(trial, "logs", "*"))) == 1
    assert sorted(os.listdir(trial)) == ["ckpt", "code", "config", "logs", "save", "train.log"]
    losses = logged_losses(os.path.join(trial, "train.log"))
    assert len(losses) >= 4 and losses[-1] < losses[0], losses

    step = state["step"]
    resumed = single(outputs, scene_template, "--train", "--resume", checkpoints[-1], f"trainer.max_steps={step + 10}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert os.path.exists(os.path.join(trial, "ckpt", f"ckpt_{step + 10:06d}.pth"))
    tested = single(outputs, scene_template, "--test", "--resume", trial, "trainer.n_test_traj_steps=2",
                    "export.mesh_resolution=32")
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert os.path.exists(os.path.join(trial, "save", f"it{step + 10:06d}-test", "metrics.json"))


def test_a_single_process_checkpoint_resumes_under_torchrun(scene_template, tmp_path):
    outputs = tmp_path / "outputs"
    first = single(outputs, scene_template, "--train", "trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    (checkpoint,) = glob.glob(str(outputs / "*" / "*" / "ckpt" / "ckpt_000006.pth"))
    run = torchrun(outputs, scene_template, "--resume", checkpoint, "trainer.max_steps=10")
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    state = load_checkpoint(checkpoint.replace("ckpt_000006", "ckpt_000010"))
    assert state["step"] == 10 and len(state["rng_per_rank"]) == WORLD
