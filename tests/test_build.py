"""The JIT build: cache key, reference fallback when no compiler works, and the hard-error switch."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtreelora.core import build as _build

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    for name in ("FEDTREELORA_REQUIRE_NATIVE", "FEDTREELORA_DISABLE_NATIVE"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def test_cache_key_follows_sources_and_flags(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(_build.source_dir(), csrc)
    before = _build.build_plan(csrc).key()
    assert before == _build.build_plan(csrc).key()
    header = next(csrc.glob("include/*.h"))
    header.write_text(header.read_text() + "\n// touched\n")
    assert _build.build_plan(csrc).key() != before, "a header change must invalidate the cached build"
    touched = _build.build_plan(csrc)
    touched.cflags = touched.cflags + ["-DEXTRA"]
    assert touched.key() != _build.build_plan(csrc).key(), "a flag change must invalidate the cached build"


def test_plan_lists_every_cpu_kernel_and_cuda_only_when_asked(monkeypatch):
    monkeypatch.setenv("FEDTREELORA_WITH_CUDA", "0")
    plan = _build.build_plan()
    names = {p.name for p in plan.sources}
    assert "ops.cpp" in names and all(not n.endswith(".cu") for n in names)
    assert {p.name for p in _build.source_dir().glob("cpu/*.cpp")} <= names
    monkeypatch.setenv("FEDTREELORA_WITH_CUDA", "1")
    cuda_plan = _build.build_plan()
    assert {p.name for p in _build.source_dir().glob("cuda/*.cu")} <= {p.name for p in cuda_plan.sources}
    assert cuda_plan.key() != plan.key()


CHECK_FALLBACK = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fedtreelora
    assert not caught, "import fedtreelora must not build anything"
    assert not fedtreelora.native_available()
assert any("reference implementation" in str(w.message) for w in caught), [str(w.message) for w in caught]
per_layer, mean = fedtreelora.ops.layer_distances(torch.eye(3), torch.tensor([0, 3]))
assert torch.allclose(mean, torch.full((3, 3), 2 ** 0.5) - torch.eye(3) * 2 ** 0.5)
print("FALLBACK-OK")
"""


def test_broken_compiler_falls_back_to_reference_with_one_warning(tmp_path):
    proc = _run(CHECK_FALLBACK, FEDTREELORA_CACHE_DIR=str(tmp_path), CXX="/bin/false", FEDTREELORA_WITH_CUDA="0")
    assert "FALLBACK-OK" in proc.stdout, proc.stdout + proc.stderr


def test_require_native_turns_a_failed_build_into_an_import_error(tmp_path):
    proc = _run("import torch, fedtreelora; print('IMPORTED', flush=True); "
                "fedtreelora.ops.linkage(torch.zeros(2, 2, dtype=torch.float64))",
                FEDTREELORA_CACHE_DIR=str(tmp_path), CXX="/bin/false", FEDTREELORA_WITH_CUDA="0",
                FEDTREELORA_REQUIRE_NATIVE="1")
    assert proc.returncode != 0 and "IMPORTED" in proc.stdout, "the import itself must not build, the first op must"
    assert "ImportError" in proc.stderr and "native core could not be built" in proc.stderr, proc.stderr


def test_import_is_light_and_builds_nothing(tmp_path):
    """`import fedtreelora` loads neither transformers, peft nor flwr, and compiles nothing."""
    code = ("import sys, fedtreelora; heavy = [m for m in ('transformers', 'peft', 'flwr', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy; assert not fedtreelora.core.build.native_info()['native']; "
            "import os; assert not os.listdir(os.environ['FEDTREELORA_CACHE_DIR']); print('LIGHT')")
    proc = _run(code, FEDTREELORA_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0 and "LIGHT" in proc.stdout, proc.stderr


def test_disable_native_uses_the_reference():
    proc = _run("import fedtreelora; assert not fedtreelora.native_available(); "
                "print(fedtreelora.core.build.native_info()['error'])", FEDTREELORA_DISABLE_NATIVE="1")
    assert proc.returncode == 0 and "FEDTREELORA_DISABLE_NATIVE" in proc.stdout, proc.stderr


@pytest.mark.skipif(os.environ.get("FEDTREELORA_REQUIRE_NATIVE") != "1", reason="the suite runs without the native requirement")
def test_native_core_is_loaded_with_every_op():
    import fedtreelora

    assert fedtreelora.native_available(), _build.native_info()
    for op in ("layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fedtreelora::{op}", "CPU"), op


def test_parallel_loops_are_compiled_with_openmp_when_torch_uses_it():
    """at::parallel_for is an `omp parallel` pragma in ATen's headers: a build without -fopenmp runs
    every kernel's parallel loop on one thread (silently: the pragma is just unknown)."""
    if not _build._torch_uses_openmp():
        pytest.skip("torch's parallel backend is not OpenMP here")
    plan = _build.build_plan()
    assert "-fopenmp" in plan.cflags and "-fopenmp" in plan.ldflags
    import fedtreelora

    library = _build.native_info().get("library") if fedtreelora.native_available() else None
    readelf = shutil.which("readelf")
    if library and readelf:
        needed = subprocess.run([readelf, "-d", library], capture_output=True, text=True, check=True).stdout
        assert "libgomp" in needed or "libomp" in needed, needed


def _kernel_signatures(backend_dir: str) -> dict[str, tuple[str, list[str]]]:
    """op -> (return type, parameter types) of the kernel each m.impl("op", &fn) registers in csrc/<dir>."""
    import re

    sources = {p: p.read_text() for p in sorted((ROOT / "csrc" / backend_dir).glob("*.c*"))}
    text = "\n".join(sources.values())
    found = {}
    registered = re.findall(r'm\.impl\("(\w+)",\s*&(?:\w+::)*(\w+)\)', text)
    # Every registration must have the `m.impl("op", &function)` form this test reads (not a lambda).
    assert len(registered) == text.count("m.impl("), f"a kernel in csrc/{backend_dir} is registered in another form"
    for op, fn in registered:
        match = re.search(r"^([\w:<>, ]+?)\s+" + fn + r"\(([^)]*)\)\s*\{", text, re.M)
        assert match, f"no definition of {fn} (the {backend_dir} kernel of {op})"
        params = [" ".join(p.split()[:-1]) for p in re.split(r",(?![^<]*>)", match.group(2)) if p.strip()]
        found[op] = (" ".join(match.group(1).split()), params)
    return found


def test_cpu_and_cuda_kernels_of_an_op_share_one_cpp_signature():
    """The dispatcher aborts the process at load time ("Mismatch in kernel C++ signatures") when an op's
    CPU and CUDA kernels take different C++ types; only the CUDA build (scripts/cuda_check.sh) would
    show it, so the sources are compared here on every machine."""
    cpu, cuda = _kernel_signatures("cpu"), _kernel_signatures("cuda")
    assert set(cpu) == {"layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows"}, cpu
    assert set(cuda) <= set(cpu), cuda
    for op, signature in cuda.items():
        assert signature == cpu[op], f"{op}: CPU kernel {cpu[op]} but CUDA kernel {signature}"
