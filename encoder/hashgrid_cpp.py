"""Builds and loads the hash grid's C++ CPU kernels (encoder/csrc/hashgrid_cpu.cpp), the
`backend: cpp` of encoder/hashgrid.py.

The extension is compiled once per machine (g++ and ninja, about a minute) into torch's
extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR); later processes only
load the built .so. `python -m encoder.hashgrid_cpp` builds it and prints the time (`make venv`
runs it). Nothing is built at import time: `extension()` builds or loads on first call and
remembers the result, `build_error()` says in one line why it cannot be had (None when it can).
Flags: -O3 only (no -march=native), so a cache shared between machines stays valid; OpenMP
for torch's intra-op thread pool (`at::parallel_for`, which follows torch.set_num_threads).

Loading through torch.utils.cpp_extension costs about half a second (it imports setuptools and
runs ninja to check the build), so a successful build leaves a stamp (the .so's path and a hash
of the source, flags, torch and Python versions) and later processes load that .so directly
while the hash matches.
"""
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import time
from types import ModuleType
from typing import Optional, Tuple

NAME = "neus_hashgrid_cpu"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "hashgrid_cpu.cpp")

CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")  # no FMA: the same roundings as torch's x * s + 0.5
LDFLAGS = ("-fopenmp",)

_loaded: Optional[Tuple[Optional[ModuleType], Optional[str]]] = None  # (module, why not)


def _stamp_path() -> str:
    """Where the stamp lives: torch's extension root ($TORCH_EXTENSIONS_DIR or the user cache)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions"
    )
    return os.path.join(root, f"{NAME}.stamp.json")


def _build_key() -> str:
    import torch

    digest = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        digest.update(f.read())
    digest.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:3])).encode())
    return digest.hexdigest()


def _load_stamped() -> Optional[ModuleType]:
    """The .so a previous build stamped, loaded directly, or None (no stamp, stale, unloadable)."""
    try:
        with open(_stamp_path()) as f:
            stamp = json.load(f)
        if stamp.get("key") != _build_key() or not os.path.isfile(stamp.get("path", "")):
            return None
        import torch  # noqa: F401  (the .so links against libtorch, which must be loaded first)

        loader = importlib.machinery.ExtensionFileLoader(NAME, stamp["path"])
        spec = importlib.util.spec_from_file_location(NAME, stamp["path"], loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except Exception:  # any doubt: take the full path through torch's builder
        return None


def _write_stamp(module: ModuleType) -> None:
    try:
        path = _stamp_path()
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump({"key": _build_key(), "path": os.path.abspath(module.__file__)}, f)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache only costs the slower load next time


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # a compiler failure's useful line is the first 'error:'; otherwise the first line
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no message")
    return f"{type(error).__name__}: {first}"


def _load(verbose: bool = False) -> Tuple[Optional[ModuleType], Optional[str]]:
    module = _load_stamped()
    if module is not None:
        return module, None
    try:
        from torch.utils.cpp_extension import load

        # copies: load() appends to the lists it is given
        module = load(name=NAME, sources=[SOURCE], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                      verbose=verbose)
    except Exception as e:  # no compiler, no ninja, a compile error: say why in one line
        return None, _one_line(e)
    _write_stamp(module)
    return module, None


def extension() -> Optional[ModuleType]:
    """The built extension module (built on the first call of the first process on this machine),
    or None when it cannot be built or loaded (see `build_error`)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded[0]


def build_error() -> Optional[str]:
    """None when the C++ kernels build/load here, else why not (one line)."""
    extension()
    return _loaded[1]


def main() -> int:
    start = time.perf_counter()
    module, error = _load(verbose="-v" in sys.argv[1:])
    if error is not None:
        print(f"hash grid C++ kernels: not built ({error}); the torch backend will run", file=sys.stderr)
        return 0  # not fatal: `backend: auto` falls back to torch
    print(f"hash grid C++ kernels: ready in {time.perf_counter() - start:.1f} s ({module.__file__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
