"""Builds sa_cuda._C: the C++ CPU kernels always, the CUDA kernels when torch and nvcc allow.

The CUDA kernels (csrc/cuda/*.cu) are built when torch is a CUDA build and nvcc is found (CUDA_HOME,
else the toolkit behind the nvcc on PATH, even when that nvcc is a wrapper script). With no GPU
visible and no TORCH_CUDA_ARCH_LIST, they are built for sm_80 and sm_90.

Environment (all optional):
  SA_CUDA_CPU_ISA   avx2 | default: the vector ISA of the CPU kernels. Default: avx2 when the
                    building machine's CPU has AVX2 and FMA (the import refuses to run AVX2 kernels
                    on a CPU without them), else the portable build.
  SA_CUDA_NO_CUDA   1: build the CPU kernels only.
  SA_CUDA_REQUIRE_CUDA  1: fail unless the CUDA kernels are built (CI sets it).
  CUDA_HOME         the CUDA toolkit to build with.
  TORCH_CUDA_ARCH_LIST, MAX_JOBS   as for any torch extension.
"""

import glob
import os
import platform
import re
import shutil
import subprocess

import torch
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def is_toolkit(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root, or None. torch guesses it from the nvcc on PATH, which is wrong when
    that nvcc is a wrapper script outside the toolkit; nvcc's dry run names its real TOP."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if is_toolkit("/usr/local/cuda") else None
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_toolkit(candidate):
        return candidate
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.MULTILINE)
        if top and is_toolkit(os.path.realpath(top.group(1).strip())):
            return os.path.realpath(top.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def with_cuda():
    required = os.environ.get("SA_CUDA_REQUIRE_CUDA", "0") == "1"
    if os.environ.get("SA_CUDA_NO_CUDA", "0") == "1" or torch.version.cuda is None:
        if required:
            raise RuntimeError("SA_CUDA_REQUIRE_CUDA=1 but torch is not a CUDA build (or SA_CUDA_NO_CUDA=1)")
        return None
    home = find_cuda_home()
    if home is None:
        if required:
            raise RuntimeError("SA_CUDA_REQUIRE_CUDA=1 but no CUDA toolkit (nvcc) was found")
        print("sa_cuda: torch is a CUDA build but no CUDA toolkit (nvcc) was found: CPU kernels only")
        return None
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return home


CUDA_HOME = with_cuda()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def cpu_isa() -> str:
    isa = os.environ.get("SA_CUDA_CPU_ISA", "avx2" if cpu_has_avx2() else "default").lower()
    if isa not in ("avx2", "default"):
        raise ValueError(f"SA_CUDA_CPU_ISA must be 'avx2' or 'default', got {isa!r}")
    return isa


def cxx_flags() -> list:
    flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if cpu_isa() == "avx2":
        # at::vec::Vectorized picks its AVX2 implementation from these macros (its exp calls
        # the Sleef functions exported by libtorch_cpu).
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if CUDA_HOME is None:
        return CppExtension("sa_cuda._C", sources, extra_compile_args={"cxx": cxx_flags()}, **common)
    print(f"sa_cuda: building the CUDA kernels with {CUDA_HOME} for TORCH_CUDA_ARCH_LIST="
          f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(this GPU)')}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return CUDAExtension(
        "sa_cuda._C",
        sources,
        extra_compile_args={"cxx": cxx_flags() + ["-DSA_CUDA_WITH_CUDA"],
                            "nvcc": ["-O3", "-lineinfo", "-DSA_CUDA_WITH_CUDA"]},
        **common,
    )


def write_build_info():
    """sa_cuda/_build_info.py: what this build targets, for `python -m sa_cuda`."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "this machine's GPU") if CUDA_HOME else ""
    with open(os.path.join(ROOT, "sa_cuda", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CPU_ISA = {cpu_isa()!r}\nCUDA_ARCHS = {archs!r}\nCUDA_HOME = {CUDA_HOME!r}\n")


write_build_info()

setup(
    name="sa_cuda",
    version="0.1.0",
    description="Fused Shuffle Attention (SA-Net) forward and backward kernels for PyTorch",
    packages=find_packages(include=["sa_cuda", "sa_cuda.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],  # the oldest torch CI tests (scripts/test_oldest_torch.sh)
)
