"""The compiled extension of threeg-kernels (metadata and dependencies: pyproject.toml).

The Python package works on its own (backends 'reference' and 'torch'; 'triton' where Triton and a
GPU are present). The compiled extension `threeg_kernels._C` (backend 'ext', csrc/) is added by
`extension_modules()`; when it is not built, the package still imports and
`python -m threeg_kernels` says why 'ext' is missing.

Install for development without build isolation, so the extension compiles against the torch that
is already installed (an isolated build would download a second torch):
    pip install --no-build-isolation -e .

Switches (environment variables):
    THREEG_BUILD_EXT=0      build no extension at all (the 'ext' backend is then missing)
    THREEG_BUILD_CUDA=0|1   force the CUDA kernels off / on (default: on when the toolchain is usable:
                            torch has CUDA, nvcc of the same major version runs, the CUDA headers are found)
    CUDA_HOME               the toolkit root (default: the first of $CUDA_PATH, /usr/local/cuda with bin/nvcc)
    TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0")
    MAX_JOBS                parallel compile jobs (default: ninja's, CPUs + 2); also caps nvcc's --threads

The sources compile in parallel (ninja): csrc/ops.cpp, csrc/cpu/*.cpp (the CPU kernels once per instruction
set: csrc/cpu/cpu_variants.h) and, with CUDA,
csrc/cuda/cov_pool_ext.cu, whose nvcc job is the longest; nvcc's --threads compiles its architectures
in parallel (see _nvcc_threads).
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"threeg-kernels setup: {msg}", file=sys.stderr)


def _remove_stale_extension() -> None:
    """An earlier editable build's _C*.so (perhaps with CUDA, perhaps for another Python) would still load."""
    for path in glob.glob(os.path.join(HERE, "threeg_kernels", "_C*.so")):
        os.remove(path)


def _flag(name: str):
    """True / False for an environment switch set to 1 / 0, None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"{name} must be 0 or 1; got {os.environ[name]!r}")


def _cuda_toolchain():
    """(None, include dirs) when the CUDA part can be built here, else (reason, [])."""
    import torch

    if not torch.version.cuda:
        return "this torch has no CUDA (torch.version.cuda is None)", []
    # The nvcc on PATH may be a wrapper outside the toolkit, from which torch would guess CUDA_HOME wrong.
    if not os.environ.get("CUDA_HOME"):
        for root in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = root
                break
        else:
            return "no CUDA toolkit found (set CUDA_HOME to the toolkit root)", []
    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} does not run ({exc})", []
    found = re.search(r"release (\d+)\.(\d+)", version)
    major = torch.version.cuda.split(".")[0]
    if not found or found.group(1) != major:
        return f"nvcc {found.group(0) if found else '?'} does not match torch's CUDA {torch.version.cuda}", []
    # The CUDA library headers (cusparse.h, cublas_v2.h, ...) that ATen's CUDA headers include: in the
    # toolkit, or in the NVIDIA wheels next to torch (site-packages/nvidia/cu<major>/include).
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs = [d for d in (os.path.join(site, "nvidia", f"cu{major}", "include"),) if os.path.isdir(d)]
    if not any(
        os.path.exists(os.path.join(d, "cusparse.h"))
        for d in include_dirs + [os.path.join(os.environ["CUDA_HOME"], "include")]
    ):
        return "the CUDA library headers (cusparse.h) were not found", []
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return None, include_dirs


def _nvcc_threads() -> int:
    """Threads for nvcc: the .cu file is the longest job of the build (its host front end, cudafe++, then
    per architecture cicc + ptxas, then the host compile), and nvcc runs those steps one after the other
    unless told otherwise. With --threads each architecture's device compile runs in a thread of its own,
    alongside cudafe++; ninja meanwhile compiles the C++ sources (MAX_JOBS caps ninja's jobs, and here
    nvcc's threads too)."""
    archs = len([a for a in re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "")) if a])
    limit = os.environ.get("MAX_JOBS", "")
    cpus = int(limit) if limit.isdigit() and int(limit) > 0 else (os.cpu_count() or 1)
    return max(1, min(archs + 1, cpus))


def extension_modules():
    """The compiled extension's modules and build command class (csrc/: CPU always, CUDA when usable)."""
    if _flag("THREEG_BUILD_EXT") is False:
        _remove_stale_extension()
        _say("THREEG_BUILD_EXT=0: not building threeg_kernels._C (backend 'ext' will be missing)")
        return [], {}

    force_cuda = _flag("THREEG_BUILD_CUDA")
    include_dirs = []
    if force_cuda is False:
        with_cuda = False
        _say("THREEG_BUILD_CUDA=0: building the CPU kernels only")
    else:
        reason, include_dirs = _cuda_toolchain()
        if reason is not None and force_cuda:
            raise SystemExit(f"THREEG_BUILD_CUDA=1 but the CUDA part cannot be built: {reason}")
        with_cuda = reason is None
        if reason is not None:
            _say(f"skipping the CUDA kernels: {reason}")

    # Imported only now: it reads CUDA_HOME at import time.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # The CPU kernels once per instruction set (csrc/cpu/cpu_variants.h): the baseline, x86-64-v3 and x86-64-v4.
    cpu = ["cov_pool_ext.cpp", "kernels_baseline.cpp", "kernels_x86_64_v3.cpp", "kernels_x86_64_v4.cpp"]
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + [f"csrc/cpu/{name}" for name in cpu]
    cxx, link = ["-O3", "-g0"], []
    import torch

    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is a header template around `#pragma omp parallel`: without -fopenmp it runs on
        # one thread. The libgomp that torch ships is already loaded, so no second OpenMP runtime comes in.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        _say(
            f"building the CUDA kernels (CUDA_HOME={os.environ['CUDA_HOME']}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
        ext = CUDAExtension(
            "threeg_kernels._C",
            sources + ["csrc/cuda/cov_pool_ext.cu"],
            include_dirs=include_dirs,
            define_macros=[("THREEG_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", f"--threads={_nvcc_threads()}"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("threeg_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            _remove_stale_extension()
            super().run()

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = extension_modules()

# Package metadata, version and dependencies live in pyproject.toml; this file adds the compiled extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
