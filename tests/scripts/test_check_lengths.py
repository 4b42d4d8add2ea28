"""scripts/check_lengths.py, which lint.sh runs over the Python code: a function of more than --max
lines (def to last line, decorators excluded) fails, one of exactly --max passes; with --max-file,
a file of more lines than that fails, one of exactly that many passes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "check_lengths.py")


def function_source(name: str, lines: int) -> str:
    """A decorated function of exactly ``lines`` lines from its def."""
    body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
    return f"@staticmethod\ndef {name}():\n{body}    return None\n"


def check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


@pytest.mark.parametrize("lines,fails", [(10, False), (11, True)])
def test_function_limit(tmp_path, lines, fails):
    path = tmp_path / "module.py"
    path.write_text(
        "class A:\n"
        + "".join("    " + ln + "\n" for ln in function_source("f", lines).splitlines())
    )
    result = check("--max", "10", str(tmp_path))
    assert result.returncode == (1 if fails else 0), result.stdout + result.stderr
    if fails:
        assert f"module.py:3: f is {lines} lines (max 10)" in result.stdout


@pytest.mark.parametrize("lines,fails", [(30, False), (31, True)])
def test_file_limit(tmp_path, lines, fails):
    path = tmp_path / "module.py"
    path.write_text("".join(f"x{i} = {i}\n" for i in range(lines)))
    assert check("--max", "10", str(tmp_path)).returncode == 0  # no file limit unless asked
    result = check("--max", "10", "--max-file", "30", str(tmp_path))
    assert result.returncode == (1 if fails else 0), result.stdout + result.stderr
    if fails:
        assert f"module.py: {lines} lines (max 30)" in result.stdout
