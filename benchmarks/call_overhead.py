"""What a fused SA layer costs around its kernel: the Python of the module and its
autograd.Function, the op dispatch, the allocation of the results (CPU, host clock).

- **Per call** (``calls``): a small input (B = 1, m = 2, 4x4 planes) whose kernel takes a few
  microseconds, called over and over: microseconds a call of the raw op (under no_grad) and of
  the module (under no_grad; forward with autograd; forward and backward), both variants, with
  the residual epilogue. ``around`` is the module's time less the raw ops' (forward op, plus the
  backward op for forward and backward): what the layer adds to its kernels. The module's result
  and gradients are first checked against the float64 reference.
- **Per call, cold** (``cold_us``): the same calls, each made right after a write of a buffer
  twice the last-level cache (the caches then hold other data, as the convolutions between two
  SA layers leave them): the raw forward op, and the module under no_grad and forward with
  autograd. ``cold_around`` is the module's cold time less the raw op's.
- **In SA-ResNet-50** (``model``, the layers as the model runs them): inference and training steps
  of the fused SA-ResNet-50 at batch ``--batch``, the bottleneck tails timed in place
  (benchmarks.tails: in this model a tail is the block's code after bn3, the SA module's call
  with the residual epilogue, forward and backward) while torch.profiler records the sa_cuda
  ops' own CPU time. ``around`` = tails less ops, per step (and its share of the step, timed
  under the profiler). In
  a model the code around the kernel runs with cold caches (the convolutions in between evict it):
  a call costs several times its time in the loop above.

    python -m benchmarks.call_overhead [--batch 8] [--resolution 224] [--steps 4] [--threads 2]
                                       [--cold-calls 200]

Prints both tables and writes ``call_overhead-<device>-<tag>.json``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import e2e, harness, report
from benchmarks.configs import RESULTS_DIR, VARIANTS, Shape
from benchmarks.residual import Tail
from benchmarks.tails import TailTimer
from benchmarks.timers import M_MMAP_MAX, M_TRIM_THRESHOLD, mallopt
from sa_cuda.ops import SA_CUDA_LIBRARY

SMALL = Shape("small", B=1, C=2 * 2 * 8, H=4, W=4, G=8)  # m = 2
GROUPS = SMALL.G


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` loops of ``calls`` calls, microseconds a call."""
    for _ in range(calls // 4):
        fn()
    loops = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - began) / calls)
    return 1e6 * statistics.median(loops)


def evicting_buffer() -> torch.Tensor:
    """A float32 buffer twice the largest cache that sysfs lists for CPU 0, at least 64 MiB."""
    units = {"K": 1 << 10, "M": 1 << 20}
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            largest = max(largest, int(text[:-1]) * units[text[-1]])
    return torch.empty(max(2 * largest, 64 << 20) // 4)


def cold_us(fn, calls: int, buffer: torch.Tensor) -> float:
    """Median microseconds of a call made right after ``buffer`` is written over."""
    times = []
    for i in range(calls):
        buffer.fill_(i)
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e6 * statistics.median(times)


def calls_table(variant: str, calls: int, repeats: int, cold_calls: int, buffer) -> dict:
    """The per-call table of one variant; ``buffer``: evicting_buffer(), written before each cold
    call."""
    cpu = torch.device("cpu")
    ref, fused = harness.make_modules(variant, SMALL, torch.float32, cpu, seed=0)
    x, gy = harness.make_inputs(SMALL, torch.float32, cpu, seed=0)
    x = x.detach()
    identity = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    # identity as a parameter of both tails, so that the check covers its gradient too
    shortcut = nn.Parameter(identity.clone())
    tails = (Tail(ref, shortcut, fused=False), Tail(fused, shortcut, fused=True))
    check = harness.check_fused(*tails, x, gy)
    params = [fused.get_parameter(key) for key in fused._variant.state_keys]
    eps = fused.gn.eps
    forward_op = SA_CUDA_LIBRARY.residual_forward_op(variant)
    backward_op = SA_CUDA_LIBRARY.residual_backward_op(variant)
    with torch.no_grad():
        out, mean, rstd = forward_op(x, identity, GROUPS, *params, eps)
    xg = x.clone().requires_grad_()

    def no_grad_module():
        with torch.no_grad():
            fused(x, identity=identity)

    def ops():
        with torch.no_grad():
            forward_op(x, identity, GROUPS, *params, eps)

    def backward_only():
        with torch.no_grad():
            backward_op(gy, out, x, mean, rstd, GROUPS, *params)

    times = {
        "forward op": per_call_us(ops, calls, repeats),
        "backward op": per_call_us(backward_only, calls, repeats),
        "module, no_grad": per_call_us(no_grad_module, calls, repeats),
        "module, forward": per_call_us(lambda: fused(xg, identity=identity), calls, repeats),
        "module, forward+backward": per_call_us(
            lambda: fused(xg, identity=identity).backward(gy), calls, repeats
        ),
    }
    kernels = {
        "module, no_grad": times["forward op"],
        "module, forward": times["forward op"],
        "module, forward+backward": times["forward op"] + times["backward op"],
    }
    around = {name: times[name] - ops_us for name, ops_us in kernels.items()}
    cold = {
        "forward op": cold_us(ops, cold_calls, buffer),
        "module, no_grad": cold_us(no_grad_module, cold_calls, buffer),
        "module, forward": cold_us(lambda: fused(xg, identity=identity), cold_calls, buffer),
    }
    cold_around = {
        name: us - cold["forward op"] for name, us in cold.items() if name != "forward op"
    }
    return {
        "variant": variant,
        "check": check,
        "us": times,
        "around_us": around,
        "cold_us": cold,
        "cold_around_us": cold_around,
    }


def model_table(batch: int, resolution: int, steps: int) -> dict:
    """The fused SA-ResNet-50's tails, timed in place, against its sa_cuda ops' CPU time."""
    model = e2e.make_models(torch.device("cpu"))["fused"]
    images = torch.randn(batch, 3, resolution, resolution)
    labels = torch.randint(0, 1000, (batch,))
    fns = e2e.step_fns(model, images, labels, torch.device("cpu"), "fp32")
    timer = TailTimer(model)
    rows = {}
    for step in ("infer", "train"):
        model.train(step == "train")
        fns[step]()
        timer.discard()
        tails, ops, totals = [], [], []
        for _ in range(steps):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                began = time.perf_counter()
                fns[step]()
                totals.append(time.perf_counter() - began)
            tails.append(sum(timer.end_step().values()))
            sa_us = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("sa_cuda::"))
            ops.append(sa_us / 1e6)
        ms = {name: 1e3 * statistics.median(v) for name, v in zip(("tails", "ops"), (tails, ops))}
        around = 1e3 * statistics.median(t - o for t, o in zip(tails, ops))
        step_ms = 1e3 * statistics.median(totals)
        rows[step] = {**ms, "around": around, "step": step_ms, "around_share": around / step_ms}
    timer.remove()
    return {"batch": batch, "resolution": resolution, "steps": steps, "ms": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.call_overhead", description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--steps", type=int, default=4, help="profiled steps of each kind")
    p.add_argument("--calls", type=int, default=2000, help="calls a timed loop")
    p.add_argument("--repeats", type=int, default=9, help="timed loops of each case")
    p.add_argument("--cold-calls", type=int, default=200, help="cold calls of each case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-model", action="store_true", help="only the per-call table")
    p.add_argument("--quick", action="store_true", help="few calls, batch 2 at 64x64, 1 step")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.resolution, args.steps, args.calls, args.repeats = 2, 64, 1, 100, 3
        args.cold_calls = 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1})  # no page faults for the allocator's choices
    buffer = evicting_buffer()
    calls = [calls_table(v, args.calls, args.repeats, args.cold_calls, buffer) for v in VARIANTS]
    print("per call, us (small input; around = the module less its raw ops):")
    for row in calls:
        cells = "  ".join(f"{name} {us:.1f}" for name, us in row["us"].items())
        around = "  ".join(f"{name} {us:.1f}" for name, us in row["around_us"].items())
        print(f"  {row['variant']} [check {'ok' if row['check']['ok'] else 'FAILED'}]: {cells}")
        print(f"  {row['variant']} around: {around}")
        cold = "  ".join(f"{name} {us:.1f}" for name, us in row["cold_us"].items())
        cold_around = "  ".join(f"{name} {us:.1f}" for name, us in row["cold_around_us"].items())
        print(f"  {row['variant']} cold: {cold}")
        print(f"  {row['variant']} cold around: {cold_around}")
    result = {"device": report.device_label(torch.device("cpu"), args.threads), "calls": calls}
    if not args.no_model:
        result["model"] = model_table(args.batch, args.resolution, args.steps)
        print(
            f"SA-ResNet-50 fused, batch {args.batch}, {args.resolution}x{args.resolution}, ms a step:"
        )
        for step, row in result["model"]["ms"].items():
            print(
                f"  {step}: tails {row['tails']:.2f}, sa_cuda ops {row['ops']:.2f}, around "
                f"{row['around']:.2f} ({100 * row['around_share']:.2f}% of the {row['step']:.0f} "
                "ms step)"
            )
    result["loadavg"] = report.loadavg()
    path = report.output_stem("call_overhead", result["device"], args).with_suffix(".json")
    report.write_json(path, result)
    print(f"wrote {path}")
    return report.exit_status(
        [
            f"{row['variant']}: module vs the float64 reference"
            for row in calls
            if not row["check"]["ok"]
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
