"""Microbenchmarks of the Shuffle Attention layer: eager reference vs torch.compile vs sa_cuda,
run as ``python -m benchmarks.bench [flags]`` (benchmarks/README.md: what is measured, the flags,
the output).

Per (variant, shape, dtype) config (benchmarks/measure.py): the fused module is checked against
a float64 reference on the very inputs that are then timed (a wrong result is FAILED, never timed,
and makes the run exit 1 at the end), a copy of the same number of elements is timed (the
bandwidth yardstick), then each implementation's memory and passes. Then, unless --no-e2e,
SA-ResNet-50 end to end (benchmarks/e2e.py). Results: tables on stdout, JSON + PNG in --out-dir,
named ``<device>-<YYYY-MM-DD>[-<tag>].json``; ``--replot JSON`` only redraws an earlier run's PNG.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import sys
from pathlib import Path

import torch

import sa_cuda
from benchmarks import e2e, harness, measure, report
from benchmarks.configs import DTYPES, PASSES, SHAPES, Plan, make_plan, parse_args
from benchmarks.timers import BYTES_FACTOR, Bencher, time_copy


def run_configs(
    plan: Plan, bencher: Bencher, seed: int, progress: report.Progress, failures: list[str]
) -> dict:
    """Checks and times every config of the plan: {"checks", "copy", "results", "memory"}."""
    out = {"checks": [], "copy": [], "results": [], "memory": []}
    copies: dict[tuple[int, str], dict] = {}
    for variant, shape, dname in plan.configs():
        dtype = DTYPES[dname]
        if plan.cuda:
            torch.cuda.empty_cache()
        ref, fused = harness.make_modules(variant, shape, dtype, plan.device, seed)
        x, gy = harness.make_inputs(shape, dtype, plan.device, seed)
        cfg = measure.Config(variant, shape, dname, ref, fused, x, gy, failures)
        fused_ok = "fused" in plan.impls
        if fused_ok:
            chk = measure.check(cfg, progress)
            out["checks"].append(chk)
            fused_ok = chk["ok"]
        progress.step(f"{cfg.key} check")
        if (shape.n, dname) not in copies:
            copies[(shape.n, dname)] = {
                "dtype": dname,
                **time_copy(bencher, shape.n, dtype, plan.device),
            }
        progress.step(f"{cfg.key} copy")
        if any(i.startswith("compile") for i in plan.impls):
            torch._dynamo.reset()  # fresh caches: no recompile limit, no stale guards
        cfg_rows = []
        for impl in plan.impls:
            if impl == "fused" and not fused_ok:
                rows, mem = measure.failed_impl(cfg, impl, plan.passes, progress)
            else:
                rows, mem = measure.measure_impl(
                    cfg, bencher, impl, plan.passes, copies[(shape.n, dname)]["gbps"], progress
                )
            cfg_rows += rows
            out["memory"].append(mem)
        measure.add_speedups(cfg_rows)
        out["results"] += cfg_rows
        del ref, fused, x, gy, cfg
        gc.collect()
    out["copy"] = list(copies.values())
    return out


def run_e2e(plan: Plan, progress: report.Progress, failures: list[str]) -> dict | None:
    if not plan.e2e:
        return None
    if any(i.startswith("compile") for i in plan.impls):
        torch._dynamo.reset()
    cfg = plan.e2e
    rows, e2e_failures = e2e.run_e2e(
        plan.device,
        cfg["modes"],
        cfg["batches"],
        cfg["resolution"],
        cfg["warmup"],
        cfg["iters"],
        log=progress.write,
        tick=lambda: progress.step("e2e"),
    )
    failures += e2e_failures
    return {"config": cfg, "results": rows}


def progress_steps(plan: Plan) -> int:
    per_config = 2 + len(plan.impls) * (len(plan.passes) + 1)  # check, copy, passes + memory
    e2e_steps = len(plan.e2e["modes"]) * len(plan.e2e["batches"]) * 4 if plan.e2e else 0
    return len(plan.configs()) * per_config + e2e_steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return report.replot(Path(args.replot))
    plan = make_plan(args)
    if not plan.cuda:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    bencher = Bencher(
        plan.device,
        threads,
        plan.min_run_time,
        cuda_warmup_ms=10 if plan.quick else 25,
        cuda_rep_ms=20 if plan.quick else 100,
    )
    label = report.device_label(plan.device, threads)
    date = datetime.date.today().isoformat()
    tag = args.tag or ("quick" if plan.quick else None)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{label}-{date}" + (f"-{tag}" if tag else "")

    load_before = report.loadavg()
    failures: list[str] = []
    if "fused" in plan.impls and not sa_cuda.fused_available(plan.device):
        failures.append(
            f"fused kernels are not built for {plan.device.type} "
            "(sa_cuda.fused_available is False): nothing fused to measure"
        )
        plan.impls = [i for i in plan.impls if i != "fused"]
    progress = report.Progress(progress_steps(plan))
    measured = run_configs(plan, bencher, args.seed, progress, failures)
    e2e_result = run_e2e(plan, progress, failures)
    progress.close()

    result = {
        "title": f"sa_cuda {sa_cuda.__version__} | {label} | torch {torch.__version__} | {date}",
        "date": date,
        "device": label,
        "device_name": report.device_name(plan.device),
        "threads": threads,
        "torch": torch.__version__,
        "sa_cuda": sa_cuda.__version__,
        "python": platform.python_version(),
        "command": " ".join([sys.executable, *sys.argv]),
        "timer": bencher.description(),
        "model_bytes": {p: f"{BYTES_FACTOR[p]}*n*e" for p in PASSES},
        "bwd_method": "retain_graph: one forward outside the timed region, timed "
        "torch.autograd.grad(out, [x, *params], grad_out, retain_graph=True); "
        "'subtract' rows: t(fwdbwd) - t(fwd)",
        "loadavg_1_5_15min": {
            "start": load_before,
            "end": report.loadavg(),
            "cores": os.cpu_count(),
        },
        "quick": plan.quick,
        "shapes": {s: vars(SHAPES[s]) for s in plan.shapes},
        **measured,
        "e2e": e2e_result,
        "failures": failures,
    }
    report.print_report(result)
    json_path = out_dir / f"{stem}.json"
    report.write_json(json_path, result)
    print(f"\nJSON: {json_path}")
    if not args.no_plot and report.plot(result, out_dir / f"{stem}.png"):
        print(f"PNG:  {out_dir / f'{stem}.png'}")
    if failures:
        print(f"\n{len(failures)} FAILURE(S):")
        for f in failures:
            print("  " + f.splitlines()[0])
        return 1
    print("\nall fused results checked against the float64 reference: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
