"""examples/train_digits.py: a short version of the real training run (fused and eager from the same
seed) and the torchrun route of its README command line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_digits.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_fused_and_eager_training_agree(example):
    """3 epochs (69 steps) each, in float64: the batch losses of the fused and the eager network
    agree within 1e-10 (relative) at every step, and the fused network reaches 97% test accuracy.
    (In float32 the runs part by rounding: the first difference falls anywhere from step 2 to 24,
    depending on the process, and AdamW amplifies it to 0.3-4% by step 69; float64 keeps them
    within 1e-15.)"""
    data = example.load_digits(0, torch.float64)
    fused = example.train(example.sa_resnet_digits(True, 0, torch.float64), data, 3)
    eager = example.train(example.sa_resnet_digits(False, 0, torch.float64), data, 3)
    assert len(fused.losses) == len(eager.losses) == 3 * 23
    drift = [abs(f - e) / abs(e) for f, e in zip(fused.losses, eager.losses)]
    assert max(drift) <= 1e-10, drift
    assert fused.losses[-1] < 0.2 * fused.losses[0]
    assert fused.accuracy[-1] >= 0.97, fused.accuracy
    assert fused.accuracy == eager.accuracy


def test_command_line_float64(example, tmp_path, capsys):
    """main() as the command line runs it, in float64 (model and data in one dtype), fused only."""
    png = tmp_path / "d.png"
    assert (
        example.main(["--epochs", "1", "--dtype", "float64", "--no-eager", "--png", str(png)]) == 0
    )
    out = capsys.readouterr().out
    assert "fused: test accuracy" in out and "eager" not in out
    assert png.stat().st_size > 10_000


def test_torchrun_two_processes(tmp_path):
    """The README's torchrun command line: DistributedDataParallel over 2 CPU processes (gloo;
    CUDA hidden, so a machine with a GPU runs the same)."""
    png = tmp_path / "ddp.png"
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [EXAMPLE]
        + ["--epochs", "2", "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if "test accuracy" in line)
    assert line.startswith("fused, 2 processes: test accuracy")
    assert float(line.split("test accuracy ")[1].split("%")[0]) >= 90.0
    assert png.stat().st_size > 10_000
