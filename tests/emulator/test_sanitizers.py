"""The emulation build of the CUDA kernels under ThreadSanitizer and AddressSanitizer.

tests/native/kernel_selftest.cpp drives the real kernels (every launch path, both variants) and two
planted bugs. The sanitizers must report the planted race and overflow (so a clean run means
something) and must stay silent on the real kernels. The emulator's own checks: test_emulator.py."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from emulation import build_native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests", "native", "kernel_selftest.cpp")

# Each sanitizer build compiles every kernel: slow.
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
    assert result.stdout.count("max err") == 20  # 10 cases x (float32, float64)


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


@pytest.mark.parametrize("sanitizer,mode,report,kernel", PLANTED)
def test_sanitizer_reports_planted_bug(sanitizer, mode, report, kernel):
    result = run(build(sanitizer), mode)
    assert report in result.stderr, result.stderr[:4000]
    assert kernel in result.stderr


@pytest.mark.parametrize(
    "sanitizer,name", [("thread", "ThreadSanitizer"), ("address", "AddressSanitizer")]
)
def test_sanitizer_clean_on_real_kernels(sanitizer, name):
    result = run(build(sanitizer), "kernels")
    assert name not in result.stderr, result.stderr[:4000]
    assert result.returncode == 0, result.stdout + result.stderr[:4000]
    assert result.stdout.strip().endswith("ok")
