"""Builds sa_cuda._C: the C++ CPU kernels always, the CUDA kernels when torch and nvcc allow.

Metadata and the version live in pyproject.toml (the version in sa_cuda/_version.py). Importing
this file only describes the extension; every decision that depends on the machine (CUDA or not,
the CUDA toolkit and architectures, the CPU ISA) is taken when build_ext runs, by BuildSACuda.

The CUDA kernels (csrc/cuda/*.cu) are built when torch is a CUDA build and nvcc is found (CUDA_HOME,
else the toolkit behind the nvcc on PATH, even when that nvcc is a wrapper script). With no GPU
visible and no TORCH_CUDA_ARCH_LIST, they are built for sm_80 and sm_90.

Environment (all optional):
  SA_CUDA_CPU_ISA   avx2 | default: the vector ISA of the CPU kernels. Default: avx2 when the
                    building machine's CPU has AVX2 and FMA (the import refuses to run AVX2 kernels
                    on a CPU without them), else the portable build.
  SA_CUDA_NO_CUDA   1: build the CPU kernels only.
  SA_CUDA_REQUIRE_CUDA  1: fail unless the CUDA kernels are built (CI sets it).
  CUDA_HOME         the CUDA toolkit to build with (CUDA_PATH is read too).
  TORCH_CUDA_ARCH_LIST  the CUDA architectures, e.g. "8.0;9.0" (default: the visible GPU's, else
                    8.0;9.0).
  MAX_JOBS          parallel compile jobs (ninja), as for any torch extension.
"""

import glob
import os
import platform
import re
import shutil
import subprocess

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCES = ("csrc/cuda/*.cpp", "csrc/cuda/*.cu")


def is_toolkit(path) -> bool:
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
    )


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
        dry = subprocess.run(
            [nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.MULTILINE)
        if top and is_toolkit(os.path.realpath(top.group(1).strip())):
            return os.path.realpath(top.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def cuda_toolkit():
    """The CUDA toolkit to build the CUDA kernels with, or None for a CPU-only build."""
    required = os.environ.get("SA_CUDA_REQUIRE_CUDA", "0") == "1"
    if os.environ.get("SA_CUDA_NO_CUDA", "0") == "1" or torch.version.cuda is None:
        if required:
            raise RuntimeError(
                "SA_CUDA_REQUIRE_CUDA=1 but torch is not a CUDA build (or SA_CUDA_NO_CUDA=1)"
            )
        return None
    home = find_cuda_home()
    if home is None:
        if required:
            raise RuntimeError("SA_CUDA_REQUIRE_CUDA=1 but no CUDA toolkit (nvcc) was found")
        print(
            "sa_cuda: torch is a CUDA build but no CUDA toolkit (nvcc) was found: CPU kernels only"
        )
    return home


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


def cxx_flags(isa: str) -> list:
    # -g0: Python's own CFLAGS (which torch's build passes on) ask for debug info, which doubled
    # the compile time of the torch headers and is of no use in a release build.
    flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if isa == "avx2":
        # at::vec::Vectorized picks its AVX2 implementation from these macros (its exp calls
        # the Sleef functions exported by libtorch_cpu).
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def sources(patterns) -> list:
    """Relative paths (setuptools wants them so for sdists), globbed: no file list to keep up to date."""
    return sorted(path for pattern in patterns for path in glob.glob(pattern, root_dir=ROOT))


def extension(cuda_home, isa: str):
    """sa_cuda._C: the CPU kernels, plus the CUDA kernels when cuda_home is a toolkit."""
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if cuda_home is None:
        return CppExtension(
            "sa_cuda._C", sources(CPU_SOURCES), extra_compile_args={"cxx": cxx_flags(isa)}, **common
        )
    return CUDAExtension(
        "sa_cuda._C",
        sources(CPU_SOURCES + CUDA_SOURCES),
        extra_compile_args={
            "cxx": cxx_flags(isa) + ["-DSA_CUDA_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-DSA_CUDA_WITH_CUDA"],
        },
        **common,
    )


class BuildSACuda(BuildExtension):
    """torch's build_ext (ninja) that first chooses CUDA or not, the toolkit, the architectures and
    the CPU ISA, and after a successful build writes sa_cuda/_build_info.py beside the extension."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, use_ninja=True)

    def run(self):
        self.cuda_home = cuda_toolkit()
        self.isa = cpu_isa()
        if self.cuda_home is not None:
            # torch.utils.cpp_extension read its CUDA_HOME when imported, from the nvcc on PATH,
            # which may be a wrapper script outside the toolkit.
            os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = self.cuda_home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
            print(
                f"sa_cuda: building the CUDA kernels with {self.cuda_home} for TORCH_CUDA_ARCH_LIST="
                f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(this GPU)')}"
            )
        # Configures the described extension in place: setuptools has annotated that object (its
        # full name, output file) when it finalized this command.
        configured = extension(self.cuda_home, self.isa)
        for ext in self.extensions:
            vars(ext).update({k: v for k, v in vars(configured).items() if not k.startswith("_")})
        super().run()
        self.write_build_info()

    def build_info_path(self) -> str:
        """Beside the built sa_cuda/_C: in the source tree for --inplace (and editable installs),
        else in build_lib, which the wheel is made from."""
        if self.inplace:
            package_dir = self.get_finalized_command("build_py").get_package_dir("sa_cuda")
        else:
            package_dir = os.path.join(self.build_lib, "sa_cuda")
        return os.path.join(package_dir, "_build_info.py")

    def write_build_info(self):
        """What this build targets, for `python -m sa_cuda`."""
        archs = (
            os.environ.get("TORCH_CUDA_ARCH_LIST", "this machine's GPU") if self.cuda_home else ""
        )
        with open(self.build_info_path(), "w") as f:
            f.write("# Written by setup.py (build_ext) at build time.\n")
            f.write(
                f"CPU_ISA = {self.isa!r}\nCUDA_ARCHS = {archs!r}\nCUDA_HOME = {self.cuda_home!r}\n"
            )

    def get_outputs(self):
        return super().get_outputs() + [self.build_info_path()]


setup(
    # Replaced by BuildSACuda.run with the one for the building machine; this one names the module
    # and its sources for the commands that build nothing (sdist, egg_info).
    ext_modules=[extension(cuda_home=None, isa="default")],
    cmdclass={"build_ext": BuildSACuda},
)
