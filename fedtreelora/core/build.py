"""Just-in-time build of the native core (torch.utils.cpp_extension.load + ninja) on the first op call.

Order of attempts, first that works wins:
1. an ahead-of-time build shipped with the package (`pip install .` with FEDTREELORA_BUILD_EXT=1);
2. a cached JIT build keyed by the sources, flags, torch version and backend (CPU or CPU+CUDA);
3. a fresh JIT build into that cache, under a file lock so that concurrent imports build once.
If all fail, `fedtreelora.ops` runs every op through `fedtreelora/core/reference.py` and a warning is
issued once, unless FEDTREELORA_REQUIRE_NATIVE=1, which turns the failure into an ImportError. Nothing is
built at `import fedtreelora`: the first op call (or `fedtreelora.native_available()`) does it.

Environment variables:
  FEDTREELORA_REBUILD=1          discard the cached build and compile again
  FEDTREELORA_VERBOSE_BUILD=1    show the compiler and ninja output
  FEDTREELORA_REQUIRE_NATIVE=1   fail loudly instead of falling back to the reference ops
  FEDTREELORA_DISABLE_NATIVE=1   never build or load the native core (reference ops only)
  FEDTREELORA_WITH_CUDA=0|1      force the CUDA kernels off or on (default: on when torch has CUDA
                                 and a CUDA toolkit is found; "1" builds them without a device)
  FEDTREELORA_CACHE_DIR=PATH     where builds are cached (default ~/.cache/fedtreelora)
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

_STATE: dict = {"loaded": None, "error": None, "library": None}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def source_dir() -> Path:
    """The csrc folder: inside the installed package, or at the root of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"fedtreelora: C++ sources not found next to {package} (looked for csrc/ops.cpp)")


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _nvtx_include_dirs() -> list[Path]:
    """Folders holding the header-only nvtx3/nvToolsExt.h (CUDA toolkit or the nvidia pip wheels)."""
    roots = []
    if _cuda_home():
        roots.append(Path(_cuda_home()) / "include")
    roots += [Path(p) for p in ("/usr/local/cuda/include", "/usr/include")]
    roots += [Path(p) for p in glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*", "include"))]
    return [r for r in roots if (r / "nvtx3" / "nvToolsExt.h").is_file()][:1]


def _cuda_extra_include_dirs() -> list[Path]:
    """cuBLAS/cuSPARSE headers from the nvidia-* wheels a CUDA build of torch depends on."""
    pattern = os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "cu*", "include")
    return [Path(p) for p in glob.glob(pattern)]


def _want_cuda() -> bool:
    forced = os.environ.get("FEDTREELORA_WITH_CUDA")
    if forced is not None and forced.strip() != "":
        return _flag("FEDTREELORA_WITH_CUDA")
    return torch.version.cuda is not None and _cuda_home() is not None and torch.cuda.is_available()


@dataclasses.dataclass
class BuildPlan:
    sources: list[Path]
    include_dirs: list[Path]
    cflags: list[str]
    cuda_cflags: list[str]
    ldflags: list[str]
    with_cuda: bool

    def key(self) -> str:
        """Cache key: every source and header, the flags, torch's version and its CUDA version."""
        h = hashlib.sha256()
        root = self.sources[0].parent
        for path in sorted(set(self.sources) | set(root.rglob("*.h"))):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        for part in (self.cflags, self.cuda_cflags, self.ldflags, [str(p) for p in self.include_dirs]):
            h.update(repr(part).encode())
        h.update(f"{torch.__version__}|{torch.version.cuda}|{self.with_cuda}|{sys.version_info[:2]}".encode())
        if self.with_cuda:  # a build for other architectures fails at its first launch ("no kernel image")
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or sorted(
                {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            h.update(repr(archs).encode())
        return h.hexdigest()[:16]


def _torch_uses_openmp() -> bool:
    """Whether torch's intra-op parallel backend is OpenMP (GCC/clang on Linux take -fopenmp)."""
    return sys.platform.startswith("linux") and "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def build_plan(csrc: Path | None = None) -> BuildPlan:
    csrc = Path(csrc) if csrc is not None else source_dir()
    with_cuda = _want_cuda()
    sources = [csrc / "ops.cpp"] + sorted(csrc.glob("cpu/*.cpp"))
    include_dirs = [csrc / "include"]
    # -ffp-contract=off: no fused multiply-adds, so linkage heights stay bit-equal to scipy's everywhere
    cflags = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    cuda_cflags = ["-O3", "--expt-relaxed-constexpr"]
    ldflags: list[str] = []
    # With torch's OpenMP backend, at::parallel_for is an `omp parallel` pragma in ATen's headers:
    # compiled without -fopenmp it is a serial loop (and the only sign is the unknown-pragma warning).
    if _torch_uses_openmp():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    nvtx = _nvtx_include_dirs()
    if nvtx:
        include_dirs += nvtx
        cflags.append("-DFEDTREELORA_NVTX=1")
        cuda_cflags.append("-DFEDTREELORA_NVTX=1")
    if with_cuda:
        sources += sorted(csrc.glob("cuda/*.cu"))
        include_dirs += _cuda_extra_include_dirs()
        cflags.append("-DFEDTREELORA_WITH_CUDA=1")
        cuda_cflags.append("-DFEDTREELORA_WITH_CUDA=1")
    return BuildPlan(sources, include_dirs, cflags, cuda_cflags, ldflags, with_cuda)


def cache_dir() -> Path:
    root = os.environ.get("FEDTREELORA_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "fedtreelora"


def _library_name(plan: BuildPlan) -> str:
    return f"fedtreelora_C_{plan.key()}"


def _ahead_of_time_library() -> Path | None:
    package = Path(__file__).resolve().parent.parent
    hits = sorted(package.glob("_C*.so"))
    return hits[0] if hits else None


def _jit_build(plan: BuildPlan) -> Path:
    from filelock import FileLock
    from torch.utils import cpp_extension

    name = _library_name(plan)
    build_dir = cache_dir() / name
    library = build_dir / f"{name}.so"
    cache_dir().mkdir(parents=True, exist_ok=True)
    verbose = _flag("FEDTREELORA_VERBOSE_BUILD")
    # One builder at a time per key; the others wait, then find the finished library.
    with FileLock(str(cache_dir() / f"{name}.lock"), timeout=1800):
        if _flag("FEDTREELORA_REBUILD") and build_dir.exists() and not _STATE.get("rebuilt"):
            shutil.rmtree(build_dir)
            _STATE["rebuilt"] = True
        if library.is_file():
            return library
        build_dir.mkdir(parents=True, exist_ok=True)
        if not verbose:
            print("fedtreelora: building the native core (first use only, about a minute)...", file=sys.stderr)
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in plan.sources],
            extra_include_paths=[str(p) for p in plan.include_dirs],
            extra_cflags=plan.cflags,
            extra_cuda_cflags=plan.cuda_cflags,
            extra_ldflags=plan.ldflags,
            build_directory=str(build_dir),
            with_cuda=plan.with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
        if not library.is_file():
            raise RuntimeError(f"the build finished but {library} is missing")
        return library


def load_native() -> bool:
    """Load the native ops into torch.ops.fedtreelora. Returns False (reference fallback) on failure."""
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    if _flag("FEDTREELORA_DISABLE_NATIVE"):
        _STATE.update(loaded=False, error="disabled by FEDTREELORA_DISABLE_NATIVE=1")
        return False
    try:
        library = _ahead_of_time_library() if not _flag("FEDTREELORA_REBUILD") else None
        if library is None:
            library = _jit_build(build_plan())
        torch.ops.load_library(str(library))
        _STATE.update(loaded=True, library=str(library))
    except Exception as exc:  # any compiler, ninja or loader failure ends in the same fallback
        _STATE.update(loaded=False, error=f"{type(exc).__name__}: {exc}")
        if _flag("FEDTREELORA_REQUIRE_NATIVE"):
            raise ImportError(f"fedtreelora: the native core could not be built or loaded: {exc}") from exc
        warnings.warn(
            "fedtreelora: the native core could not be built or loaded, so every op runs through the slow "
            f"reference implementation (fedtreelora/core/reference.py). Cause: {_STATE['error']}. "
            "Set FEDTREELORA_VERBOSE_BUILD=1 to see the build log, FEDTREELORA_REQUIRE_NATIVE=1 to make this an error.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _STATE["loaded"]


def native_info() -> dict:
    """What was loaded, from where, and why not if it failed."""
    return {"native": bool(_STATE["loaded"]), "library": _STATE["library"], "error": _STATE["error"]}
