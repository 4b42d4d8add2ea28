"""The fused kernels alone against the physical yardstick of the same run: issue 15's CPU kernel
targets (forward at most 1.5x a copy of its bytes, backward at most 2.5x a copy of its 3n bytes,
bf16 forward at least torch.compile's speed).

Per (variant, shape, dtype), NCHW: the raw ops (``torch.ops.sa_cuda.<variant>_forward`` /
``_backward``: no module, no autograd, no Python around them) are checked against the float64
reference first (out and grad_x within ``accuracy_bound`` of eager's own error; a failed config is
reported and not timed). Then, in ``--rounds`` rounds, each of

  fwd       <variant>_forward(x, ...)                     reads x, writes out: 2 n e bytes
  bwd       <variant>_backward(gy, x, mean, rstd, ...)    reads gy and x, writes grad_x: 3 n e
  copy      x.clone()                                     2 n e: the forward's yardstick
  add       torch.add(x, gy)                              3 n e: the backward's yardstick
  compile   torch.compile(reference) under no_grad        the forward's rival (``--no-compile``:
                                                          left out)

is called once, in an order rotated from round to round, and timed alone (perf_counter around the
call). The yardsticks allocate their result as the ops do, so both sides pay the allocator. Per op
the lower quartile and the median of its rounds are reported; the ratios ``fwd / copy``,
``bwd / add`` and ``compile / fwd`` (above 1: fused faster) are of the lower quartiles, which a
shared machine's other tenants disturb least.

glibc returns every freed block above its mmap threshold to the kernel, so a 6 MB output is a fresh
mmap, and hundreds of page faults, on some calls and not on others: the run raises the mmap and
trim thresholds to 32 MiB (mallopt) so that repeated calls reuse their memory, for the ops and the
yardsticks alike; ``--glibc-defaults`` keeps glibc's behaviour.

    python -m benchmarks.raw_ops [--variants sa_layer] [--dtypes fp32,bf16] [--rounds 60] [--quick]

Writes ``raw_ops-<device>-<tag>.json`` and a PNG of the ratios against the targets.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness, report
from benchmarks.configs import DTYPES, SHAPES, add_round_args, round_choices
from benchmarks.timers import (
    GLIBC_MMAP_MAX,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    element_size,
    mallopt,
)
from sa_cuda.variants import VARIANTS as SA_VARIANTS

VARIANT = {v.name: v for v in SA_VARIANTS}

OPS = ("fwd", "bwd", "copy", "add", "compile")
# issue 15's targets: (ratio key, limit, True when the ratio must stay at or below the limit)
TARGETS = {
    "fwd_over_copy": (1.5, True),
    "bwd_over_add": (2.5, True),
    "compile_over_fwd": (1.0, False),
}
# Repeated calls reuse their memory: blocks up to 32 MiB (every op here) come from the heap, and
# the heap keeps up to 32 MiB free at its top.
_MALLOC = {M_MMAP_THRESHOLD: GLIBC_MMAP_MAX, M_TRIM_THRESHOLD: GLIBC_MMAP_MAX}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.raw_ops", description=__doc__)
    add_round_args(p, min_run_time=0.0)
    p.set_defaults(rounds=60)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--glibc-defaults", action="store_true", help="keep glibc's malloc thresholds")
    return p.parse_args(argv)


class RawOps:
    """The raw forward and backward of one variant on fixed inputs, and their float64 check."""

    def __init__(self, variant: str, ref: torch.nn.Module, fused: torch.nn.Module, x, gy):
        spec = VARIANT[variant]
        self.params = [fused.get_parameter(k).detach() for k in spec.state_keys]
        self.groups, self.eps = fused.groups, fused.gn.eps
        self.x, self.gy = x.detach(), gy
        self._forward = getattr(torch.ops.sa_cuda, spec.forward_op_name)
        self._backward = getattr(torch.ops.sa_cuda, spec.backward_op_name)
        self.out, self.mean, self.rstd = self.forward()
        self.ref = ref

    @classmethod
    def of_config(cls, variant: str, shape, dtype: torch.dtype, seed: int) -> RawOps:
        """The raw ops of a benchmark config on the CPU: harness's modules and inputs."""
        device = torch.device("cpu")
        ref, fused = harness.make_modules(variant, shape, dtype, device, seed)
        return cls(variant, ref, fused, *harness.make_inputs(shape, dtype, device, seed))

    def forward(self):
        return self._forward(self.x, self.groups, *self.params, self.eps)

    def backward(self):
        return self._backward(self.gy, self.x, self.mean, self.rstd, self.groups, *self.params)

    def check(self) -> dict:
        """out and grad_x of the raw ops against the float64 reference (harness.check_results)."""
        results = {"out": self.out, "grad_x": self.backward()[0]}
        return harness.check_results(results, self.ref, self.x, self.gy)


def time_config(args, variant: str, shape, dname: str) -> dict:
    dtype = DTYPES[dname]
    raw = RawOps.of_config(variant, shape, dtype, args.seed)
    check = raw.check()
    if not check["ok"]:
        return {"check": check, "times": {}}
    x, gy = raw.x, raw.gy
    fns = {
        "fwd": raw.forward,
        "bwd": raw.backward,
        "copy": x.clone,
        "add": lambda: torch.add(x, gy),
    }
    if not args.no_compile:
        compiled = torch.compile(raw.ref, dynamic=False)

        def compile_fwd():
            with torch.no_grad():
                return compiled(x)

        fns["compile"] = compile_fwd
    for fn in fns.values():  # compiles, and warms the allocator's free lists
        fn()
        fn()
    samples: dict[str, list[float]] = {op: [] for op in fns}
    order = list(fns)
    with torch.no_grad():
        for r in range(args.rounds):
            for op in order[r % len(order) :] + order[: r % len(order)]:
                start = time.perf_counter()
                fns[op]()
                samples[op].append((time.perf_counter() - start) * 1e3)
    times = {
        op: {"p25_ms": statistics.quantiles(ms, n=4)[0], "median_ms": statistics.median(ms)}
        for op, ms in samples.items()
    }
    return {"check": check, "times": times, "tensor_bytes": shape.n * element_size(dtype)}


def ratios(times: dict) -> dict:
    def of(op):
        return times[op]["p25_ms"] if op in times else None

    out = {"fwd_over_copy": of("fwd") / of("copy"), "bwd_over_add": of("bwd") / of("add")}
    if "compile" in times:
        out["compile_over_fwd"] = of("compile") / of("fwd")
    return out


def meets(key: str, value: float) -> bool:
    limit, at_most = TARGETS[key]
    return value <= limit if at_most else value >= limit


def format_rows(rows: list[dict]) -> str:
    head = f"{'variant':<18} {'shape':<10} {'dtype':<5}"
    head += "".join(f"{op + ' ms':>12}" for op in OPS)
    head += f"{'fwd/copy':>10}{'bwd/add':>9}{'cmp/fwd':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['variant']:<18} {r['shape']:<10} {r['dtype']:<5}"
        if not r["check"]["ok"]:
            lines.append(lead + " " + report.failed_check(r["check"]))
            continue
        cells = "".join(
            f"{r['times'][op]['p25_ms']:12.3f}" if op in r["times"] else f"{'-':>12}" for op in OPS
        )
        marks = ""
        for key, width in (("fwd_over_copy", 10), ("bwd_over_add", 9), ("compile_over_fwd", 9)):
            value = r["ratios"].get(key)
            marks += (
                f"{value:{width - 1}.2f}{' ' if meets(key, value) else '*'}"
                if value is not None
                else f"{'-':>{width}}"
            )
        lines.append(lead + cells + marks)
    lines.append("(lower quartiles of the rounds; * misses the target: fwd/copy <= 1.5, bwd/add")
    lines.append(" <= 2.5, cmp/fwd >= 1 (compile's time over fused's))")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> bool:
    """Per ratio, one bar per shape and series (variant, dtype), the target as a dashed line."""
    plt = report.pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if r["check"]["ok"]]
    if not ok:
        return False
    keys = [k for k in TARGETS if any(k in r["ratios"] for r in ok)]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    series = list(dict.fromkeys((r["variant"], r["dtype"]) for r in ok))
    labels = {
        "fwd_over_copy": "forward time / copy time (2n bytes)",
        "bwd_over_add": "backward time / add time (3n bytes)",
        "compile_over_fwd": "torch.compile forward / fused forward",
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    for col, key in enumerate(keys):
        ax = axes[0][col]

        def value(series_key, shape, key=key):
            return next(
                (
                    r["ratios"].get(key, 0.0)
                    for r in ok
                    if (r["variant"], r["dtype"], r["shape"]) == (*series_key, shape)
                ),
                0.0,
            )

        report.grouped_bars(ax, shapes, series, value, " ".join)
        limit, at_most = TARGETS[key]
        ax.axhline(limit, color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel("shape (SA-ResNet-50 stage, batch)")
        ax.set_ylabel(labels[key], fontsize=8)
        ax.set_title(f"dashed: target ({'at most' if at_most else 'at least'} {limit})", fontsize=9)
    report.save_figure(fig, axes, min(len(series), 4), title, path, dpi=110)
    return True


class _Bencher:
    """What report.save_rounds_run asks of a timer."""

    def __init__(self, malloc: str):
        self.malloc = malloc

    def description(self) -> str:
        return (
            f"perf_counter around single calls, lower quartile of the rounds; malloc: {self.malloc}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("--device: raw_ops times the CPU kernels (the GPU check times CUDA's)")
    torch.set_num_threads(args.threads)
    shapes, dtypes, variants = round_choices(args)
    if args.quick:
        args.rounds, args.no_compile = 8, True
    raised = not args.glibc_defaults and mallopt(_MALLOC)
    malloc = "mmap/trim thresholds 32 MiB" if raised else "glibc defaults"
    rows = []
    for variant in variants:
        for name in shapes:
            for dname in dtypes:
                r = time_config(args, variant, SHAPES[name], dname)
                r.update(variant=variant, shape=name, dtype=dname)
                r["ratios"] = ratios(r["times"]) if r["check"]["ok"] else {}
                r["config"] = f"{variant}/{name}/{dname}"
                rows.append(r)
                print("\n".join(format_rows([r]).splitlines()[2:-2]), flush=True)
    return report.save_rounds_run("raw_ops", args, _Bencher(malloc), rows, format_rows, plot)


if __name__ == "__main__":
    raise SystemExit(main())
