"""Bottleneck-tail benchmark: ``relu(SA(x) + identity)`` as the fused op's residual epilogue (one
pass: x and identity read once, out written once) against the fused layer followed by eager's add
and relu (what SA-ResNet ran before the epilogue), eager PyTorch, and the physical yardstick.

Per (variant, shape, dtype, memory format): the fused tail is checked against the float64
reference tail first (harness.check_fused: output and every gradient of x and the parameters;
a failed config is reported and not timed). Then the passes ``infer`` (no_grad), ``fwd`` and
``fwdbwd`` (harness.pass_fn) of

  tail-fused   the fused layer with identity=: the residual epilogue
  sa+add-relu  the fused layer, then eager torch.relu(out + identity)
  eager        sa_cuda.reference, then the same add and relu
  add          torch.add(x, identity, out=buffer): the same bytes as the tail's forward (two
               tensors read, one written), the forward's physical limit

are timed in ``--rounds`` interleaved rounds; each time is the median over the rounds of the
timer's median. Reported: the times, ``x sa+add`` and ``x eager`` (their time over
tail-fused's) and ``/ add`` (tail-fused's forward over the add). Writes
``residual-<device>-<tag>.json`` and a PNG of the ratios.

    python -m benchmarks.residual [--device cpu] [--dtypes fp32,bf16] [--formats nchw,cl] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks import harness, report
from benchmarks.configs import (
    DTYPES,
    SHAPES,
    add_round_args,
    csv_choice,
    round_choices,
)
from benchmarks.timers import Bencher

IMPLS = ("tail-fused", "sa+add-relu", "eager", "add")
PASSES = ("infer", "fwd", "fwdbwd")
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


class Tail(nn.Module):
    """relu(layer(x) + identity) over a fixed identity: fused (the epilogue) or composed."""

    def __init__(self, layer: nn.Module, identity: Tensor, fused: bool):
        super().__init__()
        self.layer, self.identity, self.fused = layer, identity, fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return self.layer(x, identity=self.identity)
        return torch.relu(self.layer(x) + self.identity)


class Add(nn.Module):
    """x + identity into a preallocated buffer: reads two tensors, writes one."""

    def __init__(self, identity: Tensor):
        super().__init__()
        self.identity, self.buffer = identity, torch.empty_like(identity)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.add(x, self.identity, out=self.buffer)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.residual", description=__doc__)
    add_round_args(p, min_run_time=0.3)
    p.add_argument("--formats", default="nchw,cl")
    return p.parse_args(argv)


def time_config(args, bencher, variant, shape, dname, fmt) -> dict:
    """{"check": ..., "times": {impl: {pass: ms}}} of one config."""
    dtype, device = DTYPES[dname], torch.device(args.device)
    ref, fused = harness.make_modules(variant, shape, dtype, device, args.seed)
    x, gy = harness.make_inputs(shape, dtype, device, args.seed)
    x = x.detach().contiguous(memory_format=FORMATS[fmt]).requires_grad_(True)
    gy = gy.contiguous(memory_format=FORMATS[fmt])
    identity = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed + 3))
    identity = identity.to(device=device, dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    mods = {
        "tail-fused": Tail(fused, identity, fused=True),
        "sa+add-relu": Tail(fused, identity, fused=False),
        "eager": Tail(ref, identity, fused=False),
        "add": Add(identity),
    }
    check = harness.check_fused(mods["eager"], mods["tail-fused"], x, gy)
    if not check["ok"]:
        return {"check": check, "times": {}}
    cases = {
        impl: (mod, x, gy, ("fwd",) if impl == "add" else PASSES) for impl, mod in mods.items()
    }
    return {"check": {"ok": True}, "times": harness.time_rounds(bencher, cases, args.rounds)}


def ratios(times: dict) -> dict:
    """Per pass: sa+add-relu and eager over tail-fused; tail-fused over add (forward passes)."""
    out = {}
    for pass_ in PASSES:
        tail = times.get("tail-fused", {}).get(pass_)
        row = {}
        if tail:
            for base in ("sa+add-relu", "eager"):
                row[f"speedup_vs_{base}"] = times[base][pass_] / tail
            if pass_ != "fwdbwd":
                row["over_add"] = tail / times["add"]["fwd"]
        out[pass_] = row
    return out


def format_rows(rows: list[dict]) -> str:
    head = f"{'variant':<18} {'shape':<10} {'dtype':<5} {'fmt':<5} {'pass':<7}"
    head += "".join(f"{impl + ' ms':>15}" for impl in IMPLS[:3])
    head += f"{'add ms':>9}{'x sa+add':>9}{'x eager':>9}{'/ add':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['variant']:<18} {r['shape']:<10} {r['dtype']:<5} {r['format']:<5} "
        if not r["check"]["ok"]:
            lines.append(lead + report.failed_check(r["check"]))
            continue
        for pass_ in PASSES:
            cells = "".join(f"{r['times'][i][pass_]:15.3f}" for i in IMPLS[:3])
            add = r["times"]["add"]["fwd"] if pass_ != "fwdbwd" else None
            q = r["ratios"][pass_]

            def fmt(key: str, width: int, q=q) -> str:
                return f"{q[key]:{width}.2f}" if key in q else f"{'-':>{width}}"

            lines.append(
                lead
                + f"{pass_:<7}"
                + cells
                + (f"{add:9.3f}" if add is not None else f"{'-':>9}")
                + fmt("speedup_vs_sa+add-relu", 9)
                + fmt("speedup_vs_eager", 9)
                + fmt("over_add", 7)
            )
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> bool:
    """Per pass, the fused tail's speedup over the fused layer + eager add/relu (above 1: the
    epilogue pays); bars per shape, one series per (variant, dtype, format)."""
    plt = report.pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if r["check"]["ok"]]
    if not ok:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    series = list(dict.fromkeys((r["variant"], r["dtype"], r["format"]) for r in ok))
    fig, axes = plt.subplots(1, len(PASSES), figsize=(5.5 * len(PASSES), 4.2), squeeze=False)
    for col, pass_ in enumerate(PASSES):
        ax = axes[0][col]

        def value(series_key, shape, pass_=pass_):
            return next(
                (
                    r["ratios"][pass_]["speedup_vs_sa+add-relu"]
                    for r in ok
                    if (r["variant"], r["dtype"], r["format"], r["shape"]) == (*series_key, shape)
                ),
                0.0,
            )

        report.grouped_bars(ax, shapes, series, value, " ".join)
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel("shape (SA-ResNet-50 stage, batch)")
        ax.set_ylabel("(fused SA + eager add, relu) / fused tail (time)", fontsize=8)
        ax.set_title(f"{pass_} (dashed: 1, no gain)", fontsize=9)
    report.save_figure(fig, axes, min(len(series), 4), title, path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, dtypes, variants = round_choices(args)
    formats = csv_choice("--formats", args.formats, [], FORMATS)
    bencher = Bencher(torch.device(args.device), args.threads, args.min_run_time)
    rows = []
    for variant in variants:
        for name in shapes:
            for dname in dtypes:
                for fmt in formats:
                    r = time_config(args, bencher, variant, SHAPES[name], dname, fmt)
                    r.update(variant=variant, shape=name, dtype=dname, format=fmt)
                    r["ratios"] = ratios(r["times"]) if r["check"]["ok"] else {}
                    r["config"] = f"{variant}/{name}/{dname}/{fmt}"
                    rows.append(r)
                    print("\n".join(format_rows([r]).splitlines()[2:]), flush=True)
    return report.save_rounds_run("residual", args, bencher, rows, format_rows, plot)


if __name__ == "__main__":
    raise SystemExit(main())
