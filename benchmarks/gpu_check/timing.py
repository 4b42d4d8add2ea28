"""Timing of both variants at the SA-ResNet-50 stage shapes: eager (sa_cuda.reference),
torch.compile (of the reference module) and fused (sa_cuda's module); forward, backward, fwd+bwd;
each against a device-to-device copy of the same bytes timed in the same run.

Per config (variant, shape, dtype) the fused module is first checked against the float64
reference (benchmarks/bench.py's check_fused); a failing fused config is not timed. The passes and
the model bytes are bench.py's (fwd 2*n*e, bwd 3*n*e, fwdbwd 5*n*e; bwd = backward alone through a
retained graph). The copy moves the same bytes: model bytes / 2 elements read and written.

CUDA: CUDA-graph replay. Several iterations are captured into one graph (enough for ~2 ms), the
graph is replayed repeatedly, time per iteration = replay time / iterations; so launch overhead
does not hide kernel time. Iterations rotate over copies of the inputs whose total exceeds twice
the L2 cache, so small shapes are not timed out of a warm L2 (the copy rotates the same way).
CPU (the CPU mode of benchmarks/gpu_check.sh): bench.py's CPU timer, no graphs.

torch.compile costs tens of seconds per new graph, so it runs last, only at --compile-batches,
while --budget leaves time; configs it cannot reach are listed as skipped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config  # noqa: F401  (patched below)

from common import DTYPES, VARIANTS, write_json
from summary import format_timing_table
import bench

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]   # SA-ResNet-50 at 224x224, G = 64
TINY_STAGES = [(256, 4)]                                   # the CPU mode's smoke shape
IMPLS = ("eager", "compile", "fused")
PASSES = ("fwd", "bwd", "fwdbwd")


def stage_shapes(batches: list[int], tiny: bool) -> list[bench.Shape]:
    stages = TINY_STAGES if tiny else STAGES
    return [bench.Shape(f"{'tiny' if tiny else 'r50'}-l{i + 1}-b{b}", b, c, hw, hw, 64)
            for b in batches for i, (c, hw) in enumerate(stages)]


class GraphTimer:
    """CUDA-graph replay (module docstring). time(make_fns, bytes_per_call) takes a function that
    returns one zero-argument callable per input copy (make_fns(copies))."""

    def __init__(self, device: torch.device, target_ms: float = 2.0, replays: int = 15) -> None:
        self.device, self.target_ms, self.replays = device, target_ms, replays
        props = torch.cuda.get_device_properties(device)
        self.l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        self.stream = torch.cuda.Stream(device)

    def copies_for(self, bytes_per_call: int) -> int:
        return max(1, min(16, math.ceil(2 * self.l2_bytes / max(bytes_per_call, 1))))

    def time(self, make_fns, bytes_per_call: int) -> dict:
        s = self.stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):  # the backward of a retained forward runs on the forward's stream
            fns = make_fns(self.copies_for(bytes_per_call))
            for _ in range(2):
                for fn in fns:
                    fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(s)
            for fn in fns:
                fn()
            end.record(s)
            end.synchronize()
            per_call = max(start.elapsed_time(end) / len(fns), 1e-4)
            iters = len(fns) * max(1, min(200 // len(fns), math.ceil(self.target_ms / per_call / len(fns))))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                for i in range(iters):
                    fns[i % len(fns)]()
            graph.replay()
            times = []
            for _ in range(self.replays):
                start.record(s)
                graph.replay()
                end.record(s)
                end.synchronize()
                times.append(start.elapsed_time(end) / iters)
        torch.cuda.current_stream(self.device).wait_stream(s)
        del graph, fns
        q = statistics.quantiles(times, n=4, method="inclusive")
        return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2],
                "iters_per_graph": iters, "input_copies": self.copies_for(bytes_per_call),
                "timer": "CUDA graph replay"}


class CpuTimer:
    """bench.py's CPU timer (blocked_autorange) on the first input copy."""

    def __init__(self, min_run_time: float) -> None:
        threads = torch.get_num_threads()
        self.bencher = bench.Bencher(torch.device("cpu"), threads, True, min_run_time, 0, 0)

    def time(self, make_fns, bytes_per_call: int) -> dict:
        t = self.bencher(make_fns(1)[0])
        return {"median_ms": t.median_ms, "p25_ms": t.p25_ms, "p75_ms": t.p75_ms,
                "iters_per_graph": None, "input_copies": 1, "timer": t.timer}


def compiled(ref: torch.nn.Module, backend: str) -> torch.nn.Module:
    torch._dynamo.reset()  # fresh caches per config: no recompile limit, no stale guards
    return torch.compile(ref, dynamic=False, backend=backend)


def time_config(timer, variant, shape, dname, device, impls, passes, args, deadline, copies,
                inputs_cache) -> tuple[list[dict], dict | None]:
    """Rows of one (variant, shape, dtype) for `impls`, and the fused check (None if not run)."""
    dtype = DTYPES[dname]
    e = torch.empty((), dtype=dtype).element_size()
    n = shape.n
    common = {"variant": variant, "shape": shape.name, "B": shape.B, "C": shape.C, "H": shape.H,
              "W": shape.W, "G": shape.G, "dtype": dname}
    ref, fused = bench.make_modules(variant, shape, dtype, device, args.seed)
    key = (shape.name, dname)
    if key not in inputs_cache:
        inputs_cache.clear()  # one shape's inputs at a time (B = 64 inputs are 200 MB each)
        inputs_cache[key] = bench.make_inputs(shape, dtype, device, args.seed)
    x, gy = inputs_cache[key]
    rows, check = [], None
    fused_ok = True
    if "fused" in impls:
        try:
            check = bench.check_fused(ref, fused, x, gy)
        except Exception as exc:  # noqa: BLE001
            check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        check = {**common, **check}
        fused_ok = check["ok"]
    for impl in impls:
        mod = None
        for pass_ in passes:
            model_bytes = bench.BYTES_FACTOR[pass_] * n * e
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
                    mod = (compiled(ref, args.compile_backend) if impl == "compile"
                           else bench.build_impl(impl, ref, fused))
                params = list((fused if impl == "fused" else ref).parameters())

                def make_fns(count, mod=mod, pass_=pass_, params=params):
                    pairs = [(x, gy)] + [(x.detach().clone().requires_grad_(True), gy.clone())
                                         for _ in range(count - 1)]
                    return [bench.pass_fn(impl, pass_, mod, xi, gyi, params) for xi, gyi in pairs]

                # no donated buffers: the compiled backward must accept retain_graph (bench.py)
                with torch._functorch.config.patch(donated_buffer=False):
                    t = timer.time(make_fns, model_bytes)
                copy_elems = model_bytes // (2 * e)
                if (copy_elems, dname) not in copies:
                    copies[(copy_elems, dname)] = time_copy(timer, copy_elems, dtype, device)
                c = copies[(copy_elems, dname)]
                gbps = model_bytes / t["median_ms"] / 1e6
                row.update(status="ok", **t, gbps=gbps, copy_ms=c["median_ms"], copy_gbps=c["gbps"],
                           pct_of_copy=100 * gbps / c["gbps"])
            except Exception as exc:  # noqa: BLE001  (recorded; the other rows go on)
                row.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        del mod
    return rows, check


def time_copy(timer, elems: int, dtype: torch.dtype, device: torch.device) -> dict:
    e = torch.empty((), dtype=dtype).element_size()

    def make_fns(count):
        pairs = [(torch.randn(elems, device=device).to(dtype), torch.empty(elems, dtype=dtype, device=device))
                 for _ in range(count)]
        return [lambda src=src, dst=dst: dst.copy_(src) for src, dst in pairs]

    t = timer.time(make_fns, 2 * elems * e)
    return {"elements": elems, "bytes": 2 * elems * e, **t, "gbps": 2 * elems * e / t["median_ms"] / 1e6}


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
    fig, axes = plt.subplots(len(series), len(PASSES), squeeze=False, sharey=True,
                             figsize=(5 * len(PASSES), 3.2 * len(series) + 0.8))
    width = 0.8 / len(impls)
    for i, (variant, dname) in enumerate(series):
        for j, pass_ in enumerate(PASSES):
            ax = axes[i][j]
            for k, impl in enumerate(impls):
                vals = []
                for s in shapes:
                    hit = [r for r in ok if (r["variant"], r["dtype"], r["pass"], r["impl"], r["shape"])
                           == (variant, dname, pass_, impl, s)]
                    vals.append(hit[0]["pct_of_copy"] if hit else math.nan)
                xs = [x + (k - (len(impls) - 1) / 2) * width for x in range(len(shapes))]
                ax.bar(xs, vals, width, label=impl)
            ax.axhline(100, color="black", linewidth=0.8)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=45, ha="right", fontsize=7)
            ax.set_xlabel("shape (stage, batch)", fontsize=8)
            ax.set_ylabel("% of copy bandwidth", fontsize=8)
            ax.set_title(f"{variant} {dname} {pass_}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batches", default="8,64")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--compile-batches", default="8",
                   help="batches at which torch.compile is timed (each new graph costs tens of s)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (the CPU mode uses aot_eager: no code generation)")
    p.add_argument("--compile-reserve", type=float, default=45.0,
                   help="seconds of budget a config's torch.compile needs to start")
    p.add_argument("--tiny", action="store_true", help="a tiny shape (the CPU mode)")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds: timings that would start later are listed as skipped")
    p.add_argument("--min-run-time", type=float, default=0.02, help="CPU seconds per measurement")
    p.add_argument("--json")
    p.add_argument("--png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.monotonic()
    deadline = t0 + args.budget
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device")
    batches = [int(b) for b in args.batches.split(",")]
    compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
    dtypes = args.dtypes.split(",")
    variants = args.variants.split(",")
    impls = args.impls.split(",")
    for name, values, allowed in (("dtypes", dtypes, DTYPES), ("variants", variants, VARIANTS),
                                  ("impls", impls, IMPLS)):
        if not set(values) <= set(allowed):
            p.error(f"--{name}: choose from {list(allowed)}")
    timer = GraphTimer(device) if device.type == "cuda" else CpuTimer(args.min_run_time)
    shapes = stage_shapes(batches, args.tiny)
    configs = [(v, s, d) for s in shapes for d in dtypes for v in variants]
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else bench.cpu_model_name()
    title = f"sa_cuda {bench.sa_cuda.__version__} | {label} | torch {torch.__version__}"
    rows, checks, copies, inputs_cache = [], [], {}, {}
    report = {"title": title, "device": label, "torch": torch.__version__,
              "timer": "CUDA graph replay" if device.type == "cuda" else "bench.py CPU timer",
              "model_bytes": "fwd 2*n*e, bwd 3*n*e, fwdbwd 5*n*e; copy of the same bytes",
              "compile": {"batches": sorted(compile_batches), "backend": args.compile_backend},
              "rows": rows, "checks": checks}

    def save():
        report["copies"] = list(copies.values())
        report["seconds"] = round(time.monotonic() - t0, 1)
        write_json(args.json, report)

    # eager and fused everywhere first; torch.compile (slow to build) with the time left
    # the compile phase goes as far as the budget allows: stages 1 and 4 first, then 2 and 3
    stage_rank = {"l1": 0, "l4": 1, "l2": 2, "l3": 3}
    compile_configs = sorted((c for c in configs if c[1].B in compile_batches),
                             key=lambda c: (c[1].B, stage_rank[c[1].name.split("-")[1]],
                                            dtypes.index(c[2])))
    phases = [([i for i in impls if i != "compile"], configs),
              (["compile"] if "compile" in impls else [], compile_configs)]
    for phase_impls, phase_configs in phases:
        for variant, shape, dname in phase_configs:
            if not phase_impls:
                continue
            cfg_rows, check = time_config(timer, variant, shape, dname, device, phase_impls, PASSES,
                                          args, deadline, copies, inputs_cache)
            rows.extend(cfg_rows)
            if check is not None:
                checks.append(check)
                if not check["ok"]:
                    print(f"FAILED fused check {variant} {shape.name} {dname}: "
                          f"{check.get('error') or check.get('tensors')}", flush=True)
            save()
            done = [r for r in cfg_rows if r["status"] == "ok"]
            print(f"[{time.monotonic() - t0:6.1f}s] {variant} {shape.name} {dname} "
                  f"{','.join(phase_impls)}: {len(done)}/{len(cfg_rows)} timed", flush=True)
        inputs_cache.clear()
    print()
    print(title)
    print(f"timer: {report['timer']}; model bytes: {report['model_bytes']}; %copy = model bytes / "
          f"time relative to the copy's bandwidth; torch.compile at batch {sorted(compile_batches)} "
          f"only (backend {args.compile_backend}), as far as the {args.budget:.0f} s budget went")
    print(format_timing_table(rows, impls))
    failed = [c for c in checks if not c["ok"]]
    errors = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    print(f"fused checks: {len(checks) - len(failed)} ok, {len(failed)} FAILED; "
          f"timing errors: {len(errors)}; skipped for time: {len(skipped)}")
    for r in errors:
        print(f"  error {r['variant']} {r['shape']} {r['dtype']} {r['impl']} {r['pass']}: {r['error']}")
    save()
    if args.png and plot(rows, impls, title, Path(args.png)):
        print(f"PNG: {args.png}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
