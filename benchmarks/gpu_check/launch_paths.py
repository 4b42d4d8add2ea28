"""Launch-path check: every kernel launch path x dtype x variant of csrc/cuda against the CPU op in
float64 (the forward's out, mean, rstd and all 7 outputs of the backward).

Per case (variant, shape, groups, dtype, storage offset):
- x and grad_out live in a flat buffer at a storage offset of 0, 1, 2 or 4 elements, so that every
  plane pointer is misaligned for some pack width (16-, 8-, 4-byte packs);
- before each run the CUDA caching allocator is pre-filled with NaN bytes (a big and some small
  blocks, written with 0xff, NaN in every float dtype, then freed), so that an output element the
  kernels never write, or a read of memory they never wrote, shows as NaN instead of stale values;
- the kernels run twice on the same inputs: every output must be bitwise identical;
- each output is compared with the CPU op in float64 on the same (rounded) values, within
  sa_cuda.testing.accuracy_bound: relative to the error eager PyTorch (sa_cuda.reference in
  the case's dtype) makes against that float64 result. mean/rstd (float32 statistics, float64 for
  float64 input) are held to the bound of their own dtype, eager's error being torch.var_mean's.

The case list is data (SPECS): a spec names the launch path a shape is chosen for. The paths are
those of csrc/cuda/launch_common.cuh; add a spec when a path is added.

--set small is the workload of compute-sanitizer and of the CPU mode (few, small cases).
--backend emulated runs the same kernel source through the CPU SIMT emulator (tests/emulation.py).
--corrupt OUTPUT adds an error to that output of the kernels' result before it is checked: a test
hook showing that the check compares real values (the case must FAIL).

Prints one line per case and a final PASS/FAIL count; exit code 1 when any case fails.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass

import torch
from common import BACKENDS, DTYPES, VARIANTS, backend_ops, caching_allocator_active, write_json
from conftest import PARAM_ARG_NAMES, PARAM_KEYS, forward_backward, make_ref

from sa_cuda.testing import accuracy_bound, max_abs, max_err

EPS = 1e-5
OFFSETS = (0, 1, 2, 4)
SMALL_OFFSETS = (0, 1)


@dataclass(frozen=True)
class Spec:
    path: str  # the launch path the shape is chosen for
    shape: tuple[int, int, int, int]  # (B, C, H, W)
    groups: int
    variants: tuple[str, ...] = VARIANTS  # the first one alone in the small set
    small: tuple[str, ...] = ()  # dtypes of this spec in the small set (none: not in it)
    channels_last: bool = False  # x and grad_out channels_last (the NHWC kernels)


PLANE = VARIANTS  # plane kernels (sa_layer); shuffle_attention sees the same N/offsets
GROUP = ("shuffle_attention",)
# Per-channel variant (plane_* kernels): warp team N <= 256, block team N <= 4096, streamed above;
# packs when the plane pointers are aligned and N is a multiple of the pack, else scalar accesses.
# 1x1-conv variant (group_* kernels): tiles of group_tile_pixels(m) pixels (1024 for m <= 2, 512
# for m = 4, ..., 64 for m = 32, 32 for m >= 48); dynamic shared memory above 48 KiB (opt-in) for
# the fp32 backward from m = 32 and the fp64 one from m = 16; one spec with N below and one above
# the tile per m.
SPECS: list[Spec] = [
    Spec("warp N=1", (2, 16, 1, 1), 4),
    Spec("warp N=63 odd", (2, 16, 7, 9), 2, PLANE, ("fp32", "bf16")),
    Spec("warp N=30 even", (2, 16, 5, 6), 4),
    Spec("warp N=64 x8", (3, 16, 8, 8), 2, PLANE, ("fp32", "bf16")),
    Spec("warp N=256 12 planes", (1, 12, 16, 16), 3),
    Spec("block N=272 x8", (1, 8, 16, 17), 2),
    Spec("block N=899 odd", (1, 8, 31, 29), 2, PLANE, ("fp32", "fp16")),
    Spec("block N=930 even", (2, 8, 30, 31), 2),
    Spec("block N=4096 x8", (1, 8, 64, 64), 2, PLANE, ("fp32", "bf16")),
    Spec("streamed N=4225 odd", (1, 4, 65, 65), 1, PLANE, ("fp32",)),
    Spec("streamed N=4608 x8", (1, 4, 64, 72), 1, PLANE, ("fp32", "bf16")),
    Spec("streamed N=4422 even", (2, 4, 66, 67), 1),
    Spec("small B*C=2 N=16384", (1, 2, 128, 128), 1, PLANE, ("fp32",)),
    Spec("small B*C=2 N=32761 odd", (1, 2, 181, 181), 1),
    Spec("small B*C=4 N=81", (2, 2, 9, 9), 1),
    Spec("group m=1 N<tile", (2, 2, 15, 17), 1, GROUP),
    Spec("group m=1 N>tile", (1, 2, 33, 37), 1, GROUP, ("fp32", "bf16")),
    Spec("group m=2 N<tile", (1, 4, 10, 11), 1, GROUP),
    Spec("group m=2 N>tile", (1, 8, 35, 35), 2, GROUP),
    Spec("group m=3 N<tile", (2, 6, 9, 9), 1, GROUP),
    Spec("group m=3 N>tile", (1, 6, 29, 29), 1, GROUP),
    Spec("group m=4 N<tile", (1, 8, 7, 7), 1, GROUP),
    Spec("group m=4 N>tile", (1, 16, 24, 25), 2, GROUP),
    Spec("group m=8 N<tile", (2, 16, 8, 8), 1, GROUP),
    Spec("group m=8 N>tile", (1, 16, 20, 20), 1, GROUP, ("fp32", "fp16")),
    Spec("group m=16 N<tile", (1, 32, 7, 9), 1, GROUP),
    Spec("group m=16 N>tile", (2, 32, 14, 14), 1, GROUP, ("fp64",)),
    Spec("group m=24 N<tile", (1, 48, 5, 5), 1, GROUP),
    Spec("group m=24 N>tile", (1, 48, 9, 11), 1, GROUP),
    Spec("group m=31 N<tile", (1, 62, 3, 7), 1, GROUP),
    Spec("group m=31 N>tile", (1, 62, 10, 10), 1, GROUP),
    Spec("group m=32 N<tile", (1, 64, 5, 6), 1, GROUP),
    Spec("group m=32 N>tile", (1, 64, 11, 13), 1, GROUP, ("fp32",)),
    Spec("group m=48 N<tile", (1, 96, 4, 5), 1, GROUP),
    Spec("group m=48 N>tile", (1, 96, 7, 7), 1, GROUP),
    Spec("group m=64 N<tile", (1, 128, 3, 5), 1, GROUP),
    Spec("group m=64 N>tile", (1, 128, 8, 9), 1, GROUP, ("fp32", "fp64")),
    Spec("group m=64 G=8", (1, 1024, 7, 7), 8, GROUP),
    # channels_last: the NHWC kernels (csrc/cuda/nhwc_tiles.cuh: statistics and SALayer in tiles
    # of 32 lanes of a channel, or of a pack of 4 (2 fp64) where the grid keeps enough blocks, by
    # chunks of 256 pixels (SALayer's backward: 64 on small grids); nhwc_windows.cuh:
    # ShuffleAttention's windows of whole branches, walked in staged tiles of pixels)
    Spec("nhwc 32+8 ch, 2/6 chunks", (2, 40, 17, 19), 5, PLANE, ("fp32", "bf16"), True),
    Spec("nhwc 8 ch, 4/15 chunks", (1, 8, 30, 30), 2, PLANE, (), True),
    Spec("nhwc 256 ch, 28x28", (2, 256, 28, 28), 32, PLANE, ("fp32",), True),
    # packs: the forward's 64 * 2 chunks * 2 tiles = 256 blocks (>= 256), the backward's 64 * 5
    # chunks of 64 pixels * 2 tiles = 640 (>= 512)
    Spec("nhwc packs 256 ch, 17x17", (64, 256, 17, 17), 32, PLANE, ("fp32",), True),
    # packs straddle the branches; forward 64 * 5 tiles = 320 blocks, backward 640
    Spec("nhwc packs m=5, 9x9", (64, 520, 9, 9), 52, PLANE, (), True),
    Spec("nhwc win 16+4 m=4", (2, 40, 17, 19), 5, GROUP, ("fp32", "bf16"), True),
    Spec("nhwc win 17x2 m=17", (1, 68, 5, 7), 2, GROUP, ("fp32",), True),
    # 200 KB of shared memory in the fp64 backward (opt-in above 48 KiB)
    Spec("nhwc win 64 m=64", (1, 128, 8, 9), 1, GROUP, ("fp64",), True),
    Spec("nhwc win 16 m=8 28x28", (2, 512, 28, 28), 32, GROUP, (), True),
]


@dataclass(frozen=True)
class Case:
    spec: Spec
    variant: str
    dtype: str
    offsets: tuple[int, ...]  # one case per offset; they share the reference computations

    @property
    def label(self) -> str:
        return f"{self.variant:<17} {self.spec.path:<24} {str(self.spec.shape):<17} G={self.spec.groups}"


def cases(
    which: str, dtypes: list[str] | None, offsets: list[int] | None, pattern: str | None
) -> list[Case]:
    out = []
    for spec in SPECS:
        if which == "small":
            if not spec.small:
                continue
            variants, spec_dtypes, spec_offsets = spec.variants[:1], spec.small, SMALL_OFFSETS
        else:
            variants, spec_dtypes, spec_offsets = spec.variants, tuple(DTYPES), OFFSETS
        spec_dtypes = [d for d in spec_dtypes if dtypes is None or d in dtypes]
        spec_offsets = tuple(o for o in spec_offsets if offsets is None or o in offsets)
        for variant in variants:
            for dtype in spec_dtypes:
                case = Case(spec, variant, dtype, spec_offsets)
                if spec_offsets and (pattern is None or re.search(pattern, case.label)):
                    out.append(case)
    return out


def output_names(variant: str) -> list[str]:
    return ["out", "mean", "rstd", "grad_x", *(f"grad_{n}" for n in PARAM_ARG_NAMES[variant])]


def run_op(ops, variant: str, x, grad_out, groups: int, params) -> list[torch.Tensor]:
    """The forward op, then the backward op on the forward's statistics: 10 tensors."""
    out, mean, rstd = getattr(ops, f"{variant}_forward")(x, groups, *params, EPS)
    grads = getattr(ops, f"{variant}_backward")(grad_out, x, mean, rstd, groups, *params)
    return [out, mean, rstd, *grads]


def poison_allocator(device: torch.device) -> bool:
    """Leaves NaN bytes (0xff) in every block the CUDA caching allocator holds: the cache is
    emptied first (so no block keeps a previous run's valid-looking results), then a 64 MiB block
    (large pool) and 8 MiB of small blocks (the small pool serves requests <= 1 MiB) are filled
    and freed, and the next allocations are carved from them."""
    if not caching_allocator_active(device):
        return False
    torch.cuda.empty_cache()
    blocks = [torch.full((64 << 20,), 255, dtype=torch.uint8, device=device)]
    blocks += [torch.full((512 << 10,), 255, dtype=torch.uint8, device=device) for _ in range(16)]
    del blocks
    return True


def at_offset(
    values: torch.Tensor, offset: int, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """values copied into a fresh flat buffer on device, starting `offset` elements in, dense
    NCHW or dense channels_last."""
    flat = torch.empty(values.numel() + offset, dtype=values.dtype, device=device)
    B, C, H, W = values.shape
    strides = (H * W * C, 1, W * C, C) if channels_last else values.contiguous().stride()
    view = flat[offset:].as_strided(values.shape, strides)
    view.copy_(values)
    return view


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def references(case: Case, seed: int):
    """Inputs (rounded to the case's dtype, on the CPU) and the two yardsticks of every output:
    the CPU op in float64 (the truth) and eager PyTorch in the case's dtype."""
    spec, variant, dtype = case.spec, case.variant, DTYPES[case.dtype]
    ref = make_ref(variant, spec.shape[1], spec.groups, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    # per-channel offsets and scales, so planes have different means and variances
    C = spec.shape[1]
    x = (
        torch.randn(spec.shape, generator=gen, dtype=torch.float64)
        * (0.5 + torch.rand(1, C, 1, 1, generator=gen, dtype=torch.float64))
        + torch.randn(1, C, 1, 1, generator=gen, dtype=torch.float64)
    ).to(dtype)
    grad_out = torch.randn(spec.shape, generator=gen, dtype=torch.float64).to(dtype)
    named = dict(ref.named_parameters())
    params = [named[k].detach() for k in PARAM_KEYS[variant]]

    truth = run_op(
        torch.ops.sa_cuda,
        variant,
        x.double(),
        grad_out.double(),
        spec.groups,
        [p.double() for p in params],
    )
    eager = forward_backward(ref, x, grad_out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(acc), dim=(2, 3), unbiased=False)
    eager_list = [
        eager["out"],
        mean,
        (var + EPS).rsqrt(),
        eager["x"],
        *(eager[k] for k in PARAM_KEYS[variant]),
    ]
    want_dtypes = [dtype, acc, acc, dtype, *([dtype] * 6)]
    return x, grad_out, params, truth, eager_list, want_dtypes


def compare(names, got, again, truth, eager, want_dtypes) -> dict:
    result = {}
    for name, g, g2, r, e, want in zip(names, got, again, truth, eager, want_dtypes):
        g_cpu = g.detach().cpu()
        scale = max_abs(r)
        err_eager = max_err(e.reshape(r.shape), r)
        bound = accuracy_bound(want, scale, err_eager)
        finite = bool(torch.isfinite(g_cpu).all())
        err = max_err(g_cpu, r) if g_cpu.shape == r.shape else float("inf")
        checks = {
            "finite": finite,
            "dtype": g.dtype == want,
            "shape": g.shape == r.shape,
            "accuracy": finite and err <= bound,
            "bitwise_repeat": bit_identical(g, g2),
        }
        result[name] = {
            "err": err,
            "bound": bound,
            "err_eager": err_eager,
            "max_abs_ref": scale,
            **checks,
            "ok": all(checks.values()),
        }
    return result


def describe_failure(outputs: dict) -> str:
    parts = []
    for name, o in outputs.items():
        if o["ok"]:
            continue
        why = [k for k in ("finite", "dtype", "shape", "bitwise_repeat") if not o[k]]
        if not o["accuracy"] and o["finite"]:
            why.append(f"err {o['err']:.3g} > bound {o['bound']:.3g} (eager {o['err_eager']:.3g})")
        parts.append(f"{name}: {', '.join('not ' + w if ' ' not in w else w for w in why)}")
    return "; ".join(parts)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="cuda")
    p.add_argument("--set", dest="which", choices=("full", "small"), default="full")
    p.add_argument("--dtypes", help="comma list of " + ",".join(DTYPES) + " (default: the set's)")
    p.add_argument(
        "--offsets", help="comma list of storage offsets in elements (default: the set's)"
    )
    p.add_argument("--cases", help="regular expression on the case label (variant, path, shape)")
    p.add_argument(
        "--corrupt",
        choices=output_names("sa_layer") + output_names("shuffle_attention"),
        help="test hook: perturb this output of the kernels' result before the check",
    )
    p.add_argument("--json", help="write the per-case results here")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--seed", type=int, default=0)
    return p, p.parse_args(argv)


def check_offset(ops, device, case, offset, prepared, corrupt) -> tuple[dict, str, str]:
    """One case at one storage offset: two poisoned runs, compared with the references.
    ``prepared``: references()'s result, or the error string of a failed reference.
    Returns (row, detail of a failure, summary)."""
    row = {
        "path": case.spec.path,
        "variant": case.variant,
        "shape": case.spec.shape,
        "groups": case.spec.groups,
        "dtype": case.dtype,
        "offset": offset,
    }
    names = output_names(case.variant)
    try:
        if isinstance(prepared, str):
            raise RuntimeError(prepared)
        x, grad_out, params, truth, eager, want_dtypes = prepared
        params_dev = [t.to(device) for t in params]
        runs = []
        for _ in range(2):
            poison_allocator(device)
            x_dev = at_offset(x, offset, device, case.spec.channels_last)
            gy_dev = at_offset(grad_out, offset, device, case.spec.channels_last)
            runs.append(run_op(ops, case.variant, x_dev, gy_dev, case.spec.groups, params_dev))
            del x_dev, gy_dev
        if device.type == "cuda":
            torch.cuda.synchronize()
        if corrupt in names:
            bad = runs[0][names.index(corrupt)]
            bad.view(-1)[0] += 1.0 + bad.detach().abs().max()
        row["outputs"] = compare(names, runs[0], runs[1], truth, eager, want_dtypes)
        row["ok"] = all(o["ok"] for o in row["outputs"].values())
        worst = max(
            o["err"] / o["bound"] if o["bound"] > 0 else 0.0 for o in row["outputs"].values()
        )
        return row, describe_failure(row["outputs"]), f"max err/bound {worst:.2g}"
    except Exception as exc:  # noqa: BLE001  (a crash is a failure; go on with the rest)
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return row, row["error"], ""


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    dtypes = args.dtypes.split(",") if args.dtypes else None
    if dtypes and not set(dtypes) <= set(DTYPES):
        p.error(f"unknown dtype in {dtypes}; choose from {list(DTYPES)}")
    offsets = [int(o) for o in args.offsets.split(",")] if args.offsets else None
    todo = cases(args.which, dtypes, offsets, args.cases)
    if not todo:
        p.error("no case matches")
    if args.list:
        for case in todo:
            print(f"{case.label} {case.dtype:<4} offsets {case.offsets}")
        return 0

    ops, device = backend_ops(args.backend)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    results, passed, failed = [], 0, 0
    report = {
        "backend": args.backend,
        "device": str(device),
        "set": args.which,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "poisoned_allocator": caching_allocator_active(device),
        "corrupt": args.corrupt,
        "cases": results,
    }
    for index, case in enumerate(todo):
        try:
            prepared = references(case, args.seed + index)
        except Exception as exc:  # noqa: BLE001  (the yardstick itself failed: report, go on)
            prepared = f"reference: {type(exc).__name__}: {exc}"
        for offset in case.offsets:
            row, detail, summary = check_offset(ops, device, case, offset, prepared, args.corrupt)
            results.append(row)
            passed += row["ok"]
            failed += not row["ok"]
            print(
                f"{'PASS' if row['ok'] else 'FAIL'} {case.label} {case.dtype:<4} off={offset} "
                f"{summary}{'  ' + detail if detail else ''}",
                flush=True,
            )
        report.update(passed=passed, failed=failed, seconds=round(time.perf_counter() - t0, 1))
        write_json(args.json, report)
    print(
        f"launch paths ({args.backend}, set {args.which}): {passed} PASS, {failed} FAIL "
        f"({report['seconds']} s; allocator poisoned with NaN: "
        f"{'yes' if report['poisoned_allocator'] else 'no'})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
