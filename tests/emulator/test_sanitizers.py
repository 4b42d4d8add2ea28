"""The emulation build of the CUDA kernels under ThreadSanitizer and AddressSanitizer.

tests/native/kernel_selftest.cpp drives the real kernels (every launch path, both variants) and two
planted bugs. The sanitizers must report the planted race and overflow (so a clean run means
something) and must stay silent on the real kernels. The emulator's own checks: test_emulator.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from emulation import KERNEL_SELFTEST as SOURCE
from emulation import build_native

# Each sanitizer build compiles every kernel: slow. pytest-xdist runs a test file on one worker
# (--dist loadfile, scripts/test.sh), so each build is made once.
pytestmark = [pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++"), pytest.mark.slow]


def build(sanitizer: str | None) -> str:
    return build_native(SOURCE, sanitizer)


def run(binary: str, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0", ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([binary, mode], capture_output=True, text=True, env=env, timeout=600)


def test_plain_build_runs_every_launch_path_correctly():
    result = run(build(None), "kernels")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
    # 13 cases x (float32, float64) x (plain, residual epilogue)
    assert result.stdout.count("max err") == 52
    assert result.stdout.count(" residual: max err") == 26


# (sanitizer, planted bug, what the sanitizer must say, the kernel it must name)
PLANTED = [
    pytest.param(
        "thread",
        "race",
        "WARNING: ThreadSanitizer: data race",
        "planted_race_kernel",
        id="tsan-missing-syncthreads",
    ),
    pytest.param(
        "address",
        "oob",
        "AddressSanitizer: heap-buffer-overflow",
        "planted_oob_kernel",
        id="asan-out-of-bounds-read",
    ),
]


def accessing_frames(report: str) -> list[str]:
    """The innermost frame (#0) of every memory access a sanitizer's report names (TSan's "Write
    of size 4 ...", "Previous read of size 4 ...", ASan's "READ of size 4 ..."), not of the
    allocation stacks."""
    frames, want = [], False
    for line in report.splitlines():
        if re.search(r"(read|write) of size", line, re.IGNORECASE):
            want = True
        elif want and line.strip().startswith("#0 "):
            frames.append(line.strip())
            want = False
    return frames


@pytest.mark.parametrize("sanitizer,mode,report,kernel", PLANTED)
def test_sanitizer_reports_planted_bug(sanitizer, mode, report, kernel):
    result = run(build(sanitizer), mode)
    assert report in result.stderr, result.stderr[:4000]
    # Every access the sanitizer names is the planted kernel's own, none the emulator's: the CUDA
    # threads run as fibers on one host thread (csrc/cuda/emulator_fibers.h), and the emulator's
    # bookkeeping between them must neither be reported nor hide the kernel's bug.
    frames = accessing_frames(result.stderr)
    assert frames and all(kernel in frame for frame in frames), "\n".join(frames)


@pytest.mark.parametrize(
    "sanitizer,name",
    [("thread", "ThreadSanitizer"), ("address", "AddressSanitizer")],
)
def test_sanitizer_clean_on_real_kernels(sanitizer, name):
    result = run(build(sanitizer), "kernels")
    assert name not in result.stderr, result.stderr[:4000]
    assert result.returncode == 0, result.stdout + result.stderr[:4000]
    assert result.stdout.strip().endswith("ok")
