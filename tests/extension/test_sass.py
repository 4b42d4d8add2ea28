"""The generated machine code (SASS) of the CUDA kernels, read from the built extension.

The emulator runs the kernels' source; what ptxas made of it is only visible in the binary. For
every SASS architecture in sa_cuda/_C*.so (sm_80 and sm_90 in CI), cuobjdump -sass lists each
kernel under a "Function : <mangled name>" header, and this file asserts per kernel:

- no local memory: no LDL/STL instruction in any kernel. Register spills are local memory, and so
  is any per-thread array the compiler could not keep in registers (a dynamically indexed one);
  both cost a round trip through L1/L2 per access, which these kernels are written to avoid. A
  stack frame alone is not the criterion (-res-usage STACK): a frame that is never accessed costs
  nothing, and any access to one is an LDL/STL, which this catches;
- the SALayer kernels whose pack is 16 bytes move their planes with 128-bit global loads and
  stores (LDG.E.128, STG.E.128): the packs exist to become these, and a change of alignment,
  layout or type can silently turn them into 2 or 4 narrower accesses; and the staged warp-team
  kernels (a pack of one element) read their chunk with LDG.E.128.

cuobjdump comes with the CUDA toolkit (CUDA_HOME/bin, or PATH) and with the triton wheel
(triton/backends/nvidia/bin). A build without CUDA kernels has no SASS to check: skipped."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

import sa_cuda

# sa_layer_{forward,backward}_kernel<scalar_t, kLanes, kVec, kPacks> (sa_layer_forward.cuh), mangled;
# kLanes: a warp team's lanes (32 or 8), 0 for a block team.
PLANE_KERNEL = re.compile(
    r"(sa_layer_(?:forward|backward)_kernel)I(N3c108BFloat16E|N3c104HalfE|f|d)"
    r"Li(\d+)ELi(\d+)ELi(\d+)E"
)
ELEMENT_BYTES = {"N3c108BFloat16E": 2, "N3c104HalfE": 2, "f": 4, "d": 8}
LOCAL_MEMORY = re.compile(r"\b(?:LDL|STL)\b")
LOAD_128 = re.compile(r"\bLDG\.E(?:\.\w+)*\.128\b")
STORE_128 = re.compile(r"\bSTG\.E(?:\.\w+)*\.128\b")
# 16-byte-pack instantiations per architecture: {forward, backward} x 4 dtypes x {warp team of
# 32 lanes, of 8 lanes, block team, streamed}. Guards against a listing this file no longer parses
# (a vacuous pass: until this count, the pattern had missed every kernel since a rename).
EXPECTED_16_BYTE_PLANE_KERNELS = 2 * 4 * 4


def _extension():
    pkg = os.path.dirname(sa_cuda.__file__)
    found = sorted(glob.glob(os.path.join(pkg, "_C*.so")) + glob.glob(os.path.join(pkg, "_C*.pyd")))
    return found[0] if found else None


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidates.append(os.path.join(CUDA_HOME, "bin", "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def parse_sass(listing: str) -> dict[tuple[str, str], str]:
    """{(arch, mangled kernel name): its SASS text} from a cuobjdump -sass listing."""
    kernels: dict[tuple[str, str], list[str]] = defaultdict(list)
    arch = None
    current = None
    for line in listing.splitlines():
        m = re.match(r"\s*(?:arch = |code for )(sm_\d+a?)\s*$", line)
        if m:
            arch, current = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            assert arch is not None, f"a function before any architecture header: {line}"
            current = (arch, m.group(1))
            continue
        if current is not None:
            kernels[current].append(line)
    return {key: "\n".join(lines) for key, lines in kernels.items()}


def parse_res_usage(listing: str) -> dict[tuple[str, str], str]:
    """{(arch, mangled kernel name): its resource line (REG:.. STACK:.. ...)} from -res-usage."""
    usage = {}
    arch = None
    lines = listing.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+a?)\s*$", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m and i + 1 < len(lines):
            usage[(arch, m.group(1))] = lines[i + 1].strip()
    return usage


def check_sass(kernels: dict[tuple[str, str], str], usage: dict[tuple[str, str], str]) -> list[str]:
    """Every violation of the module docstring's rules, as one line each (empty: all hold)."""
    problems = []
    sixteen_byte = defaultdict(int)
    for (arch, name), sass in sorted(kernels.items()):
        where = f"{arch} {name} [{usage.get((arch, name), 'no -res-usage line')}]"
        local = sorted(set(LOCAL_MEMORY.findall(sass)))
        if local:
            problems.append(f"{where}: local memory ({', '.join(local)}: spills or a local array)")
        m = PLANE_KERNEL.search(name)
        if not m:
            continue
        warp_team, vec = int(m.group(3)) > 0, int(m.group(4))
        pack_bytes = vec * ELEMENT_BYTES[m.group(2)]
        if pack_bytes == 16:
            sixteen_byte[arch] += 1
            if not LOAD_128.search(sass):
                problems.append(f"{where}: 16-byte packs but no LDG.E.128")
            if not STORE_128.search(sass):
                problems.append(f"{where}: 16-byte packs but no STG.E.128")
        elif warp_team and vec == 1 and not LOAD_128.search(sass):
            problems.append(f"{where}: staged warp team without LDG.E.128 for its chunk")
    for arch in sorted({arch for arch, _ in kernels}):
        if sixteen_byte[arch] != EXPECTED_16_BYTE_PLANE_KERNELS:
            problems.append(
                f"{arch}: {sixteen_byte[arch]} SALayer kernels with 16-byte packs, "
                f"expected {EXPECTED_16_BYTE_PLANE_KERNELS}"
            )
    return problems


@pytest.fixture(scope="module")
def sass():
    lib = _extension()
    if lib is None:
        pytest.skip("sa_cuda/_C*.so is not built (python setup.py build_ext --inplace)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip(
            "no cuobjdump: neither in the CUDA toolkit (CUDA_HOME/bin, PATH) nor in the triton wheel"
        )
    listing = subprocess.run([tool, "-sass", lib], capture_output=True, text=True)
    kernels = parse_sass(listing.stdout)
    if not kernels:
        if "does not contain device code" in listing.stderr:
            pytest.skip(
                f"{os.path.basename(lib)} holds no device code (a build without CUDA kernels)"
            )
        pytest.fail(
            f"cuobjdump -sass {lib} listed no kernel (exit {listing.returncode}): "
            f"{listing.stderr.strip()[:500]}"
        )
    usage = parse_res_usage(
        subprocess.run([tool, "-res-usage", lib], capture_output=True, text=True, check=True).stdout
    )
    return kernels, usage


def test_sass_lists_both_variants_kernels(sass):
    kernels, usage = sass
    for arch in {arch for arch, _ in kernels}:
        names = [name for a, name in kernels if a == arch]
        for kernel in (
            "sa_layer_forward_kernel",
            "sa_layer_backward_kernel",
            "shuffle_attention_forward_kernel",
            "shuffle_attention_backward_kernel",
        ):
            assert any(kernel in n for n in names), f"{arch}: no {kernel} in the SASS listing"
        assert all((arch, n) in usage for n in names), f"{arch}: -res-usage misses kernels"


def test_sass_no_local_memory_and_128_bit_plane_accesses(sass):
    problems = check_sass(*sass)
    assert not problems, "\n".join(problems)
