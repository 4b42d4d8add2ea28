"""Timing of both variants at the SA-ResNet-50 stage shapes: eager (sa_cuda.reference),
torch.compile (of the reference module) and fused (sa_cuda's module); forward, backward, fwd+bwd;
each against a device-to-device copy of the same bytes timed in the same run.

Per config (variant, shape, dtype) the fused module is first checked against the float64
reference (benchmarks.harness.check_fused); a failing fused config is not timed. The passes and
the model bytes are those of benchmarks.timers (fwd 2*n*e, bwd 3*n*e, fwdbwd 5*n*e; bwd = backward alone through a
retained graph). The copy moves the same bytes: model bytes / 2 elements read and written.

--channels-last: x and grad_out channels_last (the NHWC kernels; shapes named ``<stage>-cl-b<B>``), for
gpu_check.sh's channels_last step, whose fused rows divided by the timing step's give cl / NCHW.

--residual: the bottleneck tail relu(SA(x) + identity) instead of the layer (shapes named
``<stage>-tail-b<B>``), for gpu_check.sh's residual step: eager and torch.compile run the
reference layer followed by the add and relu, fused the residual epilogue (one op each way; its
backward reads out with grad_out and writes grad_identity on the way, csrc/cuda/sa_grad.cuh). Model
bytes: fwd 3*n*e (x and identity read, out written), bwd 5*n*e (grad_out, out and x read, grad_x
and grad_identity written), fwdbwd 8*n*e. identity is one tensor per config, not rotated.

CUDA: CUDA-graph replay (benchmarks.timers.GraphTimer: several iterations per graph, inputs
rotated over copies exceeding twice the L2 cache). CPU (the CPU mode of benchmarks/gpu_check.sh):
the CPU timer of benchmarks.timers.Bencher, no graphs.

torch.compile costs tens of seconds per new graph, so it runs last, only at --compile-batches,
while --budget leaves time; configs it cannot reach are listed as skipped.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config  # noqa: F401  (patched below)
from common import DTYPES, VARIANTS, write_json
from summary import format_timing_table

import sa_cuda
from benchmarks import harness, report, timers
from benchmarks.configs import stage_shapes
from benchmarks.residual import Tail
from benchmarks.timers import Bencher, GraphTimer, time_copy

IMPLS = ("eager", "compile", "fused")
PASSES = ("fwd", "bwd", "fwdbwd")


def compiled(ref: torch.nn.Module, backend: str) -> torch.nn.Module:
    torch._dynamo.reset()  # fresh caches per config: no recompile limit, no stale guards
    return torch.compile(ref, dynamic=False, backend=backend)


def measure(timer, impl, pass_, mod, inputs, params, model_bytes, copies) -> dict:
    """One pass of one implementation timed, with the same-run copy of its model bytes."""
    x, gy = inputs

    def make_fns(count):
        pairs = [(x, gy)] + [
            (x.detach().clone().requires_grad_(True), gy.clone()) for _ in range(count - 1)
        ]
        return [harness.pass_fn(impl, pass_, mod, xi, gyi, params) for xi, gyi in pairs]

    # no donated buffers: the compiled backward must accept retain_graph (harness.pass_fn)
    with torch._functorch.config.patch(donated_buffer=False):
        t = timer.time(make_fns, model_bytes)
    dname = next(k for k, v in DTYPES.items() if v == x.dtype)
    copy_elems = model_bytes // (2 * x.element_size())
    if (copy_elems, dname) not in copies:
        copies[(copy_elems, dname)] = {
            "dtype": dname,
            **time_copy(timer, copy_elems, x.dtype, x.device),
        }
    c = copies[(copy_elems, dname)]
    gbps = model_bytes / t["median_ms"] / 1e6
    return dict(
        status="ok",
        **t,
        gbps=gbps,
        copy_ms=c["median_ms"],
        copy_gbps=c["gbps"],
        pct_of_copy=100 * gbps / c["gbps"],
    )


def config_inputs(shape, dname, device, args, inputs_cache) -> tuple:
    """(x, gy, identity) of a shape and dtype, in the layout of --channels-last; identity (the
    tail's shortcut) only with --residual, else None. Cached for the shape's configs."""
    key = (shape.name, dname)
    if key not in inputs_cache:
        inputs_cache.clear()  # one shape's inputs at a time (B = 64 inputs are 200 MB each)
        dtype = DTYPES[dname]
        x, gy = harness.make_inputs(shape, dtype, device, args.seed)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        # the clones of measure() keep the layout (preserve_format)
        x = x.detach().contiguous(memory_format=fmt).requires_grad_(True)
        gy = gy.contiguous(memory_format=fmt)
        identity = None
        if args.residual:
            g = torch.Generator().manual_seed(args.seed + 3)
            identity = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
            identity = identity.contiguous(memory_format=fmt)
        inputs_cache[key] = (x, gy, identity)
    return inputs_cache[key]


def time_config(
    timer, variant, shape, dname, device, impls, passes, args, deadline, copies, inputs_cache
) -> tuple[list[dict], dict | None]:
    """Rows of one (variant, shape, dtype) for `impls`, and the fused check (None if not run)."""
    dtype = DTYPES[dname]
    n = shape.n
    common = {
        "variant": variant,
        "shape": shape.name,
        "B": shape.B,
        "C": shape.C,
        "H": shape.H,
        "W": shape.W,
        "G": shape.G,
        "dtype": dname,
    }
    stage, batch = shape.name.rsplit("-b", 1)
    if args.channels_last:
        stage += "-cl"
        common.update(layout="channels_last")
    if args.residual:
        stage += "-tail"
        common.update(residual=True)
    common.update(shape=f"{stage}-b{batch}")
    ref, fused = harness.make_modules(variant, shape, dtype, device, args.seed)
    x, gy, identity = config_inputs(shape, dname, device, args, inputs_cache)
    if args.residual:
        ref = Tail(ref, identity, fused=False)
        fused = Tail(fused, identity, fused=True)
    rows, check = [], None
    fused_ok = True
    if "fused" in impls:
        try:
            check = harness.check_fused(ref, fused, x, gy)
        except Exception as exc:  # noqa: BLE001
            check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        check = {**common, **check}
        fused_ok = check["ok"]
    for impl in impls:
        mod = None
        for pass_ in passes:
            model_bytes = timers.model_bytes(pass_, n, dtype, tail=args.residual)
            row = {**common, "impl": impl, "pass": pass_, "model_bytes": model_bytes}
            rows.append(row)
            if impl == "fused" and not fused_ok:
                row.update(status="FAILED check")
                continue
            # a compile (of a new graph) takes tens of seconds: start one only with time to spare
            reserve = args.compile_reserve if impl == "compile" and mod is None else 0.0
            if time.monotonic() + reserve > deadline:
                row.update(status="skipped: time")
                continue
            try:
                if mod is None:
                    mod = (
                        compiled(ref, args.compile_backend)
                        if impl == "compile"
                        else harness.build_impl(impl, ref, fused)
                    )
                params = list((fused if impl == "fused" else ref).parameters())
                row.update(measure(timer, impl, pass_, mod, (x, gy), params, model_bytes, copies))
            except Exception as exc:  # noqa: BLE001  (recorded; the other rows go on)
                row.update(
                    status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                )
        del mod
    return rows, check


def plot(rows: list[dict], impls: list[str], title: str, path: Path) -> bool:
    """Per (variant, dtype) row and pass column: each impl's bandwidth as % of the copy's, per shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    series = sorted({(r["variant"], r["dtype"]) for r in ok})
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: (int(s.split("-b")[1]), s))
    fig, axes = plt.subplots(
        len(series),
        len(PASSES),
        squeeze=False,
        sharey=True,
        figsize=(5 * len(PASSES), 3.2 * len(series) + 0.8),
    )
    width = 0.8 / len(impls)
    for i, (variant, dname) in enumerate(series):
        for j, pass_ in enumerate(PASSES):
            ax = axes[i][j]
            for k, impl in enumerate(impls):
                vals = []
                for s in shapes:
                    hit = [
                        r
                        for r in ok
                        if (r["variant"], r["dtype"], r["pass"], r["impl"], r["shape"])
                        == (variant, dname, pass_, impl, s)
                    ]
                    vals.append(hit[0]["pct_of_copy"] if hit else math.nan)
                xs = [x + (k - (len(impls) - 1) / 2) * width for x in range(len(shapes))]
                ax.bar(xs, vals, width, label=impl)
            ax.axhline(100, color="black", linewidth=0.8)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=45, ha="right", fontsize=7)
            ax.set_xlabel("shape (SA-ResNet-50 stage l<i>, batch b<B>)", fontsize=8)
            if j == 0:
                ax.set_ylabel("bandwidth, % of a copy of the same bytes", fontsize=8)
            ax.set_title(f"{variant} {dname} {pass_}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    report.save_figure(fig, axes, len(impls), title, path, dpi=100)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batches", default="8,64")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument(
        "--compile-batches",
        default="8",
        help="batches at which torch.compile is timed (each new graph costs tens of s)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (the CPU mode uses aot_eager: no code generation)",
    )
    p.add_argument(
        "--compile-reserve",
        type=float,
        default=45.0,
        help="seconds of budget a config's torch.compile needs to start",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny shape (the CPU mode)")
    p.add_argument(
        "--channels-last", action="store_true", help="channels_last x and grad_out (NHWC kernels)"
    )
    p.add_argument(
        "--residual", action="store_true", help="the bottleneck tail relu(SA(x) + identity)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="seconds: timings that would start later are listed as skipped",
    )
    p.add_argument("--min-run-time", type=float, default=0.02, help="CPU seconds per measurement")
    p.add_argument("--json")
    p.add_argument("--png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
    for name, allowed in (("dtypes", DTYPES), ("variants", VARIANTS), ("impls", IMPLS)):
        values = getattr(args, name).split(",")
        if not set(values) <= set(allowed):
            p.error(f"--{name}: choose from {list(allowed)}")
        setattr(args, name, values)
    return args


def phases(args: argparse.Namespace) -> list[tuple[list[str], list[tuple]]]:
    """[(implementations, configs)]: eager and fused everywhere first; then torch.compile (slow to
    build) as far as the budget allows, at --compile-batches, stages 1 and 4 first, then 2 and 3."""
    shapes = stage_shapes(args.batches, args.tiny)
    configs = [(v, s, d) for s in shapes for d in args.dtypes for v in args.variants]
    stage_rank = {"l1": 0, "l4": 1, "l2": 2, "l3": 3}
    compile_configs = sorted(
        (c for c in configs if c[1].B in args.compile_batches),
        key=lambda c: (c[1].B, stage_rank[c[1].name.split("-")[1]], args.dtypes.index(c[2])),
    )
    out = [([i for i in args.impls if i != "compile"], configs)]
    if "compile" in args.impls:
        out.append((["compile"], compile_configs))
    return [(impls, configs) for impls, configs in out if impls]


def print_summary(result: dict, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Prints the table and the counts; returns (failed checks, timing errors)."""
    rows, checks = result["rows"], result["checks"]
    print()
    print(result["title"])
    print(
        f"timer: {result['timer']}; model bytes: {result['model_bytes']}; %copy = model bytes / "
        f"time relative to the copy's bandwidth; torch.compile at batch "
        f"{sorted(args.compile_batches)} only (backend {args.compile_backend}), as far as the "
        f"{args.budget:.0f} s budget went"
    )
    print(format_timing_table(rows, args.impls))
    failed = [c for c in checks if not c["ok"]]
    errors = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    print(
        f"fused checks: {len(checks) - len(failed)} ok, {len(failed)} FAILED; "
        f"timing errors: {len(errors)}; skipped for time: {len(skipped)}"
    )
    for r in errors:
        print(
            f"  error {r['variant']} {r['shape']} {r['dtype']} {r['impl']} {r['pass']}: {r['error']}"
        )
    return failed, errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device")
    timer = (
        GraphTimer(device)
        if device.type == "cuda"
        else Bencher(device, torch.get_num_threads(), args.min_run_time)
    )
    label = report.device_name(device)
    title = f"sa_cuda {sa_cuda.__version__} | {label} | torch {torch.__version__}"
    rows, checks, copies, inputs_cache = [], [], {}, {}
    result = {
        "title": title,
        "device": label,
        "torch": torch.__version__,
        "timer": (
            "CUDA graph replay" if device.type == "cuda" else "benchmarks.timers.Bencher CPU timer"
        ),
        "model_bytes": (
            "fwd 3*n*e, bwd 5*n*e, fwdbwd 8*n*e (the tail)"
            if args.residual
            else "fwd 2*n*e, bwd 3*n*e, fwdbwd 5*n*e"
        )
        + "; copy of the same bytes",
        "compile": {"batches": sorted(args.compile_batches), "backend": args.compile_backend},
        "rows": rows,
        "checks": checks,
    }

    def save():
        result["copies"] = list(copies.values())
        result["seconds"] = round(time.monotonic() - t0, 1)
        write_json(args.json, result)

    for phase_impls, phase_configs in phases(args):
        for variant, shape, dname in phase_configs:
            cfg_rows, check = time_config(
                timer,
                variant,
                shape,
                dname,
                device,
                phase_impls,
                PASSES,
                args,
                deadline,
                copies,
                inputs_cache,
            )
            rows.extend(cfg_rows)
            if check is not None:
                checks.append(check)
                if not check["ok"]:
                    print(
                        f"FAILED fused check {variant} {shape.name} {dname}: "
                        f"{check.get('error') or check.get('tensors')}",
                        flush=True,
                    )
            save()
            done = [r for r in cfg_rows if r["status"] == "ok"]
            print(
                f"[{time.monotonic() - t0:6.1f}s] {variant} {shape.name} {dname} "
                f"{','.join(phase_impls)}: {len(done)}/{len(cfg_rows)} timed",
                flush=True,
            )
        inputs_cache.clear()
    failed, errors = print_summary(result, args)
    save()
    if args.png and plot(rows, args.impls, title, Path(args.png)):
        print(f"PNG: {args.png}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
