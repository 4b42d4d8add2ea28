"""The checks of the SIMT emulator (csrc/cuda/emulator.h), each against a planted bug.

tests/native/emulator_selftest.cpp holds small kernels in the portable subset, each with exactly
one bug the hardware would not report (or would hang on), next to the same kernel without it. The
emulator must expose every planted bug, with a message naming what and where, and must run the
fixed kernels correctly."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import pytest
from emulation import EMULATOR_SELFTEST as SOURCE
from emulation import UCONTEXT, build_native

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# Every check runs with both context switches of the emulator's fibers (csrc/cuda/emulator_fibers.h):
# the hand-written stack switch (x86-64) and glibc's swapcontext (the fallback elsewhere).
SWITCHES = {"stack-switch": (), "ucontext": UCONTEXT}


@pytest.fixture(params=sorted(SWITCHES))
def binary(request) -> str:
    return build_native(SOURCE, defines=SWITCHES[request.param])


def run(binary: str, *args: str, seed: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SA_EMU_SEED", None)
    if seed is not None:
        env["SA_EMU_SEED"] = seed
    # The timeout turns a hang (a barrier nobody completes) into a failure.
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120)


def rows(stdout: str) -> dict[str, list[str]]:
    """'name v1 v2 ...' lines (the last of each name)."""
    out = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) > 1 and not line.startswith(("error", "rejected")):
            name_length = 2 if words[0] in ("static", "dynamic") else 1
            out[" ".join(words[:name_length])] = words[name_length:]
    return out


def source_line(marker: str) -> int:
    """The line of SOURCE that contains marker (exactly one)."""
    with open(SOURCE) as f:
        lines = [i + 1 for i, text in enumerate(f) if marker in text]
    assert len(lines) == 1, marker
    return lines[0]


def site(marker: str) -> str:
    return rf"\S*emulator_selftest\.cpp:{source_line(marker)}:\d+"


# ---- 1. shared memory is poisoned before each block ----------------------------------------------


def test_shared_memory_read_before_write_is_nan_in_every_block(binary):
    result = run(binary, "poison")
    assert result.returncode == 0, result.stdout + result.stderr
    got = rows(result.stdout)
    threads, blocks = 128, 3
    want = [float(sum(i % 7 for i in range(b * threads, (b + 1) * threads))) for b in range(blocks)]
    for storage in ("static", "dynamic"):
        assert [float(v) for v in got[f"{storage} fixed"]] == want
        # The planted bug reads the 28 partial slots no warp wrote: NaN in every block, the first
        # and the later ones alike (zero-filled or reused shared memory gave the right sums).
        planted = [float(v) for v in got[f"{storage} planted"]]
        assert len(planted) == blocks and all(math.isnan(v) for v in planted), planted


# ---- 2. blocks run in a seeded random order ------------------------------------------------------

BLOCKS = 100


def order_run(binary: str, seed: str | None):
    result = run(binary, "order", str(BLOCKS), seed=seed)
    assert result.returncode == 0, result.stdout + result.stderr
    got = rows(result.stdout)
    return (
        [int(v) for v in got["order"]],
        [float(v) for v in got["fixed"]],
        [float(v) for v in got["planted"]],
    )


@pytest.mark.parametrize("seed", [None, "1", "2", "0xdeadbeef"])
def test_block_order_is_a_seeded_permutation_that_exposes_inter_block_dependence(binary, seed):
    order, fixed, planted = order_run(binary, seed)
    in_order = [float(b + 1) for b in range(BLOCKS)]
    assert sorted(order) == list(range(BLOCKS)) and order != sorted(order)
    assert fixed == in_order
    # Block b adds one to block b-1's value: right only when block b-1 ran first.
    assert planted != in_order
    assert order_run(binary, seed) == (order, fixed, planted)  # the seed reproduces the run


def test_different_seeds_give_different_orders(binary):
    assert len({tuple(order_run(binary, seed)[0]) for seed in ("1", "2", "3")}) == 3


def test_malformed_seed_is_an_error(binary):
    result = run(binary, "order", "4", seed="12abc")
    assert result.returncode != 0
    assert "SA_EMU_SEED=12abc is not an integer" in result.stderr


# ---- 3. every thread of a block reaches the same barriers ----------------------------------------

# kernel, the regular expressions its error must match (the sites are found in the source)
DIVERGENT = [
    pytest.param(
        "sync_in_first_warp",
        lambda: [
            rf"the threads of block \(\d, 0, 0\) reached different barriers \(its barrier #1\): threads 0-31 wait at "
            rf"__syncthreads\(\) at {site('planted: barrier of warp 0 only')}; "
            r"threads 32-63 returned from the kernel"
        ],
        id="sync-in-first-warp",
    ),
    pytest.param(
        "sync_in_one_branch",
        lambda: [
            rf"its barrier #1\): threads 0-47 wait at __syncthreads\(\) at {site('planted: barrier in one branch')}; "
            rf"threads 48-63 wait at __syncthreads\(\) at {site('planted: the other branch')}"
        ],
        id="sync-in-one-branch",
    ),
    pytest.param(
        "sync_count_per_thread",
        lambda: [
            rf"its barrier #2\): thread 0 returned from the kernel; thread 1 wait at __syncthreads\(\) at "
            rf"{site('planted: odd threads sync twice')}; thread 2 returned"
        ],
        id="sync-count-per-thread",
    ),
    pytest.param(
        "sync_after_early_return",
        lambda: [
            rf"its barrier #1\): threads 0-31 wait at __syncthreads\(\) at {site('reached by threads 0-31 only')}; "
            r"threads 32-63 returned from the kernel"
        ],
        id="sync-after-early-return",
    ),
    pytest.param(
        "shuffle_in_half_warp",
        lambda: [
            rf"the lanes of warp [01] of block \(\d, 0, 0\) diverged at a shuffle: "
            rf"threads (0|32)-(15|47) wait at a warp shuffle at "
            rf"{site('planted: half of each warp shuffles')}; "
            rf"threads (16|48)-(31|63) returned from the kernel",
            r"must take part in a full-mask shuffle",
        ],
        id="shuffle-in-half-warp",
    ),
]


@pytest.mark.parametrize("kernel,patterns", DIVERGENT)
def test_divergent_barrier_is_an_error_not_a_hang(binary, kernel, patterns):
    result = run(binary, "barrier", kernel)
    assert result.returncode == 0, result.stdout + result.stderr
    message = result.stdout
    assert message.startswith("error: sa_cuda emulator: the "), message
    for pattern in patterns():
        assert re.search(pattern, message), (pattern, message)
    assert re.search(r"block order seed \d+: SA_EMU_SEED=\d+ reproduces it", message)


def test_barrier_out_of_divergent_code_runs(binary):
    result = run(binary, "barrier", "sync_uniform")
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(result.stdout)["ok"] == [str(63 - t if t < 48 else 0) for t in range(64)]


def test_warp_that_returns_early_with_no_later_barrier_runs(binary):
    result = run(binary, "barrier", "warp_early_return")
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(result.stdout)["ok"] == [str(t ^ 1 if t < 32 else 0) for t in range(64)]


# ---- 4. launches the hardware rejects ------------------------------------------------------------

REJECTED = {
    "2^31 blocks": "a launch needs 2147483648 blocks; the grid limit is 2^31 - 1",
    "2^32 + 1 blocks": "a launch needs 4294967297 blocks; the grid limit is 2^31 - 1",
    "0 blocks": "a launch needs 0 blocks; the grid limit is 2^31 - 1",
    "-1 blocks": "a launch needs -1 blocks; the grid limit is 2^31 - 1",
    "1025 threads": "invalid launch: block of 1025 threads (the limit is 1024, z <= 64)",
    "0 threads": "invalid launch: a block dimension is 0",
    "dynamic shared memory over budget": (
        "invalid launch: 232449 bytes of dynamic shared memory (the budget is 232448)"
    ),
    "static shared memory over 48 KiB": (
        "49160 bytes of static shared memory (SA_SHARED_ARRAY) in a block; the limit is 49152"
    ),
}


def test_launches_over_the_hardware_limits_are_rejected_before_any_block_runs(binary):
    result = run(binary, "launch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NOT rejected" not in result.stdout, result.stdout
    for what, message in REJECTED.items():
        assert re.search(
            rf"^rejected {re.escape(what)}: .*{re.escape(message)}", result.stdout, re.M
        ), what
    # No rejected launch ran a block (a wrapped count would have); the limits themselves launch.
    assert re.findall(r"^kernel runs (\d+)$", result.stdout, re.M) == ["0", "3"]
