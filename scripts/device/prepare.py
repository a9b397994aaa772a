"""Make what a GPU check needs beside the checkout (git-ignored, carried to the device machine).

    python scripts/device/prepare.py --tcnn GIT_DIR --fmt GIT_DIR --cutlass GIT_DIR \
        [--scene ../shared/data/dtu_scan24]

The device machine reaches no network and gets only the checkout, so this writes
- .whl/          wheels of the requirements its image lacks (omegaconf, nerfacc, trimesh, PyMCubes)
                 for its Python (3.12), by `pip download`;
- .carry/dtu_scan24_800x600/   the scan at 800x600 (25 MiB of PNG) with its world_mats
                 scaled to that size, so it trains there with img_downscale 1 (the full scan
                 would not fit the 64 MiB the checkout may carry);
- .carry/tiny-cuda-nn.tar.gz   tiny-cuda-nn's source with the fmt and cutlass commits it pins,
                 from bare git directories (e.g. what the session's `fetch` tool returns), with
                 setup.py's `pkg_resources` import replaced (newer setuptools drop it).
Then run scripts/device/check.sh there (see its header).
"""
import argparse
import glob
import io
import os
import subprocess
import sys
import tarfile

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from utils.camera import downscale_matrix  # noqa: E402

CARRY, WHEELS = os.path.join(ROOT, ".carry"), os.path.join(ROOT, ".whl")
DEVICE_WHEELS = ["omegaconf==2.4.0", "nerfacc==0.5.3", "trimesh==5.2.0", "PyMCubes==0.1.6"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
TCNN_PATHS = ["include", "src", "bindings", "dependencies/pcg32", "dependencies/json", "dependencies/pybind11_json",
              "CMakeLists.txt", "LICENSE.txt"]
SUBMODULE_PATHS = {"fmt": ["include", "src"], "cutlass": ["include", "tools/util/include"]}


def download_wheels() -> None:
    os.makedirs(WHEELS, exist_ok=True)
    platforms = sum((["--platform", p] for p in PLATFORMS), [])
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", WHEELS, *DEVICE_WHEELS],
                   check=True)


def downscale_scene(scene: str, size=(800, 600)) -> str:
    """Photos and masks resized with INTER_AREA, as the loader's img_downscale 2 does (the same
    pixels; masks, thresholded on loading, differ in ~60 of 23.5M), and each world_mat K[R|t]
    rescaled as img_downscale rescales it (utils.camera.downscale_matrix)."""
    out = os.path.join(CARRY, f"{os.path.basename(scene.rstrip('/'))}_{size[0]}x{size[1]}")
    os.makedirs(os.path.join(out, "image"), exist_ok=True)
    os.makedirs(os.path.join(out, "mask"), exist_ok=True)
    photos = sorted(glob.glob(os.path.join(scene, "image", "*.png")))
    height, width = cv2.imread(photos[0]).shape[:2]
    factor = width / size[0]
    if abs(height / size[1] - factor) > 1e-9:
        raise ValueError(f"{photos[0]} is {width}x{height}: {size[0]}x{size[1]} is not the same shape")
    for path in photos:
        image = cv2.resize(cv2.imread(path), size, interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(out, "image", os.path.basename(path)), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    for path in sorted(glob.glob(os.path.join(scene, "mask", "*.png"))):
        mask = cv2.resize(cv2.imread(path), size, interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(out, "mask", os.path.basename(path)), mask)
    cameras = dict(np.load(os.path.join(scene, "cameras_sphere.npz")))
    for key in [k for k in cameras if k.startswith("world_mat_") and not k.startswith("world_mat_inv")]:
        cameras[key] = np.vstack([downscale_matrix(factor) @ cameras[key][:3, :4], [0, 0, 0, 1]])
        cameras[key.replace("world_mat_", "world_mat_inv_")] = np.linalg.inv(cameras[key])
    np.savez(os.path.join(out, "cameras_sphere.npz"), **cameras)
    return out


def git_archive(git_dir: str, commit: str, paths, prefix: str, tar: tarfile.TarFile) -> None:
    data = subprocess.run(["git", "--git-dir", git_dir, "archive", f"--prefix={prefix}", commit, *paths],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as part:
        for member in part.getmembers():
            content = part.extractfile(member) if member.isfile() else None
            if member.name == "bindings/torch/setup.py":
                text = content.read().decode().replace(
                    "from pkg_resources import parse_version", "from packaging.version import parse as parse_version")
                content, member.size = io.BytesIO(text.encode()), len(text.encode())
            tar.addfile(member, content)


def pinned_commit(tcnn_git: str, submodule: str) -> str:
    listing = subprocess.run(["git", "--git-dir", tcnn_git, "ls-tree", "HEAD", f"dependencies/{submodule}"],
                             check=True, capture_output=True, text=True).stdout.split()
    return listing[2]  # "160000 commit <sha>\tpath"


def pack_tcnn(tcnn_git: str, submodule_gits: dict) -> str:
    path = os.path.join(CARRY, "tiny-cuda-nn.tar.gz")
    os.makedirs(CARRY, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        git_archive(tcnn_git, "HEAD", TCNN_PATHS, "", tar)
        for name, git_dir in submodule_gits.items():
            git_archive(git_dir, pinned_commit(tcnn_git, name), SUBMODULE_PATHS[name], f"dependencies/{name}/", tar)
    return path


def size_mib(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tcnn", required=True, help="bare git dir of NVlabs/tiny-cuda-nn")
    parser.add_argument("--fmt", required=True, help="bare git dir of fmtlib/fmt (holding the commit tcnn pins)")
    parser.add_argument("--cutlass", required=True, help="bare git dir of NVIDIA/cutlass (likewise)")
    parser.add_argument("--scene", default=os.path.join(ROOT, "..", "shared", "data", "dtu_scan24"))
    args = parser.parse_args()
    download_wheels()
    made = [WHEELS, downscale_scene(args.scene), pack_tcnn(args.tcnn, {"fmt": args.fmt, "cutlass": args.cutlass})]
    for path in made:
        print(f"{size_mib(path):6.1f} MiB  {os.path.relpath(path, ROOT)}")
    print(f"{sum(map(size_mib, made)):6.1f} MiB in all (the checkout may carry 64 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
