"""Train, test or export a NeuS model.

    python run.py --config confs/neus-dtu-wmask-cpu.yaml --train [key=value ...]
    python run.py --config FILE --train --resume outputs/<name>/<trial>/ckpt/ckpt_002000.pth
    python run.py --config FILE --test --resume CKPT      # held-out metrics, video, mesh
    python run.py --config FILE --mesh --resume CKPT      # coloured mesh only (export.texture=true: textured too)
    python run.py --config FILE --view --resume CKPT      # interactive viewer in the browser (viser)
    (--resume takes a checkpoint, a trial folder or `last`; --test / --mesh / --view default to `last`)
    torchrun --nproc_per_node N run.py --config FILE --train   # data-parallel over N processes
"""
import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
from datetime import datetime

import yaml
from omegaconf import OmegaConf

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIRS = ("confs", "encoder", "models", "process_data", "systems", "utils")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--resume", default=None,
        help="checkpoint to continue from (or to test / mesh): a ckpt file, a trial folder (its newest "
             "loadable checkpoint) or 'last' (the newest trial of this config's name under --outputs_dir)",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true")
    mode.add_argument("--test", action="store_true")
    mode.add_argument("--mesh", action="store_true")
    mode.add_argument("--view", action="store_true", help="serve the interactive viewer (viewer.* keys) until Ctrl-C")
    parser.add_argument("--outputs_dir", default="./outputs", help="runs go to OUTPUTS_DIR/<name>/<trial>/")
    parser.add_argument("--logs_dir", default=None, help="TensorBoard logs (default: the trial's logs/)")
    return parser.parse_known_args(argv)


def trial_dir_of(checkpoint: str) -> str:
    """<outputs>/<name>/<trial>/ckpt/ckpt_N.pth -> <outputs>/<name>/<trial>"""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def snapshot_code(code_dir: str) -> None:
    os.makedirs(code_dir, exist_ok=True)
    shutil.copy2(os.path.join(PROJECT_DIR, "run.py"), code_dir)
    for name in SOURCE_DIRS:
        shutil.copytree(
            os.path.join(PROJECT_DIR, name),
            os.path.join(code_dir, name),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )


def main(argv=None) -> int:
    """Run one command; under torchrun every rank runs it, and the process group is closed at
    the end."""
    sys.path.insert(0, PROJECT_DIR)
    from utils import distributed as dist

    try:
        code = run_command(argv)
        # the ranks leave together: one that closed its process group while rank 0 still
        # wrote the mesh sometimes died of its unfinished gloo work (SIGABRT) under torchrun
        dist.barrier()
        return code
    finally:
        dist.shutdown()


def set_up(args, overrides):
    """Everything that can be wrong with the config, the data or the checkpoint fails here, before
    anything is written -> config, run paths, the Trainer (from its checkpoint when resuming) and
    the checkpoint (or None). Raises ConfigError / DatasetError / CheckpointError / DistributedError."""
    import torch
    from systems import RunPaths, Trainer
    from systems.config import load_config
    from utils import distributed as dist
    from utils.checkpoint import CheckpointError, resolve_resume
    from utils.misc import resolve_device, seed_everything

    config = load_config(args.config, overrides)
    device = dist.init_from_env(resolve_device(config.device))
    if args.train and dist.is_main():
        from systems.cpu_budget import gpu_config_on_cpu_warning

        warning = gpu_config_on_cpu_warning(config, args.config, device.type, torch.get_num_threads())
        if warning:
            logging.getLogger("run").warning(warning)
    runs_dir = os.path.join(args.outputs_dir, config.name)
    resume = args.resume
    if resume is None and (args.test or args.mesh or args.view):
        resume = "last"
    try:
        checkpoint = resolve_resume(resume, runs_dir) if resume is not None else None
    except CheckpointError as e:
        if args.resume is None:
            raise CheckpointError(f"--test, --mesh and --view need a trained run: {e}; train first or pass --resume CKPT")
        raise
    if checkpoint is not None:
        trial_dir = trial_dir_of(checkpoint)
    else:  # rank 0's clock names the trial
        trial_dir = dist.broadcast_object(
            os.path.join(runs_dir, f"{config.tag}@{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        )
    logs_dir = os.path.join(args.logs_dir, config.name, os.path.basename(trial_dir)) if args.logs_dir else None
    paths = RunPaths.for_trial(trial_dir, logs_dir)
    seed_everything(config.seed)  # the same initial parameters on every rank
    system = Trainer(config, paths, device)
    if checkpoint is not None:
        system.load(checkpoint)
    elif dist.rank() > 0:  # each rank draws its own rays
        seed_everything(dist.rank_seed(config.seed, dist.rank()))
    return config, paths, system, checkpoint


def record_run(args, overrides, config, paths, system, checkpoint) -> logging.Logger:
    """Rank 0 makes the run folder; the log file, what was resumed and the backends chosen; for a
    training also the configs (raw, parsed, backends) and a snapshot of the code -> the run's logger."""
    from models.occupancy import NERFACC_FIRST_USE
    from utils import distributed as dist
    from utils.config import load_yaml_chain, parse_overrides
    from utils.logger import setup_logging

    if dist.is_main():  # the one process that writes
        for folder in (paths.trial_dir, paths.ckpt_dir, paths.save_dir, paths.config_dir):
            os.makedirs(folder, exist_ok=True)
    setup_logging(paths.log_file if dist.is_main() else None, rank=dist.rank())
    log = logging.getLogger("run")
    log.info("run folder: %s", os.path.abspath(paths.trial_dir))
    if checkpoint is not None:
        log.info("from checkpoint %s (step %d)", checkpoint, system.global_step)
    log.info("backends: %s", ", ".join(f"{key}={value}" for key, value in system.backends.items()))
    if "nerfacc" in system.backends.values():
        log.info(NERFACC_FIRST_USE)
    if args.train and dist.is_main():
        raw = OmegaConf.merge(load_yaml_chain(args.config), parse_overrides(overrides))
        OmegaConf.save(raw, os.path.join(paths.config_dir, "raw.yaml"))
        OmegaConf.save(config, os.path.join(paths.config_dir, "parsed.yaml"))
        with open(os.path.join(paths.config_dir, "backends.yaml"), "w") as f:  # what `auto` became here
            yaml.safe_dump(system.backends, f, sort_keys=False)
        snapshot_code(paths.code_dir)
    dist.barrier()
    return log


def prefetch_scene(config_path: str, overrides) -> None:
    """Start decoding the scene's photos and masks on a background thread (utils/prefetch.py)
    while torch and the framework import. Only a hint: the config is read raw (not validated:
    set_up does that), and anything amiss here just means no prefetch."""
    from utils import prefetch
    from utils.config import load_yaml_chain, parse_overrides

    try:
        raw = OmegaConf.merge(load_yaml_chain(config_path), parse_overrides(overrides))
        root_dir = str(raw.dataset.root_dir)
    except Exception:  # noqa: BLE001 (set_up reports config errors)
        return
    prefetch.start(prefetch.scene_files(root_dir))


def set_up_or_refuse(args, overrides):
    """set_up, with the scene's photos prefetched while the framework imports -> its result, or
    None after printing one line `<kind> error: ...` for what the user can act on."""
    prefetch_scene(args.config, overrides)
    from process_data.loading import DatasetError
    from utils import distributed as dist
    from utils import prefetch
    from utils.checkpoint import CheckpointError
    from utils.config import ConfigError
    from utils.logger import setup_logging

    setup_logging(None, rank=int(os.environ.get("RANK", "0")))
    refusals = ((dist.DistributedError, "distributed error"), (ConfigError, "config error"),
                (DatasetError, "data error"), (CheckpointError, "checkpoint error"))
    try:
        return set_up(args, overrides)
    except tuple(kind for kind, _ in refusals) as e:
        prefix = next(name for kind, name in refusals if isinstance(e, kind))
        print(f"{prefix}: {e}", file=sys.stderr)
        return None
    finally:
        prefetch.stop()  # the scene is loaded: drop what it did not take


def run_command(argv=None) -> int:
    args, overrides = parse_args(argv)
    ready = set_up_or_refuse(args, overrides)
    if ready is None:
        return 2
    from systems.checkpointing import TrainingDiverged
    from systems.trainer import TrainingInterrupted
    from utils import distributed as dist

    config, paths, system, checkpoint = ready
    log = record_run(args, overrides, config, paths, system, checkpoint)

    viewer = None
    if dist.is_main() and (args.view or (args.train and config.viewer.enabled)):
        from systems.viewer import Viewer

        viewer = Viewer(system, config.viewer)
        system.step_callbacks.append(viewer.on_step)
    try:
        if args.view:
            viewer.serve_forever()
        elif args.train:
            system.fit()
        elif args.test:  # every rank renders its share of the views, rank 0 writes
            system.test()
        else:
            system.export_mesh()
    except TrainingInterrupted as e:
        launcher = ["python"] if dist.world_size() == 1 else ["torchrun", f"--nproc_per_node={dist.world_size()}"]
        command = [*launcher, "run.py", "--config", args.config, "--train", "--resume", e.checkpoint, *overrides]
        if dist.is_main():
            log.warning("training stopped by %s; checkpoint %s", signal.Signals(e.signum).name, e.checkpoint)
            log.warning("resume with: %s", shlex.join(command))
        return 128 + e.signum
    except TrainingDiverged as e:
        log.error("training diverged: %s", e)
        return 1
    if viewer is not None and args.train:  # the live viewer keeps serving the trained run
        viewer.show_mesh()
        viewer.serve_forever()
    return 0

if __name__ == "__main__":
    sys.exit(main())
