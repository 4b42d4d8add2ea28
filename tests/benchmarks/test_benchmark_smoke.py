"""The benchmark's quick mode (CI smoke test): runs, checks every fused result against the float64
reference before timing it, writes its JSON, reports speedups only where they mean something, and
redraws its plot from the JSON. Asserts nothing about speed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_quick(module: str, tmp_path, timeout: int = 600) -> Path:
    """Runs ``python -m benchmarks.<module> --quick`` into tmp_path; checks it passed; returns the
    JSON file it wrote."""
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [json_file] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    return tmp_path / json_file


def _rounds_quick(module: str, tmp_path) -> dict:
    """_run_quick of an interleaved-rounds script; checks it wrote its PNG; returns its JSON."""
    json_file = _run_quick(module, tmp_path)
    assert json_file.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(json_file.read_text())


@pytest.mark.slow
def test_bench_quick(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--quick",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
            "--no-plot",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )  # -m: the checkout's sa_cuda first
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(files) == 1
    report = json.loads((tmp_path / files[0]).read_text())
    assert report["checks"] and all(check["ok"] for check in report["checks"])
    assert {row["impl"] for row in report["results"]} >= {"eager", "fused"}
    assert all(row["status"] == "ok" for row in report["results"])
    for row in report["results"]:  # a speedup only over a baseline the implementation replaces
        if row["impl"] == "eager":
            assert "speedup_vs_eager" not in row and "speedup_vs_compile" not in row, row
        else:
            assert row["speedup_vs_eager"] > 0, row

    replot = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--replot", str(tmp_path / files[0])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert replot.returncode == 0, replot.stdout[-4000:] + replot.stderr[-4000:]
    png = (tmp_path / files[0]).with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_channels_last_quick(tmp_path):
    """benchmarks.channels_last --quick: every config checked against the float64 reference on
    the channels_last input, every implementation and pass timed, the ratios and the plot
    written."""
    report = _rounds_quick("channels_last", tmp_path)
    assert {(r["variant"], r["dtype"]) for r in report["rows"]} == {
        ("sa_layer", "fp32"),
        ("shuffle_attention", "fp32"),
    }
    for row in report["rows"]:
        assert row["check"]["ok"], row["check"]
        assert set(row["times"]) == {"fused-nchw", "fused-cl", "eager-cl"}
        for pass_ in ("fwd", "fwdbwd"):
            ratios = row["ratios"][pass_]
            assert ratios["cl_over_nchw"] > 0 and ratios["speedup_vs_eager-cl"] > 0, row


@pytest.mark.slow
def test_residual_quick(tmp_path):
    """benchmarks.residual --quick: every config (variant x format) checked against the float64
    reference tail, every implementation and pass timed, the ratios and the plot written."""
    report = _rounds_quick("residual", tmp_path)
    assert {(r["variant"], r["format"]) for r in report["rows"]} == {
        (v, f) for v in ("sa_layer", "shuffle_attention") for f in ("nchw", "cl")
    }
    for row in report["rows"]:
        assert row["check"]["ok"], row["check"]
        assert set(row["times"]) == {"tail-fused", "sa+add-relu", "eager", "add"}
        for pass_ in ("infer", "fwd", "fwdbwd"):
            assert row["ratios"][pass_]["speedup_vs_sa+add-relu"] > 0, row
        assert row["ratios"]["fwd"]["over_add"] > 0, row


@pytest.mark.slow
def test_overhead_quick(tmp_path):
    """benchmarks.overhead --quick: the fused SA-ResNet-50 checked against the eager one, the three
    models timed in train and inference, the overheads over ResNet-50, the bottleneck tails' times
    per stage (forward; backward in training) and their price, and the profiler's shares by op
    kind written (the sa_cuda ops only in the fused model, SGD only in training)."""
    report = _rounds_quick("overhead", tmp_path)
    [result] = report["results"]
    assert result["check"]["ok"], result["check"]
    models, steps = ("resnet50", "sa_eager", "sa_fused"), ("train", "infer")
    assert set(result["times"]) == {f"{m}/{s}" for m in models for s in steps}
    assert all(t["median_s"] > 0 for t in result["times"].values())
    assert set(result["overhead"]) == {f"{m}/{s}" for m in models[1:] for s in steps}
    assert set(result["faults"]) == set(result["times"])
    assert set(result["tail_price"]) == set(result["overhead"])
    stages = ("layer1", "layer2", "layer3", "layer4")
    for key, tails in result["tails"].items():
        passes = ("fwd", "bwd") if key.endswith("/train") else ("fwd",)
        assert set(tails) == {f"{s}/{p}" for s in (*stages, "all") for p in passes} | {"all"}, key
        assert all(tails[f"{s}/{p}"] > 0 for s in stages for p in passes), key
        assert tails["all"] < 1e3 * result["times"][key]["median_s"], key
    for key, shares in result["shares"].items():
        model, step = key.split("/")
        assert abs(sum(shares.values()) - 1) < 1e-9, key
        assert (shares["sa"] > 0) == (model == "sa_fused"), key
        assert (shares["optimizer"] > 0) == (step == "train"), key
        assert shares["conv"] > 0 and shares["batch_norm"] > 0, key


@pytest.mark.slow
def test_raw_ops_quick(tmp_path):
    """benchmarks.raw_ops --quick: both variants' raw forward and backward checked against the
    float64 reference, timed with their yardsticks (copy, add), and the ratios written."""
    report = _rounds_quick("raw_ops", tmp_path)
    assert {r["variant"] for r in report["rows"]} == {"sa_layer", "shuffle_attention"}
    for row in report["rows"]:
        assert row["check"]["ok"], row["check"]
        assert set(row["check"]["tensors"]) == {"out", "grad_x"}
        assert set(row["times"]) == {"fwd", "bwd", "copy", "add"}
        assert all(t["p25_ms"] > 0 for t in row["times"].values())
        assert row["ratios"]["fwd_over_copy"] > 0 and row["ratios"]["bwd_over_add"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("valgrind") is None or not os.path.exists("/usr/include/valgrind/callgrind.h"),
    reason="needs valgrind (callgrind) and its header",
)
def test_instructions_quick(tmp_path):
    """benchmarks.instructions --quick: both variants' kernels counted under callgrind, one dump
    per op, instructions per element of a kernel that does work on every element (more than one,
    fewer than the scalar code's hundreds)."""
    report = json.loads(_run_quick("instructions", tmp_path, timeout=900).read_text())
    assert [r["variant"] for r in report["rows"]] == ["sa_layer", "shuffle_attention"]
    for row in report["rows"]:
        assert row["elements"] == 2 * 128 * 14 * 14
        for op in ("fwd", "bwd"):
            assert 1 < row[f"{op}_per_element"] < 100, row


@pytest.mark.slow
def test_call_overhead_quick(tmp_path):
    """benchmarks.call_overhead --quick: both variants' residual module call checked against the
    float64 reference, each case timed per call (warm and cold) with the module's time around its
    raw ops, and the fused SA-ResNet-50's tails against its sa_cuda ops' profiled time, inference
    and training."""
    report = json.loads(_run_quick("call_overhead", tmp_path).read_text())
    assert {row["variant"] for row in report["calls"]} == {"sa_layer", "shuffle_attention"}
    for row in report["calls"]:
        assert row["check"]["ok"], row
        assert all(us > 0 for us in row["us"].values()), row
        assert set(row["around_us"]) == {n for n in row["us"] if n.startswith("module")}
        assert set(row["cold_us"]) == {"forward op", "module, no_grad", "module, forward"}
        assert all(us > 0 for us in row["cold_us"].values()), row
        for name, us in row["cold_around_us"].items():
            assert us == pytest.approx(row["cold_us"][name] - row["cold_us"]["forward op"]), name
    for step, ms in report["model"]["ms"].items():
        assert 0 < ms["ops"] < ms["tails"] < ms["step"], (step, ms)
        assert ms["around"] == pytest.approx(ms["tails"] - ms["ops"], rel=1e-6), (step, ms)
