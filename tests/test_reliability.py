"""Runs that are never lost: bad data and configs refused at start-up with a clear message and
nothing written, interrupts that save and resume exactly, checkpoints that fail clearly and
fall back, non-finite steps skipped and rolled back, evaluation that survives out-of-memory,
and determinism on CPU."""
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import run
import systems
import systems.neus
from process_data.synthetic import make_demo_scene
from systems.checkpointing import TrainingDiverged
from tests.conftest import ROOT, tiny_overrides
from utils.checkpoint import CheckpointError, load_checkpoint, resolve_resume, save_checkpoint
from systems.config import load_config
from utils.misc import map_in_chunks, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")
CPU_CONFIG = os.path.join(ROOT, "confs", "neus-dtu-wmask-cpu.yaml")
TINY = tiny_overrides(  # smaller still than the suite's tiny config, on conftest's 40x30 scene_template
    "dataset.img_downscale=1",
    "dataset.holdout_every=0",
    "model.geometry.xyz_encoding.n_levels=4",
    "model.geometry.xyz_encoding.log2_hashmap_size=10",
    "model.sampler.resolution=16",
    "model.sampler.update_every=4",
    "model.sampler.warmup_steps=8",
    "model.cos_anneal_steps=20",
    "trainer.train_num_rays=64",
    "trainer.num_samples_per_step=1024",
    "trainer.log_every=5",
    "trainer.test_at_end=false",
    "system.scheduler.warmup_steps=2",
)


def run_main(capsys, *args):
    """run.py's main in this process -> (exit code, stderr)."""
    code = run.main(["--config", CPU_CONFIG, *args])
    return code, capsys.readouterr().err


def build_system(scene, trial_dir, *overrides):
    config = load_config(CPU_CONFIG, [f"dataset.root_dir={scene}", *TINY, *overrides])
    seed_everything(config.seed)
    return systems.Trainer(config, systems.RunPaths.for_trial(str(trial_dir)),
                                                   torch.device("cpu"))


def assert_refused_at_start_up(code, err, expected, outputs):
    """Exit status 2, one error line holding every part of `expected`, and no outputs folder."""
    assert code == 2
    message = [line for line in err.splitlines() if "error:" in line]
    assert len(message) == 1, err
    for part in expected:
        assert part in message[0], (part, message[0])
    assert not outputs.exists()


# --- bad input, refused at start-up -----------------------------------------------------------
def write_image(path, width, height):
    cv2.imwrite(path, np.full((height, width, 3), 127, np.uint8))


def break_scene(scene, case):
    """Damage a scene copy as `case` says -> the root_dir to pass (and any extra overrides)."""
    image, mask = os.path.join(scene, "image"), os.path.join(scene, "mask")
    cameras_path = os.path.join(scene, "cameras_sphere.npz")
    cameras = dict(np.load(cameras_path))
    if case == "no_root":
        return os.path.join(scene, "missing"), []
    if case == "no_images":
        for name in os.listdir(image):
            os.remove(os.path.join(image, name))
    elif case == "image_sizes":
        write_image(os.path.join(image, "000002.png"), 20, 15)
    elif case == "corrupt_png":
        with open(os.path.join(image, "000001.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not really")
    elif case == "missing_mask":
        os.remove(os.path.join(mask, "003.png"))
    elif case == "mask_size":
        write_image(os.path.join(mask, "000.png"), 80, 60)
    elif case == "no_cameras":
        os.remove(cameras_path)
    elif case == "missing_world_mat":
        del cameras["world_mat_2"]
        np.savez(cameras_path, **cameras)
    elif case == "singular_camera":
        cameras["world_mat_1"] = np.zeros((4, 4))
        np.savez(cameras_path, **cameras)
    elif case == "more_images_than_cameras":
        shutil.copy(os.path.join(image, "000000.png"), os.path.join(image, "000004.png"))
        shutil.copy(os.path.join(mask, "000.png"), os.path.join(mask, "004.png"))
    elif case == "bad_downscale":
        return scene, ["dataset.img_downscale=3"]
    else:
        raise ValueError(case)
    return scene, []


BAD_INPUTS = {
    # case: what the one-line message must say
    "no_root": ["data error:", "missing", "does not exist"],
    "no_images": ["data error:", "no images", "image"],
    "image_sizes": ["data error:", "000002.png is 20x15", "40x30", "same size"],
    "corrupt_png": ["data error:", "cannot read image", "000001.png"],
    "missing_mask": ["data error:", "3 masks for 4 images", "use_masks=false"],
    "mask_size": ["data error:", "000.png is 80x60", "same size"],
    "no_cameras": ["data error:", "cameras_sphere.npz not found"],
    "missing_world_mat": ["data error:", "no world_mat_2", "000002.png"],
    "singular_camera": ["data error:", "world_mat_1 @ scale_mat_1 is not invertible"],
    "more_images_than_cameras": ["data error:", "no world_mat_4", "000004.png"],
    "bad_downscale": ["data error:", "img_downscale 3", "13.3333x10", "divides both sides"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_data_is_refused_before_anything_is_written(case, scene, tmp_path, capsys):
    root_dir, extra = break_scene(scene, case)
    outputs = tmp_path / "outputs"
    code, err = run_main(capsys, "--train", "--outputs_dir", str(outputs), f"dataset.root_dir={root_dir}",
                         *TINY, *extra)
    assert_refused_at_start_up(code, err, BAD_INPUTS[case], outputs)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--train", "trainer.max_step=10"], ["config error:", "trainer.max_step", "max_steps"]),
        (["--train", "trainer.max_steps=lots"], ["config error:", "trainer.max_steps", "lots"]),
        (["--train", "--resume", "nowhere/ckpt_000010.pth"], ["checkpoint error:", "nowhere/ckpt_000010.pth"]),
        (["--test"], ["checkpoint error:", "need a trained run", "--resume"]),
        (["--mesh"], ["checkpoint error:", "need a trained run", "--resume"]),
    ],
)
def test_bad_config_and_resume_are_refused(args, expected, scene, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    code, err = run_main(capsys, *args, "--outputs_dir", str(outputs), f"dataset.root_dir={scene}", *TINY)
    assert_refused_at_start_up(code, err, expected, outputs)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("dataset.background_color=blue", ["dataset.background_color", "'blue'", "['random', 'white', 'black']"]),
        ("model.geometry.grad_type=fd", ["model.geometry.grad_type", "'fd'", "['analytic', 'finite_difference']"]),
        ("export.formats=[ply,gltf]", ["export.formats[1]", "'gltf'", "['ply', 'obj', 'stl']"]),
    ],
)
@pytest.mark.parametrize("mode", ["--train", "--mesh"])
def test_bad_string_choices_fail_at_load_naming_the_valid_values(override, expected, mode, tmp_path, capsys):
    """Checked when the config loads: before the data is read (the missing root_dir is not what
    is reported), before a checkpoint is looked for, with one line naming key and choices."""
    outputs = tmp_path / "outputs"
    code, err = run_main(capsys, mode, "--outputs_dir", str(outputs), f"dataset.root_dir={tmp_path / 'missing'}",
                         *TINY, override)
    assert_refused_at_start_up(code, err, ["config error: bad value for config key", *expected], outputs)


# --- checkpoints ------------------------------------------------------------------------------
def test_truncated_checkpoint_is_named_and_the_trial_falls_back(tmp_path):
    ckpt_dir = tmp_path / "trial" / "ckpt"
    for step in (10, 20):
        save_checkpoint(str(ckpt_dir / f"ckpt_{step:06d}.pth"), {"step": step, "weights": torch.ones(1000) * step})
    newest = ckpt_dir / "ckpt_000020.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="ckpt_000020.pth cannot be read"):
        load_checkpoint(str(newest))
    assert resolve_resume(str(tmp_path / "trial"), str(tmp_path)) == str(ckpt_dir / "ckpt_000010.pth")
    assert resolve_resume(str(ckpt_dir), str(tmp_path)) == str(ckpt_dir / "ckpt_000010.pth")
    # `last`: the newest trial under the runs folder with a loadable checkpoint
    time.sleep(0.01)
    save_checkpoint(str(tmp_path / "later" / "ckpt" / "ckpt_000005.pth"), {"step": 5})
    assert resolve_resume("last", str(tmp_path)) == str(tmp_path / "later" / "ckpt" / "ckpt_000005.pth")


def test_foreign_and_old_checkpoints_are_refused(tmp_path):
    torch.save({"step": 1}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="foreign.pth is not a checkpoint of this framework"):
        load_checkpoint(str(tmp_path / "foreign.pth"))
    torch.save({"version": 1, "step": 1}, tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match="v1.pth has format version 1; this code reads version 2"):
        load_checkpoint(str(tmp_path / "v1.pth"))
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        load_checkpoint(str(tmp_path / "nope.pth"))


def test_checkpoint_of_another_model_config_is_refused(scene, tmp_path):
    path = build_system(scene, tmp_path / "a").save()
    other = build_system(scene, tmp_path / "b", "model.geometry.xyz_encoding.n_levels=5")
    with pytest.raises(CheckpointError, match="ckpt_000000.pth does not fit this config"):
        other.load(path)


def test_only_the_newest_checkpoints_are_kept(scene, tmp_path):
    system = build_system(scene, tmp_path, "trainer.max_steps=8", "trainer.ckpt_every=2", "trainer.keep_checkpoints=2")
    system.fit()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["ckpt_000006.pth", "ckpt_000008.pth"]


# --- interrupts -------------------------------------------------------------------------------
def start_run(outputs, scene, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "run.py", "--config", CPU_CONFIG, "--train", "--outputs_dir", str(outputs),
               f"dataset.root_dir={scene}", *TINY, "trainer.max_steps=60", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final_parameters(outputs):
    (path,) = [os.path.join(d, f) for d, _, files in os.walk(outputs) for f in files if f == "ckpt_000060.pth"]
    return load_checkpoint(path)["model"]


def sigterm_once_logged(process, marker: str) -> str:
    """SIGTERM to `process` once its stderr shows `marker` (training under way), then wait for
    it -> all it wrote on stderr."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            process.send_signal(signal.SIGTERM)
            break
    _, rest = process.communicate(timeout=600)
    return "".join(lines) + rest


def test_sigterm_saves_and_the_resumed_run_matches_an_uninterrupted_one(scene, tmp_path):
    straight = start_run(tmp_path / "straight", scene)
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]

    interrupted = start_run(tmp_path / "interrupted", scene)
    err = sigterm_once_logged(interrupted, "step 10/60")
    assert interrupted.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM" in err and "resume with: python run.py" in err
    resume_line = next(line for line in err.splitlines() if "resume with:" in line)
    checkpoint = resume_line.split("--resume ")[1].split()[0]
    assert 10 <= load_checkpoint(checkpoint)["step"] < 60

    resumed = start_run(tmp_path / "interrupted", scene, "--resume", checkpoint)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    a, b = final_parameters(tmp_path / "straight"), final_parameters(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# --- non-finite steps -------------------------------------------------------------------------
def poison(monkeypatch, bad_calls):
    """neus_losses returns a NaN loss on the calls (0-based) in bad_calls."""
    real, calls = systems.neus.neus_losses, [0]

    def poisoned(config, out, batch):
        terms = real(config, out, batch)
        if calls[0] in bad_calls:
            terms["rgb_l1"] = terms["rgb_l1"] * float("nan")
            terms["total"] = sum(v for k, v in terms.items() if k != "total")
        calls[0] += 1
        return terms

    monkeypatch.setattr(systems.neus, "neus_losses", poisoned)


def test_a_nan_step_is_skipped(scene, tmp_path, monkeypatch):
    system = build_system(scene, tmp_path)
    poison(monkeypatch, {3})
    for _ in range(3):
        system.step()
    # everything but the step-driven state (occupancy grid, cos-anneal ratio)
    before = {k: v.clone() for k, v in system.model.state_dict().items()
              if "estimator" not in k and k != "cos_anneal_ratio"}
    result = system.step()
    assert result.skipped and "rgb_l1" in result.non_finite and system.skipped_steps == 1
    after = system.model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert not system.step().skipped and system.bad_steps_in_a_row == 0


def test_persistent_nans_roll_back_with_a_lower_learning_rate(scene, tmp_path, monkeypatch):
    """Calls 9, 10, 11 poisoned (max_bad_steps 3): back to the step-8 checkpoint with the
    learning rates halved, then on to the end with finite parameters."""
    system = build_system(scene, tmp_path, "trainer.max_steps=14", "trainer.ckpt_every=4", "trainer.max_bad_steps=3",
                          "system.scheduler.warmup_steps=0")
    configured = [group["lr"] for group in system.optimizer.param_groups]
    poison(monkeypatch, {9, 10, 11})
    system.fit()
    assert (system.global_step, system.skipped_steps, system.rollbacks) == (14, 3, 1)
    assert system.lr_scale == 0.5
    torch.testing.assert_close([g["lr"] for g in system.optimizer.param_groups], [0.5 * lr for lr in configured])
    assert all(torch.isfinite(p).all() for p in system.model.parameters())
    state = load_checkpoint(str(tmp_path / "ckpt" / "ckpt_000014.pth"))
    assert (state["lr_scale"], state["skipped_steps"], state["rollbacks"]) == (0.5, 3, 1)


def test_nans_that_never_stop_end_the_run_with_a_clear_error(scene, tmp_path, monkeypatch):
    system = build_system(scene, tmp_path, "trainer.max_steps=40", "trainer.ckpt_every=4", "trainer.max_bad_steps=2",
                          "trainer.max_rollbacks=2")
    poison(monkeypatch, set(range(5, 1000)))
    with pytest.raises(TrainingDiverged, match="after 2 rollbacks; lower system.optimizer.lr_"):
        system.fit()
    assert system.rollbacks == 2 and system.lr_scale == 0.25


# --- memory ---------------------------------------------------------------------------------
def test_out_of_memory_halves_the_chunk_and_retries(scene, tmp_path, monkeypatch):
    system = build_system(scene, tmp_path, "trainer.eval_chunk_rays=1000")
    reference = system.task.evaluation.render_view(0)
    forward = system.model.forward

    def limited(rays_o, *args):
        if rays_o.shape[0] > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(rays_o, *args)

    monkeypatch.setattr(system.model, "forward", limited)
    images = system.task.evaluation.render_view(0)
    assert system.task.evaluation.eval_chunk_rays == 250
    for key in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(images[key], reference[key], msg=key)


def test_other_errors_are_not_retried():
    def fail(start, stop):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        map_in_chunks(fail, 10, 4, "testing")
    calls = []

    def cpu_oom(start, stop):
        calls.append((start, stop))
        if stop - start > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return stop - start

    results, chunk = map_in_chunks(cpu_oom, 5, 8, "testing")
    assert (results, chunk) == ([2, 2, 1], 2)


# --- determinism ----------------------------------------------------------------------------
def test_same_seed_same_parameters_on_cpu(scene, tmp_path):
    runs = []
    for name in ("a", "b"):
        system = build_system(scene, tmp_path / name)
        for _ in range(8):
            system.step()
        runs.append(system.model.state_dict())
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=0, atol=0, msg=key)
