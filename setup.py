"""Builds sa_cuda._C: the C++ CPU kernels always, the CUDA kernels when torch and nvcc allow.

Environment (all optional):
  SA_CUDA_CPU_ISA   avx2 | default: the vector ISA of the CPU kernels. Default: avx2 when the
                    building machine's CPU has AVX2 and FMA (the import refuses to run AVX2 kernels
                    on a CPU without them), else the portable build.
  MAX_JOBS          parallel compile jobs (torch.utils.cpp_extension).
"""

import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    return CppExtension(
        "sa_cuda._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags()},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="sa_cuda",
    version="0.1.0",
    description="Fused Shuffle Attention (SA-Net) forward and backward kernels for PyTorch",
    packages=find_packages(include=["sa_cuda", "sa_cuda.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
)
