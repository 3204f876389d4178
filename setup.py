"""Packaging: ship the C++/CUDA sources inside the package for the JIT build on first use.

`pip install .` copies csrc/ into fedtreelora/csrc so that an installed (non-editable) package
can build its extension from any folder. Setting FEDTREELORA_BUILD_EXT=1 also compiles the
extension ahead of time as `fedtreelora._C` (CUDA kernels too when a CUDA toolkit and a CUDA
build of torch are present); `fedtreelora/core/build.py` loads that one first when it exists.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """Copy csrc/ next to the Python files so the installed package can JIT-build itself."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fedtreelora" / "csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def ahead_of_time_extensions():
    if os.environ.get("FEDTREELORA_BUILD_EXT", "0") != "1":
        return [], {}
    from torch.utils import cpp_extension

    import importlib.util
    spec = importlib.util.spec_from_file_location("_ftl_build", ROOT / "fedtreelora" / "core" / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # dataclasses look their module up there
    spec.loader.exec_module(build)
    plan = build.build_plan(CSRC)
    if plan.with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # A wheel outlives the build machine: A100 and H100 code plus sm_90 PTX, which newer GPUs
        # JIT-compile (as CMakeLists.txt), rather than only the architectures of the GPUs seen here.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    kind = cpp_extension.CUDAExtension if plan.with_cuda else cpp_extension.CppExtension
    ext = kind(
        name="fedtreelora._C",
        sources=[str(s.relative_to(ROOT)) for s in plan.sources],
        include_dirs=[str(p) for p in plan.include_dirs],
        extra_compile_args={"cxx": plan.cflags, "nvcc": plan.cuda_cflags},
        extra_link_args=plan.ldflags,
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, ext_cmdclass = ahead_of_time_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass})
