"""The output of a benchmark run: progress while it runs, then the tables on stdout, the JSON and
the plot (fused speedup over eager and over torch.compile per shape, one panel per pass). The
tables and the plot are drawn from the JSON's content, so ``--replot JSON`` redraws an old run."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch

from benchmarks import e2e
from benchmarks.configs import DTYPES, PASSES

try:
    from tqdm.auto import tqdm
except ImportError:  # e.g. a GPU machine without network: plain progress lines instead
    tqdm = None


class Progress:
    """tqdm when installed, else one line per step on stderr. Messages during the run go through
    ``write`` so that they do not break the bar."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True) if tqdm else None
        self.total, self.done = total, 0

    def step(self, desc: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(desc, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# the machine


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def device_label(device: torch.device, threads: int) -> str:
    """The device part of the output file names: the GPU name, or cpu-<model>-<N>threads."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{slug(cpu_model_name())}-{threads}threads"


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# tables


def format_table(rows: list[dict]) -> str:
    """Timings; a speedup column is filled only where the row's implementation is meant to
    replace that baseline (configs.SPEEDUP_BASELINES)."""
    head = (
        f"{'variant':<17} {'shape':<13} {'dtype':<5} {'pass':<6} {'impl':<20} "
        f"{'median ms':>10} {'IQR ms':>8} {'GB/s':>8} {'%copy':>6} {'x eager':>8} "
        f"{'x compile':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = (
            f"{r['variant']:<17} {r['shape']:<13} {r['dtype']:<5} {r['pass']:<6} {r['impl']:<20} "
        )
        if r["status"] != "ok":
            lines.append(lead + f"{r['status']}" + (f": {r['error'][:60]}" if "error" in r else ""))
            continue

        def opt(key: str, width: int) -> str:
            v = r.get(key)
            return f"{v:{width}.2f}" if v is not None else " " * width

        lines.append(
            lead + f"{r['median_ms']:10.4f} {r['iqr_ms']:8.4f} {r['gbps']:8.1f} "
            f"{100 * r['frac_of_copy']:5.0f}% {opt('speedup_vs_eager', 8)} "
            f"{opt('speedup_vs_compile', 9)}"
            + ("  (bwd = fwdbwd - fwd)" if r.get("method") == "subtract" else "")
        )
    return "\n".join(lines)


def format_memory(rows: list[dict], cuda: bool) -> str:
    head = (
        f"{'variant':<17} {'shape':<13} {'dtype':<5} {'impl':<20} {'saved MiB':>10} "
        f"{'x input':>8} {'beyond x MiB':>12}"
        + (f" {'peak MiB':>9} {'x input':>8}" if cuda else "")
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['variant']:<17} {r['shape']:<13} {r['dtype']:<5} {r['impl']:<20} "
        if "saved_bytes" not in r:
            lines.append(lead + r.get("error", "n/a")[:60])
            continue
        line = (
            lead + f"{r['saved_bytes'] / 2**20:10.2f} {r['saved_bytes'] / r['input_bytes']:8.2f} "
            f"{r['saved_bytes_beyond_inputs'] / 2**20:12.2f}"
        )
        if cuda and "peak_bytes" in r:
            line += f" {r['peak_bytes'] / 2**20:9.2f} {r['peak_bytes'] / r['input_bytes']:8.2f}"
        lines.append(line)
    return "\n".join(lines)


def print_report(result: dict) -> None:
    cuda = not result["device"].startswith("cpu-")
    print(f"\n{result['title']}")
    print(f"timer: {result['timer']}")
    # the 1-minute load average at the start is other processes' (this one had not run yet)
    load = result["loadavg_1_5_15min"]
    busy, cores = (load["start"] or [None])[0], load["cores"] or 1
    if not cuda and busy is not None and busy > 0.5 * cores:
        print(
            f"WARNING: load average {busy:.1f} on {cores} cores when the run started: other "
            "processes compete for the CPU, timings are unreliable (a multi-threaded region "
            "waits for its descheduled threads)"
        )
    print(
        "model bytes: fwd/infer 2ne, bwd 3ne, fwdbwd 5ne; GB/s = model bytes / median; "
        "%copy = GB/s / (copy of n elements, 2ne bytes, same run); x eager / x compile = "
        "speedup over that baseline, for the implementations that replace it\n"
    )
    print(format_table(result["results"]))
    print("\ncopy of n elements (x.copy_(y), 2*n*e bytes):")
    for c in result["copy"]:
        print(f"  n={c['n']:>10} {c['dtype']:<8} {c['median_ms']:9.4f} ms  {c['gbps']:8.1f} GB/s")
    print(
        "\nmemory of one forward+backward (saved = bytes autograd keeps for backward, unique "
        "storages; 'beyond x' excludes the input and the parameters"
        + ("; peak = max_memory_allocated delta" if cuda else "")
        + "):"
    )
    print(format_memory(result["memory"], cuda))
    if result["e2e"] and result["e2e"]["results"]:
        cfg = result["e2e"]["config"]
        print(
            f"\nend-to-end SA-ResNet-50 (eager = reference SA layers, fused = sa_cuda.SALayer, "
            f"same weights; {cfg['warmup']} warm-up + {cfg['iters']} timed steps):"
        )
        print(e2e.format_table(result["e2e"]["results"]))


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# plot

PASS_TITLES = {
    "fwd": "fwd (forward, autograd recording)",
    "bwd": "bwd (backward alone)",
    "fwdbwd": "fwdbwd (forward + backward)",
    "infer": "infer (forward, no_grad)",
}


def plot_title(result: dict, dtypes: list[str]) -> str:
    cpu = result["device"].startswith("cpu-")
    where = (
        f"{result['device_name']}, {result['threads']} threads" if cpu else result["device_name"]
    )
    return (
        f"sa_cuda {result['sa_cuda']}: fused speedup per shape | {where} | "
        f"{', '.join(dtypes)} | torch {result['torch']} | {result['date']}"
    )


def speedup_ticks(lo: float, hi: float) -> list[float]:
    """Powers of two from below ``lo`` to above ``hi`` (1 always among them)."""
    k_lo = math.floor(math.log2(min(lo, 1.0)))
    k_hi = math.ceil(math.log2(max(hi, 1.0)))
    return [2.0**k for k in range(k_lo, k_hi + 1)]


def shape_label(name: str, shape: dict) -> str:
    return f"{name}\n({shape['B']}, {shape['C']}, {shape['H']}, {shape['W']})"


def style_axis(ax, ticks, xlabels, *, title, ylabel, xlabel) -> None:
    """A speedup panel: log y with ticks 1x 2x 4x (no minor ticks), the 1x line, shape labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(ticks[0] / 1.2, ticks[-1] * 2.2)  # room above the bars for their labels
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)


def output_stem(kind: str, label: str, args) -> Path:
    """``<args.out_dir>/<kind>-<slug(label)>-<tag>`` (the tag: ``--tag``, else "quick" or "run"),
    the folder created: where a script writes its JSON and PNG."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{kind}-{slug(label)}-{args.tag or ('quick' if args.quick else 'run')}"


def save_rounds_run(kind: str, args, bencher, rows: list[dict], format_rows, plot) -> int:
    """The end of an interleaved-rounds script (channels_last.py, residual.py): prints the table
    (``format_rows(rows)``), writes ``<kind>-<device>-<tag>.json`` and the PNG that ``plot(rows,
    title, path)`` draws, names the configs whose check failed; returns the exit status."""
    label = device_label(torch.device(args.device), args.threads)
    print(f"\n{label}; timer: {bencher.description()}; {args.rounds} rounds\n")
    print(format_rows(rows))
    stem = output_stem(kind, label, args)
    result = {
        "device": label,
        "timer": bencher.description(),
        "rounds": args.rounds,
        "loadavg": loadavg(),
        "rows": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if plot(rows, f"sa_cuda {kind}, {label}", stem.with_suffix(".png")):
        print(f"wrote {stem}.json, {stem}.png")
    return exit_status([r["config"] for r in rows if not r["check"]["ok"]])


def exit_status(failed: list[str]) -> int:
    """A benchmark's exit status: prints ``FAILED: <what>`` for each failed check, 1 if any."""
    for what in failed:
        print("FAILED:", what)
    return 1 if failed else 0


def failed_check(check: dict) -> str:
    """A table row's cells for a config whose check failed (what failed, cut to a line)."""
    return "FAILED check: " + json.dumps(check)[:200]


def grouped_bars(ax, groups: list[str], series: list, value, label) -> None:
    """One bar per (group, series) on ax, the series side by side within each group:
    ``value(series_key, group)`` its height, ``label(series_key)`` its legend entry."""
    width = 0.8 / len(series)
    for k, key in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [value(key, g) for g in groups], width, label=label(key))
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or None, said on stderr, without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def save_figure(fig, axes, ncol: int, title: str, path: Path, *, dpi: int) -> None:
    """Title and legend (the first panel's series) above the panels, not on the bars; saves."""
    import matplotlib.pyplot as plt

    handles, labels = axes[0][0].get_legend_handles_labels()
    height = fig.get_figheight()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=ncol,
        fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.3 / height),
        frameon=False,
    )
    fig.suptitle(title, fontsize=10, y=1 - 0.05 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot(result: dict, path: Path) -> bool:
    """Fused speedup over eager (top row) and over torch.compile (bottom row), one panel per pass;
    bars per shape, one series per (variant, dtype); value labels on the bars."""
    plt = pyplot()
    if plt is None:
        return False
    fused = [r for r in result["results"] if r["impl"] == "fused" and r["status"] == "ok"]
    baselines = [b for b in ("eager", "compile") if any(f"speedup_vs_{b}" in r for r in fused)]
    if not fused or not baselines:
        return False
    passes = [p for p in PASSES if any(r["pass"] == p for r in fused)]
    shapes = [s for s in result["shapes"] if any(r["shape"] == s for r in fused)]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in fused)]
    series = sorted(
        {(r["variant"], r["dtype"]) for r in fused}, key=lambda s: (s[0], dtypes.index(s[1]))
    )
    colors = plt.get_cmap("tab20").colors  # dark/light pairs: one hue per variant
    variants = sorted({v for v, _ in series})
    speedups = [r[f"speedup_vs_{b}"] for r in fused for b in baselines if f"speedup_vs_{b}" in r]
    ticks = speedup_ticks(min(speedups), max(speedups))
    fig, axes = plt.subplots(
        len(baselines),
        len(passes),
        squeeze=False,
        sharey=True,
        figsize=(max(5.5 * len(passes), 7), 4.2 * len(baselines) + 1.4),
    )
    width = 0.8 / len(series)
    for i, base in enumerate(baselines):
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            for k, (variant, dtype) in enumerate(series):
                vals = []
                for s in shapes:
                    hit = [
                        r
                        for r in fused
                        if (r["shape"], r["pass"], r["variant"], r["dtype"])
                        == (s, pass_, variant, dtype)
                    ]
                    vals.append(hit[0].get(f"speedup_vs_{base}", math.nan) if hit else math.nan)
                xs = [x + (k - (len(series) - 1) / 2) * width for x in range(len(shapes))]
                color = colors[2 * variants.index(variant) + min(dtypes.index(dtype), 1)]
                bars = ax.bar(xs, vals, width, color=color, label=f"{variant} {dtype}")
                ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
            style_axis(
                ax,
                ticks,
                [shape_label(s, result["shapes"][s]) for s in shapes],
                title=f"{PASS_TITLES[pass_]}: fused vs {base}",
                ylabel=f"speedup over {base} (x), log scale" if j == 0 else None,
                xlabel="shape (B, C, H, W)" if i == len(baselines) - 1 else None,
            )
    save_figure(fig, axes, len(series), plot_title(result, dtypes), path, dpi=110)
    return True


def replot(json_path: Path) -> int:
    """Redraws the PNG beside ``json_path`` from the run it holds."""
    result = json.loads(Path(json_path).read_text())
    png_path = Path(json_path).with_suffix(".png")
    if not plot(result, png_path):
        print(f"{json_path}: nothing to plot (no fused speedups, or matplotlib missing)")
        return 1
    print(f"PNG:  {png_path}")
    return 0
