"""channels_last (NHWC) benchmark: the fused layer on a channels_last input against the same
layer on an NCHW input, and against eager PyTorch and torch.compile on the channels_last input.

Per (variant, shape, dtype): the fused result on the channels_last input is checked against the
float64 reference first (harness.check_fused: output and every gradient; a failure is reported
and its config not timed). Then the passes ``fwd`` and ``fwdbwd`` (harness.pass_fn) of

  fused-nchw   the fused module, NCHW-contiguous input (the yardstick)
  fused-cl     the fused module, channels_last input
  eager-cl     sa_cuda.reference, channels_last input
  compile-cl   torch.compile(reference), channels_last input

are timed in ``--rounds`` interleaved rounds (the machine's load drifts between rounds, not
within one); each time is the median over the rounds of the timer's median. Reported: the time
of each, ``cl / nchw`` (fused-cl over fused-nchw) and ``x eager`` / ``x compile`` (eager-cl and
compile-cl over fused-cl). Writes ``channels_last-<device>-<tag>.json`` and a PNG of the ratios.

    python -m benchmarks.channels_last [--device cpu] [--dtypes fp32,bf16] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import harness, report
from benchmarks.configs import (
    DTYPES,
    SHAPES,
    add_round_args,
    csv_choice,
    round_choices,
)
from benchmarks.timers import Bencher

IMPLS = ("fused-nchw", "fused-cl", "eager-cl", "compile-cl")
PASSES = ("fwd", "fwdbwd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.channels_last", description=__doc__)
    add_round_args(p, min_run_time=0.5)
    p.add_argument("--impls", default=",".join(IMPLS), help="(--quick: no compile)")
    return p.parse_args(argv)


def time_config(args, bencher, variant, shape, dname, impls) -> dict:
    """{"check": ..., "times": {impl: {pass: ms}}} of one config."""
    dtype, device = DTYPES[dname], torch.device(args.device)
    ref, fused = harness.make_modules(variant, shape, dtype, device, args.seed)
    x, gy = harness.make_inputs(shape, dtype, device, args.seed)
    inputs = {
        "nchw": (x, gy),
        "cl": tuple(
            t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(t.requires_grad)
            for t in (x, gy)
        ),
    }
    check = harness.check_fused(ref, fused, *inputs["cl"])
    if not check["ok"]:
        return {"check": check, "times": {}}
    mods = {
        "fused-nchw": fused,
        "fused-cl": fused,
        "eager-cl": ref,
        "compile-cl": torch.compile(ref, dynamic=False) if "compile-cl" in impls else None,
    }
    cases = {impl: (mods[impl], *inputs[impl.split("-")[1]], PASSES) for impl in impls}
    return {"check": {"ok": True}, "times": harness.time_rounds(bencher, cases, args.rounds)}


def ratios(times: dict) -> dict:
    """Per pass: cl / nchw of the fused layer, and eager-cl, compile-cl over fused-cl."""
    out = {}
    for pass_ in PASSES:
        cl = times.get("fused-cl", {}).get(pass_)
        row = {}
        if cl and "fused-nchw" in times:
            row["cl_over_nchw"] = cl / times["fused-nchw"][pass_]
        for base in ("eager-cl", "compile-cl"):
            if cl and base in times:
                row[f"speedup_vs_{base}"] = times[base][pass_] / cl
        out[pass_] = row
    return out


def format_rows(rows: list[dict]) -> str:
    head = f"{'variant':<18} {'shape':<12} {'dtype':<5} {'pass':<7}" + "".join(
        f"{impl + ' ms':>15}" for impl in IMPLS
    )
    head += f"{'cl/nchw':>9}{'x eager':>9}{'x compile':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['variant']:<18} {r['shape']:<12} {r['dtype']:<5} "
        if not r["check"]["ok"]:
            lines.append(lead + report.failed_check(r["check"]))
            continue
        for pass_ in PASSES:
            cells = "".join(
                f"{r['times'][i][pass_]:15.3f}" if i in r["times"] else f"{'-':>15}" for i in IMPLS
            )
            q = r["ratios"][pass_]

            def fmt(key: str, width: int, q=q) -> str:
                return f"{q[key]:{width}.2f}" if key in q else f"{'-':>{width}}"

            lines.append(
                lead
                + f"{pass_:<7}"
                + cells
                + fmt("cl_over_nchw", 9)
                + fmt("speedup_vs_eager-cl", 9)
                + fmt("speedup_vs_compile-cl", 10)
            )
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> bool:
    """Two panels per pass: fused cl/nchw time (lower is better, the 1.3 target drawn) and the
    fused speedup over eager channels_last; bars per shape, one series per (variant, dtype)."""
    plt = report.pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if r["check"]["ok"] and "fused-cl" in r["times"]]
    if not ok:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    series = list(dict.fromkeys((r["variant"], r["dtype"]) for r in ok))
    panels = [
        ("cl_over_nchw", "fused channels_last / fused NCHW (time)", 1.3),
        ("speedup_vs_eager-cl", "fused speedup over eager (both channels_last)", 3.0),
    ]
    fig, axes = plt.subplots(
        len(panels), len(PASSES), figsize=(5.5 * len(PASSES), 7), squeeze=False
    )
    for col, pass_ in enumerate(PASSES):
        for row_i, (key, ylabel, target) in enumerate(panels):
            ax = axes[row_i][col]

            def value(series_key, shape, pass_=pass_, key=key):
                return next(
                    (
                        r["ratios"][pass_].get(key, 0.0)
                        for r in ok
                        if (r["variant"], r["dtype"], r["shape"]) == (*series_key, shape)
                    ),
                    0.0,
                )

            report.grouped_bars(ax, shapes, series, value, " ".join)
            ax.axhline(target, color="k", linestyle="--", linewidth=0.8)
            ax.set_xlabel("shape (SA-ResNet-50 stage, batch)")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{pass_} (dashed: target {target})", fontsize=9)
    report.save_figure(fig, axes, len(series), title, path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, dtypes, variants = round_choices(args)
    impls = csv_choice("--impls", args.impls, [], IMPLS)
    if args.quick:
        impls = [i for i in impls if i != "compile-cl"]
    bencher = Bencher(torch.device(args.device), args.threads, args.min_run_time)
    rows = []
    for variant in variants:
        for name in shapes:
            for dname in dtypes:
                r = time_config(args, bencher, variant, SHAPES[name], dname, impls)
                r.update(variant=variant, shape=name, dtype=dname, ratios=ratios(r["times"]))
                r["config"] = f"{variant}/{name}/{dname}"
                rows.append(r)
                print("\n".join(format_rows([r]).splitlines()[2:]), flush=True)
    return report.save_rounds_run("channels_last", args, bencher, rows, format_rows, plot)


if __name__ == "__main__":
    raise SystemExit(main())
