"""The benchmark's quick mode (CI smoke test): runs, checks every fused result against the float64
reference before timing it, writes its JSON. Asserts nothing about speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_quick(tmp_path):
    # The checkout under test first on the path (as gpu_check.sh does): a script's sys.path starts
    # at its own folder, so bench.py would otherwise import whichever sa_cuda is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--quick", "--device", "cpu",
         "--out-dir", str(tmp_path), "--no-plot"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(files) == 1
    report = json.loads((tmp_path / files[0]).read_text())
    assert report["checks"] and all(check["ok"] for check in report["checks"])
    assert {row["impl"] for row in report["results"]} >= {"eager", "fused"}
    assert all(row["status"] == "ok" for row in report["results"])
