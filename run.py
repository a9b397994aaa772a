"""Train, test or export a NeuS model.

    python run.py --config confs/neus-dtu-wmask-cpu.yaml --train [key=value ...]
    python run.py --config FILE --train --resume outputs/<name>/<trial>/ckpt/ckpt_002000.pth
    python run.py --config FILE --test --resume CKPT      # held-out metrics, video, mesh
    python run.py --config FILE --mesh --resume CKPT      # coloured mesh only
"""
import argparse
import logging
import os
import shutil
import sys
from datetime import datetime

from omegaconf import OmegaConf

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIRS = ("confs", "encoder", "models", "process_data", "systems", "utils")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", default=None, help="checkpoint to continue from (or to test / mesh)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true")
    mode.add_argument("--test", action="store_true")
    mode.add_argument("--mesh", action="store_true")
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
    args, overrides = parse_args(argv)
    sys.path.insert(0, PROJECT_DIR)
    from systems import SYSTEMS, RunPaths
    from utils.config import ConfigError, load_config, load_yaml_chain, parse_overrides
    from utils.logger import setup_logging
    from utils.misc import resolve_device, seed_everything

    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if (args.test or args.mesh) and args.resume is None:
        print("--test and --mesh need --resume CKPT (a checkpoint of a trained run)", file=sys.stderr)
        return 2
    if args.resume is not None and not os.path.isfile(args.resume):
        print(f"--resume {args.resume}: no such checkpoint file", file=sys.stderr)
        return 2

    if args.resume is not None:
        trial_dir = trial_dir_of(args.resume)
    else:
        trial = f"{config.tag}@{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        trial_dir = os.path.join(args.outputs_dir, config.name, trial)
    logs_dir = os.path.join(args.logs_dir, config.name, os.path.basename(trial_dir)) if args.logs_dir else None
    paths = RunPaths.for_trial(trial_dir, logs_dir)
    for folder in (paths.trial_dir, paths.ckpt_dir, paths.save_dir, paths.config_dir):
        os.makedirs(folder, exist_ok=True)
    setup_logging(paths.log_file)
    log = logging.getLogger("run")
    log.info("run folder: %s", os.path.abspath(trial_dir))

    if args.train:
        raw = OmegaConf.merge(load_yaml_chain(args.config), parse_overrides(overrides))
        OmegaConf.save(raw, os.path.join(paths.config_dir, "raw.yaml"))
        OmegaConf.save(config, os.path.join(paths.config_dir, "parsed.yaml"))
        snapshot_code(paths.code_dir)

    seed_everything(config.seed)
    device = resolve_device(config.device)
    system = SYSTEMS.get(config.system.name)(config, paths, device)
    if args.resume is not None:
        system.load(args.resume)
    if args.train:
        system.fit()
    elif args.test:
        system.test()
    else:
        system.export_mesh()
    return 0


if __name__ == "__main__":
    sys.exit(main())
