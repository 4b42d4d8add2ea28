"""Builds (once, cached under build/emulation) and loads the emulation build of the CUDA kernels:
torch.ops.sa_cuda_emu.* run csrc/cuda's kernels on CPU tensors through the SIMT emulator, with the
fake kernels, vmap rules and autograd of sa_cuda.ops.register_library, so that
``emulated_library().apply(variant, ...)`` or ``sa_cuda.sa_layer(..., library=emulated_library())``
takes the public functionals' path. Also builds the native drivers under tests/native (standalone
binaries of emulated kernels).

``python tests/emulation.py`` builds all of these ahead of the suite (CI runs it while sa_cuda
itself builds): they need torch, not sa_cuda."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NATIVE_BUILD = os.path.join(ROOT, "build", "native")
TORCH_DIR = os.path.dirname(torch.__file__)

# The native drivers and the builds of them that the tests run.
KERNEL_SELFTEST = os.path.join(ROOT, "tests", "native", "kernel_selftest.cpp")
EMULATOR_SELFTEST = os.path.join(ROOT, "tests", "native", "emulator_selftest.cpp")
SANITIZERS = (None, "thread", "address")  # kernel_selftest: plain and under each sanitizer
UCONTEXT = (
    "SA_EMU_UCONTEXT=1",
)  # the emulator's fibers on glibc's swapcontext (emulator_fibers.h)


@contextlib.contextmanager
def _ninja_beside_the_interpreter():
    """PATH with this interpreter's bin folder first while torch runs ninja, when that folder has a
    ninja (requirements-dev.txt installs one into .venv). ninja logs a hash of each command to tell
    whether a target is out of date, and ninja versions hash differently: built by the system's
    ninja (PATH without .venv/bin: `.venv/bin/python tests/emulation.py`, as CI ran it) and then by
    .venv's (an activated venv: scripts/test.sh), the library was rebuilt, 40 s, at every switch."""
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bin_dir, "ninja")):
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def build_emulation() -> None:
    """Compiles (cached) and loads the emulation library, which defines torch.ops.sa_cuda_emu.*."""
    build = os.path.join(ROOT, "build", "emulation")
    os.makedirs(build, exist_ok=True)
    with _ninja_beside_the_interpreter():
        load(
            name="sa_cuda_emulation",
            sources=[
                os.path.join(CSRC, "host.cpp"),
                os.path.join(CSRC, "emulation", "emulated_ops.cpp"),
            ],
            extra_include_paths=[CSRC],
            extra_cflags=["-O2", "-std=c++20", "-pthread"],
            extra_ldflags=["-pthread"],
            build_directory=build,
            is_python_module=False,
            verbose=False,
        )


@functools.cache
def load_emulation():
    build_emulation()
    # Imported here, not at the top: `python tests/emulation.py` builds before sa_cuda is built.
    from sa_cuda.ops import register_library

    register_library("sa_cuda_emu")
    return torch.ops.sa_cuda_emu


def emulated_library():
    """The emulated kernels as an OpLibrary (built and loaded first if need be)."""
    from sa_cuda.ops import register_library

    load_emulation()
    return register_library("sa_cuda_emu")


def _newest_input_mtime(source: str) -> float:
    paths = [source]
    for folder in (CSRC, os.path.join(CSRC, "cuda")):
        paths += [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".h", ".cuh"))]
    return max(os.path.getmtime(p) for p in paths)


def build_native(source: str, sanitizer: str | None = None, defines: tuple = ()) -> str:
    """Compiles a tests/native driver (no Python, no libtorch_cpu: only libc10), plain or under
    -fsanitize=<sanitizer> (at -O0), with the macros `defines` ("NAME=VALUE"); cached until it or a kernel
    header changes. Returns the binary."""
    os.makedirs(NATIVE_BUILD, exist_ok=True)
    name = os.path.splitext(os.path.basename(source))[0]
    variant = "".join(f"_{d.replace('=', '')}" for d in defines)
    binary = os.path.join(NATIVE_BUILD, f"{name}_{sanitizer or 'plain'}{variant}")
    if os.path.exists(binary) and os.path.getmtime(binary) > _newest_input_mtime(source):
        return binary
    cmd = [
        "g++",
        "-std=c++20",
        # Plain: -O1, so that the optimizer has its say on the kernels' source. Under a sanitizer:
        # -O0, which instruments every access the source makes, and compiles in a third of the time
        # (the AddressSanitizer build took a minute at -O1).
        "-O0" if sanitizer else "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-pthread",
        "-I",
        CSRC,
        "-I",
        os.path.join(TORCH_DIR, "include"),
        source,
        "-L",
        os.path.join(TORCH_DIR, "lib"),
        "-lc10",
        f"-Wl,-rpath,{os.path.join(TORCH_DIR, 'lib')}",
        "-o",
        binary,
    ]
    if sanitizer:
        cmd.insert(1, f"-fsanitize={sanitizer}")
    cmd[1:1] = [f"-D{d}" for d in defines]
    # Built under a name of this process's own, then renamed: pytest-xdist workers that build the
    # same driver at once never run (or overwrite) a half-written binary.
    partial = f"{binary}.{os.getpid()}.partial"
    cmd[cmd.index(binary)] = partial
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(partial, binary)
    return binary


if __name__ == "__main__":
    build_emulation()
    for sanitizer in SANITIZERS:
        build_native(KERNEL_SELFTEST, sanitizer)
    for defines in ((), UCONTEXT):
        build_native(EMULATOR_SELFTEST, defines=defines)
    print(f"emulation: built {os.path.join(ROOT, 'build')}/{{emulation,native}}")
