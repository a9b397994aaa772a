"""Data-parallel training (torch.distributed, gloo on CPU, 2 processes): one step on 2 ranks
with B/2 rays each equals one step on 1 rank with the same B rays; after K steps every rank
holds the same parameters and occupancy grid; a torchrun run writes one run folder, stops
cleanly on SIGTERM and resumes in a single process (and the other way round); validation,
`--test` and the mesh on 2 ranks, each rendering its share, write what 1 process writes."""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import trimesh

import models.occupancy
import run
import systems.evaluation
import systems.export
import systems.neus
from tests.conftest import ROOT
from process_data.synthetic import make_demo_scene
from tests.test_background import SMALL_BACKGROUND
from tests.test_reliability import CPU_CONFIG, TINY, build_system, poison, sigterm_once_logged
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
# test stages without a ground-truth mesh: its Chamfer distance takes ~15 s here (rank 0 alone),
# and the meshes themselves are compared
NO_GT_MESH = "dataset.gt_mesh=absent.ply"


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
    """Step 0 as Trainer.step takes it, on the given rays -> the parameters after it, and their
    gradients (compared too: Adam's first step is lr * sign(gradient), blind to its size)."""
    system.prepare_step(0)
    result = system.optimise(batch)
    assert not result.skipped, result
    stats = result.stats
    named = dict(system.model.named_parameters())
    return {"parameters": {k: p.detach().clone() for k, p in named.items()},
            "gradients": {k: p.grad.clone() for k, p in named.items()},
            "loss": stats["loss"], "samples_per_ray": stats["samples_per_ray"]}


def continued(system, n_steps):
    """n_steps more steps from system.global_step -> the model state after them."""
    for _ in range(n_steps):
        system.step()
    return {k: v.clone() for k, v in system.model.state_dict().items()}


def join_process_group(rank, port):
    """Start this spawned process as rank `rank` of WORLD, as torchrun's environment would."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_from_env(torch.device("cpu"))


def worker(rank, port, scene, out_dir):
    """One rank: the equivalence step; K_STEPS of training; a checkpoint, 4 more steps, and the
    same 4 steps again after loading the checkpoint. Results to out_dir/rank<r>.pt."""
    join_process_group(rank, port)
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
            skipped.append(float(system.step().skipped))
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
    assert a["state"]["occupancy.estimator.binaries"].any() and a["state"]["background.grid.estimator.binaries"].any()


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
    training = torchrun(outputs, scene_template, "trainer.max_steps=400", "trainer.val_every=10")
    err = sigterm_once_logged(training, "step 20/400")
    assert training.returncode != 0, err[-3000:]
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
                    "export.mesh_resolution=32", NO_GT_MESH)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert os.path.exists(os.path.join(trial, "save", f"it{step + 10:06d}-test", "metrics.json"))


def test_a_single_process_checkpoint_resumes_under_torchrun(scene_template, tmp_path):
    """... and the torchrun run ends with the test stage (one test view: rank 1 renders none of
    them, but its share of the orbit frames and of the SDF grid)."""
    outputs = tmp_path / "outputs"
    first = single(outputs, scene_template, "--train", "trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    (checkpoint,) = glob.glob(str(outputs / "*" / "*" / "ckpt" / "ckpt_000006.pth"))
    resumed = torchrun(outputs, scene_template, "--resume", checkpoint, "trainer.max_steps=10",
                       "trainer.test_at_end=true", "trainer.n_test_traj_steps=2", "export.mesh_resolution=32",
                       NO_GT_MESH)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    state = load_checkpoint(checkpoint.replace("ckpt_000006", "ckpt_000010"))
    assert state["step"] == 10 and len(state["rng_per_rank"]) == WORLD
    save = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "save")
    metrics = json.load(open(os.path.join(save, "it000010-test", "metrics.json")))
    assert list(metrics["views"]) == ["000000"] and os.path.isfile(metrics["video"])
    assert len(glob.glob(os.path.join(save, "it000010-test", "traj-*.png"))) == 2


# --- rendering shared out over the ranks --------------------------------------------------------
# views 0 and 2 held out (one per rank), 3 orbit frames (2 on rank 0, 1 on rank 1), a small mesh
RENDER_ARGS = ["dataset.holdout_every=2", "trainer.n_test_traj_steps=3", "export.mesh_resolution=32", NO_GT_MESH]
RENDER_STEPS = 8


@pytest.fixture(scope="module")
def trained_trial(scene_template, tmp_path_factory):
    """A trial folder holding the checkpoint of RENDER_STEPS steps (past the occupancy warm-up)."""
    trial = tmp_path_factory.mktemp("trained") / "scene@trained"
    system = build_system(scene_template, trial, *RENDER_ARGS)
    for step in range(RENDER_STEPS):
        system.step()
    assert system.global_step == RENDER_STEPS
    system.save()
    return trial


def count_renders(monkeypatch, counts):
    """Record in `counts` what this process renders: test views, orbit frames, rays (all
    renders), SDF-grid x-planes."""
    evaluation = systems.evaluation.Evaluation
    render_view, orbit_frame, render_rays = evaluation.render_view, evaluation.orbit_frame, evaluation.render_rays
    sdf_on_grid = systems.export.sdf_on_grid

    def counted_view(self, index):
        counts["views"].append(index)
        return render_view(self, index)

    def counted_frame(self, c2w):
        counts["frames"] += 1
        return orbit_frame(self, c2w)

    def counted_rays(self, rays):
        counts["rays"] += rays["rays_o"].shape[0]
        return render_rays(self, rays)

    def counted_planes(*args):
        values, voxel = sdf_on_grid(*args)
        counts["sdf_planes"] += values.shape[0]
        return values, voxel

    monkeypatch.setattr(evaluation, "render_view", counted_view)
    monkeypatch.setattr(evaluation, "orbit_frame", counted_frame)
    monkeypatch.setattr(evaluation, "render_rays", counted_rays)
    monkeypatch.setattr(systems.export, "sdf_on_grid", counted_planes)


def args_of_a_test_run(scene, checkpoint):
    return ["--config", CPU_CONFIG, "--test", "--resume", str(checkpoint), f"dataset.root_dir={scene}", *TINY,
            *RENDER_ARGS]


def rendering_worker(rank, port, scene, trial, out_dir):
    """One rank: validate() once on the trained checkpoint, then `run.py --test` on it, counting
    what this rank rendered -> out_dir/rank<r>.json."""
    join_process_group(rank, port)
    monkeypatch = pytest.MonkeyPatch()
    counts = {"views": [], "frames": 0, "rays": 0, "sdf_planes": 0}
    checkpoint = os.path.join(trial, "ckpt", f"ckpt_{RENDER_STEPS:06d}.pth")
    try:
        count_renders(monkeypatch, counts)
        system = build_system(scene, trial, *RENDER_ARGS)
        system.load(checkpoint)
        system.validate()
        validation_rays, counts["rays"] = counts["rays"], 0
        code = run.main(args_of_a_test_run(scene, checkpoint))  # joins the running process group, closes it at the end
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"code": code, "validation_rays": validation_rays, **counts}, f)
    finally:
        monkeypatch.undo()
        dist.shutdown()


def rendered_files(trial):
    """{path under save/: image [H, W, C] or None (other files)}"""
    save = os.path.join(trial, "save")
    files = {}
    for path in glob.glob(os.path.join(save, "**", "*"), recursive=True):
        if os.path.isfile(path):
            files[os.path.relpath(path, save)] = imageio.imread(path).astype(int) if path.endswith(".png") else None
    return files


@pytest.fixture(scope="module")
def one_and_two_ranks(trained_trial, scene_template, tmp_path_factory):
    """The trained trial validated and tested by 1 process and by 2 ranks (in copies of it)
    -> (1-process trial, 2-rank trial, each rank's counts)."""
    base = tmp_path_factory.mktemp("render")
    one, two = (shutil.copytree(trained_trial, base / n / trained_trial.name) for n in ("one", "two"))
    checkpoint = os.path.join(one, "ckpt", f"ckpt_{RENDER_STEPS:06d}.pth")
    system = build_system(scene_template, one, *RENDER_ARGS)
    system.load(checkpoint)
    system.validate()
    tested = subprocess.run([sys.executable, "run.py", *args_of_a_test_run(scene_template, checkpoint)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stderr[-3000:]
    out_dir = str(base)
    mp.start_processes(rendering_worker, args=(free_port(), scene_template, str(two), out_dir), nprocs=WORLD,
                       start_method="spawn")
    counts = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(WORLD)]
    return one, two, counts


def test_two_ranks_write_the_files_one_process_writes(one_and_two_ranks):
    one, two, counts = one_and_two_ranks
    assert [c["code"] for c in counts] == [0] * WORLD
    single_files, shared_files = rendered_files(one), rendered_files(two)
    assert sorted(shared_files) == sorted(single_files)
    assert "it000008-val/000000.png" in shared_files and "it000008-test/metrics.json" in shared_files
    assert {"it000008-test.mp4", "it000008-mc32.ply"} <= set(shared_files)
    for name, image in single_files.items():
        if image is None:
            continue
        # a test view or frame comes whole from one rank; a validation view's rays are split in
        # halves, rendered in other chunks: float noise at most
        tolerance = 1 if name.startswith("it000008-val") else 0
        assert np.abs(shared_files[name] - image).max() <= tolerance, name
    single_mesh, shared_mesh = (trimesh.load(os.path.join(t, "save", "it000008-mc32.ply"), process=False)
                                for t in (one, two))
    assert np.array_equal(shared_mesh.faces, single_mesh.faces)
    np.testing.assert_allclose(shared_mesh.vertices, single_mesh.vertices, rtol=0, atol=1e-6)


def test_two_ranks_write_the_metrics_one_process_writes(one_and_two_ranks):
    one, two, _ = one_and_two_ranks
    single, shared = (json.load(open(os.path.join(t, "save", "it000008-test", "metrics.json"))) for t in (one, two))
    assert shared.keys() == single.keys() and shared["views"].keys() == single["views"].keys() == {"000000", "000002"}
    for section in ("views", "mean"):
        torch.testing.assert_close(shared[section], single[section], msg=section)
    for metrics, trial in ((single, one), (shared, two)):
        assert os.path.relpath(metrics["video"], trial) == os.path.join("save", "it000008-test.mp4")
        assert os.path.relpath(metrics["mesh"]["path"], trial) == os.path.join("save", "it000008-mc32.ply")


def test_each_rank_renders_only_its_share(one_and_two_ranks):
    _, _, (rank0, rank1) = one_and_two_ranks
    assert rank0["views"] == [0] and rank1["views"] == [2]  # the held-out views 0 and 2, in turns
    assert (rank0["frames"], rank1["frames"]) == (2, 1)  # orbit frames 0, 2 | 1
    pixels = 40 * 30
    assert rank0["validation_rays"] == rank1["validation_rays"] == pixels // 2
    # the coarse and the fine SDF grids' x-planes, halved (within a plane each)
    assert rank0["sdf_planes"] > 0 and abs(rank0["sdf_planes"] - rank1["sdf_planes"]) <= 2
