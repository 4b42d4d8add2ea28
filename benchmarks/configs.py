"""What a benchmark run covers: shapes, dtypes, variants, implementations, passes, and the command
line of ``python -m benchmarks.bench`` with its defaults (which depend on the device and --quick)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import sa_cuda
from sa_cuda import reference

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    C: int
    H: int
    W: int
    G: int

    @property
    def n(self) -> int:
        return self.B * self.C * self.H * self.W

    def __str__(self) -> str:
        return f"({self.B},{self.C},{self.H},{self.W}) G={self.G}"


# (C, H = W) of the four SA-ResNet-50 stages at 224x224 input, G = 64
RESNET50_STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
TINY_STAGES = [(256, 4)]  # gpu_check's CPU-mode smoke shape


def stage_shapes(batches: list[int], tiny: bool = False) -> list[Shape]:
    """The SA-ResNet-50 stage shapes (G = 64) at each batch, named r50-l<stage>-b<batch>."""
    stages = TINY_STAGES if tiny else RESNET50_STAGES
    return [
        Shape(f"{'tiny' if tiny else 'r50'}-l{i + 1}-b{b}", b, c, hw, hw, 64)
        for b in batches
        for i, (c, hw) in enumerate(stages)
    ]


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        *stage_shapes([8, 32]),
        Shape("seed-b32", 32, 256, 24, 24, 64),  # the seed document's example
        Shape("det-g8", 16, 512, 40, 40, 8),  # detection-style neck, G = 8 (m = 32)
        Shape("plane224-g8", 4, 64, 224, 224, 8),  # large planes (50176 px), m = 4
        Shape("quick", 2, 128, 14, 14, 8),  # --quick / CI smoke test (m = 8)
    ]
}
DEFAULT_SHAPES = [s for s in SHAPES if s != "quick"]

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
# variant -> (reference module, fused module)
VARIANTS = {
    "sa_layer": (reference.SALayer, sa_cuda.SALayer),
    "shuffle_attention": (reference.ShuffleAttention, sa_cuda.ShuffleAttention),
}
IMPLS = ("eager", "compile", "compile-max-autotune", "fused")
# the implementations each one is meant to replace: a speedup is reported over these only (an
# eager row has no "x compile": eager is what compile and fused are measured against)
SPEEDUP_BASELINES = {
    "compile": ("eager",),
    "compile-max-autotune": ("eager", "compile"),
    "fused": ("eager", "compile"),
}
PASSES = ("fwd", "bwd", "fwdbwd", "infer")
DEFAULT_PASSES = ("fwd", "bwd", "fwdbwd")
# the end-to-end precision modes: fp32, and autocast to each of these dtypes
E2E_AMP_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}
E2E_MODES = ("fp32", *E2E_AMP_DTYPES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Shuffle Attention microbenchmarks (+ SA-ResNet-50 "
        "end-to-end): eager vs torch.compile vs sa_cuda fused.",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtypes",
        help="comma list of fp32,bf16,fp16,fp64 (default CUDA: fp32,bf16,fp16; CPU: fp32,bf16)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma list of "
        f"{','.join(VARIANTS)} (SALayer: per-channel gates; ShuffleAttention: "
        "1x1-conv gates)",
    )
    p.add_argument(
        "--shapes", help=f"comma list of shape names: {', '.join(SHAPES)} (default: all but quick)"
    )
    p.add_argument(
        "--passes", default=",".join(DEFAULT_PASSES), help=f"comma list of {','.join(PASSES)}"
    )
    p.add_argument(
        "--impls",
        help=f"comma list of {','.join(IMPLS)} (default: all that apply; "
        "compile-max-autotune only on CUDA)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke test: shape 'quick', fp32, both variants, eager and fused "
        "only, short timing, no e2e; checks correctness, asserts nothing about speed",
    )
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", help="suffix of the output file names (default 'quick' with --quick)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--replot",
        metavar="JSON",
        help="only redraw the PNG of an earlier run from its JSON (written beside it)",
    )
    p.add_argument(
        "--e2e",
        dest="e2e",
        action="store_true",
        default=None,
        help="also run the SA-ResNet-50 end-to-end benchmark (default, except with "
        "--quick, where --e2e runs a tiny one: batch 2, 64x64)",
    )
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--e2e-batches", help="comma list (default CUDA 32,64; CPU 8; quick 2)")
    p.add_argument(
        "--e2e-resolution", type=int, help="input size (default CUDA 224, CPU 112, quick 64)"
    )
    p.add_argument(
        "--e2e-modes",
        help=f"comma list of {','.join(E2E_MODES)} (default CUDA fp32,amp-bf16; CPU fp32)",
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)"
    )
    p.add_argument(
        "--min-run-time", type=float, help="CPU seconds per measurement (default 1.0, quick 0.05)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def add_round_args(p, *, min_run_time: float) -> None:
    """The command line that the interleaved-rounds scripts (channels_last.py, residual.py)
    share: device, dtypes, variants, shapes, rounds, timer, threads, --quick, output, seed."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--shapes", help="comma list of shape names (default: r50-l1..l4 at batch 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=min_run_time, help="CPU s a measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="shape 'quick', fp32, 1 round")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default=None)
    p.add_argument("--seed", type=int, default=0)


def round_choices(args) -> tuple[list[str], list[str], list[str]]:
    """(shapes, dtypes, variants) of add_round_args' command line; --quick: shape 'quick', fp32,
    one round of short measurements."""
    default_shapes = [s.name for s in stage_shapes([8])]
    shapes = csv_choice("--shapes", "quick" if args.quick else args.shapes, default_shapes, SHAPES)
    dtypes = csv_choice("--dtypes", "fp32" if args.quick else args.dtypes, [], DTYPES)
    variants = csv_choice("--variants", args.variants, [], VARIANTS)
    if args.quick:
        args.rounds, args.min_run_time = 1, 0.05
    return shapes, dtypes, variants


def csv_choice(flag: str, value: str | None, default: list[str], allowed) -> list[str]:
    """The comma list ``value`` (``default`` when not given), each item one of ``allowed``."""
    items = [v.strip() for v in value.split(",") if v.strip()] if value else list(default)
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown value(s) {bad}; choose from {list(allowed)}")
    return items


@dataclass
class Plan:
    """Everything one run measures, with the defaults resolved."""

    device: torch.device
    quick: bool
    dtypes: list[str]
    variants: list[str]
    shapes: list[str]
    passes: list[str]
    impls: list[str]
    min_run_time: float
    e2e: dict | None  # modes, batches, resolution, warmup, iters (None: no end-to-end run)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def configs(self) -> list[tuple[str, Shape, str]]:
        return [(v, SHAPES[s], d) for v in self.variants for s in self.shapes for d in self.dtypes]


def make_plan(args: argparse.Namespace) -> Plan:
    device = torch.device(args.device)
    cuda, quick = device.type == "cuda", args.quick
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    default_dtypes = ["fp32"] if quick else (["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    default_impls = [i for i in IMPLS if cuda or i != "compile-max-autotune"]
    if quick:  # compiling takes tens of seconds on a small CPU: opt in with --impls
        default_impls = ["eager", "fused"]
    impls = csv_choice("--impls", args.impls, default_impls, IMPLS)
    if "compile-max-autotune" in impls and not cuda:
        raise SystemExit("--impls: compile-max-autotune is CUDA only")
    run_e2e = not quick if args.e2e is None else args.e2e
    return Plan(
        device=device,
        quick=quick,
        dtypes=csv_choice("--dtypes", args.dtypes, default_dtypes, DTYPES),
        variants=csv_choice("--variants", args.variants, list(VARIANTS), VARIANTS),
        shapes=csv_choice("--shapes", args.shapes, ["quick"] if quick else DEFAULT_SHAPES, SHAPES),
        passes=csv_choice("--passes", args.passes, list(DEFAULT_PASSES), PASSES),
        impls=impls,
        min_run_time=args.min_run_time or (0.05 if quick else 1.0),
        e2e=e2e_config(args, cuda, quick) if run_e2e else None,
    )


def e2e_config(args: argparse.Namespace, cuda: bool, quick: bool) -> dict:
    return {
        "modes": csv_choice(
            "--e2e-modes",
            args.e2e_modes,
            ["fp32"] if (quick or not cuda) else ["fp32", "amp-bf16"],
            E2E_MODES,
        ),
        "batches": (
            [int(b) for b in args.e2e_batches.split(",")]
            if args.e2e_batches
            else [2]
            if quick
            else ([32, 64] if cuda else [8])
        ),
        "resolution": args.e2e_resolution or (64 if quick else (224 if cuda else 112)),
        "warmup": 1 if quick else (10 if cuda else 2),
        "iters": 2 if quick else (30 if cuda else 5),
    }
