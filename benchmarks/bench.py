"""Microbenchmarks of the Shuffle Attention layer: eager reference vs torch.compile vs sa_cuda.

For every (variant, shape, dtype) config:
1. the fused module is checked against a float64 reference (output and every gradient) on the
   very inputs that are then timed; a wrong result is reported as FAILED, never timed, and makes
   the script exit non-zero at the end;
2. a device-to-device copy of the same number of elements is timed (the practical bandwidth peak);
3. each implementation (eager, compile, [compile-max-autotune on CUDA], fused) is timed per pass:
   - ``fwd``: forward with autograd recording (what a training step runs),
   - ``bwd``: backward alone: ONE forward outside the timed region, then the timed statement is
     ``torch.autograd.grad(out, [x, *params], grad_out, retain_graph=True)``, i.e. the same
     retained graph is back-propagated every iteration (no .grad accumulation kernels, no forward
     in the measurement). If an implementation cannot back-propagate a retained graph twice, the
     script falls back to ``t(fwdbwd) - t(fwd)`` and says so in the ``method`` field;
   - ``fwdbwd``: forward + ``torch.autograd.grad`` per iteration;
   - ``infer`` (not by default): forward under ``torch.no_grad()``;
4. memory of one forward+backward per implementation: bytes autograd saves for backward (unique
   storages seen by ``saved_tensors_hooks``; "saved bytes") and on CUDA the peak
   ``torch.cuda.max_memory_allocated`` minus what was allocated before.

Timing: CUDA ``triton.testing.do_bench`` (L2 flushed before every call; quantiles 25/50/75) or
CUDA events with an explicit L2 flush when triton is missing; CPU
``torch.utils.benchmark.Timer(...).blocked_autorange`` with ``--threads`` threads (default: all
cores); median and IQR of the blocks.

Model bytes (DESIGN.md section 4), n = B*C*H*W, e = element size: fwd/infer 2*n*e, bwd 3*n*e,
fwdbwd 5*n*e. Achieved bandwidth = model bytes / median time (for eager/compile this is an
"effective" bandwidth: they move more bytes than the model). ``frac_of_copy`` = achieved
bandwidth / bandwidth of the copy (x.copy_(y) of n elements moves 2*n*e bytes) timed in this run.

Results: a table on stdout, JSON + PNG in ``--out-dir`` (default benchmarks/results), named
``<device>-<YYYY-MM-DD>[-<tag>].json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._functorch.config  # noqa: F401  (torch._functorch.config.patch below)
from torch import Tensor, nn

import sa_cuda
from sa_cuda import reference
from sa_cuda.testing import accuracy_bound

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import e2e  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # e.g. a GPU machine without network: plain progress lines instead
    tqdm = None


# --------------------------------------------------------------------------------------------
# configuration space

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


SHAPES: dict[str, Shape] = {s.name: s for s in [
    # the four SA-ResNet-50 stages at 224x224 input (G = 64), batch 8 and 32
    *(Shape(f"r50-l{i + 1}-b{b}", b, c, hw, hw, 64)
      for b in (8, 32) for i, (c, hw) in enumerate([(256, 56), (512, 28), (1024, 14), (2048, 7)])),
    Shape("seed-b32", 32, 256, 24, 24, 64),          # the seed document's example
    Shape("det-g8", 16, 512, 40, 40, 8),             # detection-style neck, G = 8 (m = 32)
    Shape("plane224-g8", 4, 64, 224, 224, 8),        # large planes (50176 px), m = 4
    Shape("quick", 2, 128, 14, 14, 8),               # --quick / CI smoke test (m = 8)
]}
DEFAULT_SHAPES = [s for s in SHAPES if s != "quick"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
VARIANTS = {"sa_layer": (reference.SALayer, sa_cuda.SALayer),
            "shuffle_attention": (reference.ShuffleAttention, sa_cuda.ShuffleAttention)}
IMPLS = ("eager", "compile", "compile-max-autotune", "fused")
PASSES = ("fwd", "bwd", "fwdbwd", "infer")
DEFAULT_PASSES = ("fwd", "bwd", "fwdbwd")
BYTES_FACTOR = {"fwd": 2, "infer": 2, "bwd": 3, "fwdbwd": 5}  # model bytes = factor * n * e


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


def device_label(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{slug(cpu_model_name())}-{threads}threads"


# --------------------------------------------------------------------------------------------
# timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float
    n: int
    timer: str

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms


class Bencher:
    """Times a zero-argument callable on one device (see the module docstring for the method)."""

    def __init__(self, device: torch.device, threads: int, quick: bool, min_run_time: float,
                 cuda_warmup_ms: int, cuda_rep_ms: int) -> None:
        self.device, self.threads, self.quick = device, threads, quick
        self.min_run_time = min_run_time
        self.cuda_warmup_ms, self.cuda_rep_ms = cuda_warmup_ms, cuda_rep_ms
        self._do_bench = None
        self._flush: Tensor | None = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench
                self._do_bench = do_bench
            except ImportError:
                self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> Timing:
        if self.device.type == "cuda":
            return self._cuda(fn)
        return self._cpu(fn)

    def _cpu(self, fn: Callable[[], object]) -> Timing:
        from torch.utils.benchmark import Timer
        for _ in range(2):  # warm-up (first-call allocations, compile caches)
            fn()
        m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads,
                  label="sa_cuda").blocked_autorange(min_run_time=self.min_run_time)
        times = sorted(m.times)
        if len(times) >= 2:
            q = statistics.quantiles(times, n=4, method="inclusive")
            p25, p75 = q[0], q[2]
        else:
            p25 = p75 = times[0]
        return Timing(m.median * 1e3, p25 * 1e3, p75 * 1e3, len(times),
                      f"torch.utils.benchmark.Timer.blocked_autorange({self.threads} threads)")

    def _cuda(self, fn: Callable[[], object]) -> Timing:
        if self._do_bench is not None:
            q = self._do_bench(fn, warmup=self.cuda_warmup_ms, rep=self.cuda_rep_ms,
                               quantiles=[0.25, 0.5, 0.75])
            return Timing(q[1], q[0], q[2], -1, "triton.testing.do_bench (L2 flushed)")
        # CUDA events, L2 flushed by writing a 256 MiB buffer before every call
        for _ in range(5):
            fn()
        sync(self.device)
        t0 = time.perf_counter()
        fn()
        sync(self.device)
        est = max(time.perf_counter() - t0, 1e-6)
        iters = int(min(max(self.cuda_rep_ms * 1e-3 / est, 10), 1000))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            self._flush.zero_()
            s.record()
            fn()
            e.record()
        sync(self.device)
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        q = statistics.quantiles(times, n=4, method="inclusive")
        return Timing(statistics.median(times), q[0], q[2], iters, "CUDA events (L2 flushed)")


# --------------------------------------------------------------------------------------------
# modules, inputs, correctness

def make_modules(variant: str, shape: Shape, dtype: torch.dtype, device: torch.device,
                 seed: int) -> tuple[nn.Module, nn.Module]:
    """(reference, fused) with identical, non-trivial parameters (the official init has
    cweight = sweight = 0, which would make the gates constant), in ``dtype`` on ``device``."""
    ref_cls, fused_cls = VARIANTS[variant]
    torch.manual_seed(seed)
    ref = ref_cls(shape.C, shape.G)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    fused = fused_cls(shape.C, shape.G)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device=device, dtype=dtype), fused.to(device=device, dtype=dtype)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device,
                seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    size = (shape.B, shape.C, shape.H, shape.W)
    # a per-channel offset and scale, so that means and variances differ between planes
    x = (torch.randn(size, generator=g) * (0.5 + torch.rand(1, shape.C, 1, 1, generator=g))
         + torch.randn(1, shape.C, 1, 1, generator=g))
    gy = torch.randn(size, generator=g)
    return (x.to(device=device, dtype=dtype).requires_grad_(True), gy.to(device=device, dtype=dtype))


def forward_backward(mod: nn.Module, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    x = x.detach().requires_grad_(True)
    names, params = zip(*mod.named_parameters())
    out = mod(x)
    grads = torch.autograd.grad(out, [x, *params], gy)
    return {"out": out.detach(), "grad_x": grads[0],
            **{f"grad_{n}": g for n, g in zip(names, grads[1:])}}


def _max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_fused(ref: nn.Module, fused: nn.Module, x: Tensor, gy: Tensor) -> dict:
    """Fused output and all gradients vs a float64 reference with the same parameter values,
    each within accuracy_bound (given eager's error in the same dtype)."""
    dtype = x.dtype
    ref64 = copy.deepcopy(ref).double()
    R = forward_backward(ref64, x.double(), gy.double())
    del ref64
    F = forward_backward(fused, x, gy)
    try:
        E = forward_backward(ref, x, gy)
        eager_error = None
    except RuntimeError as exc:  # eager kernel missing for this dtype on this device
        E, eager_error = None, str(exc).splitlines()[0]
    details, ok = {}, True
    for key, r in R.items():
        f = F[key]
        scale = r.abs().max().item()
        err = _max_err(f, r)
        finite = bool(torch.isfinite(f).all())
        err_eager = _max_err(E[key], r) if E is not None else None
        bound = accuracy_bound(dtype, scale, err_eager)
        want_dtype = (E if E is not None else F)[key].dtype  # eager's dtype for this tensor
        good = finite and err <= bound and f.shape == r.shape and f.dtype == want_dtype
        ok &= good
        details[key] = {"err": err, "bound": bound, "err_eager": err_eager, "max_abs_ref": scale,
                        "ok": good}
    del R, F, E
    return {"ok": ok, "tensors": details, "eager_error": eager_error}


# --------------------------------------------------------------------------------------------
# per-implementation callables

def build_impl(name: str, ref: nn.Module, fused: nn.Module) -> nn.Module | Callable:
    if name == "eager":
        return ref
    if name == "fused":
        return fused
    if name == "compile":
        return torch.compile(ref, dynamic=False)
    if name == "compile-max-autotune":
        return torch.compile(ref, mode="max-autotune", dynamic=False)
    raise ValueError(name)


def _step_begin(impl: str) -> None:
    if impl == "compile-max-autotune":  # CUDA graphs: a new iteration may overwrite old outputs
        torch.compiler.cudagraph_mark_step_begin()


def pass_fn(impl: str, pass_: str, mod: Callable, x: Tensor, gy: Tensor,
            params: list[Tensor]) -> Callable[[], object]:
    inputs = [x, *params]
    if pass_ == "fwd":
        def fn():
            _step_begin(impl)
            return mod(x)
    elif pass_ == "infer":
        def fn():
            _step_begin(impl)
            with torch.no_grad():
                return mod(x)
    elif pass_ == "fwdbwd":
        def fn():
            _step_begin(impl)
            out = mod(x)
            return torch.autograd.grad(out, inputs, gy)
    elif pass_ == "bwd":
        _step_begin(impl)
        out = mod(x)
        torch.autograd.grad(out, inputs, gy, retain_graph=True)  # raises if unsupported

        def fn():
            return torch.autograd.grad(out, inputs, gy, retain_graph=True)
    else:
        raise ValueError(pass_)
    return fn


def saved_tensor_bytes(fn: Callable[[], object], exclude: list[Tensor]) -> tuple[int, int]:
    """(bytes of unique storages autograd saves while fn runs, the same without the storages
    of ``exclude`` (the input and the parameters, which the caller keeps alive anyway))."""
    storages: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    excluded = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in exclude}
    total = sum(storages.values())
    return total, total - sum(v for k, v in storages.items() if k in excluded)


def peak_cuda_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak allocated bytes during one call of fn beyond what was allocated before it (after one
    warm-up call, so that compilation and autotuning buffers are not counted)."""
    fn()
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    res = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del res
    return peak


# --------------------------------------------------------------------------------------------
# output

def format_table(rows: list[dict]) -> str:
    head = (f"{'variant':<17} {'shape':<13} {'dtype':<5} {'pass':<6} {'impl':<20} "
            f"{'median ms':>10} {'IQR ms':>8} {'GB/s':>8} {'%copy':>6} {'x eager':>8} "
            f"{'x compile':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = (f"{r['variant']:<17} {r['shape']:<13} {r['dtype']:<5} {r['pass']:<6} "
                f"{r['impl']:<20} ")
        if r["status"] != "ok":
            lines.append(lead + f"{r['status']}" + (f": {r['error'][:60]}" if "error" in r else ""))
            continue

        def opt(key: str, width: int, fmt: str = ".2f") -> str:
            v = r.get(key)
            return f"{v:{width}{fmt}}" if v is not None else " " * width

        lines.append(lead + f"{r['median_ms']:10.4f} {r['iqr_ms']:8.4f} {r['gbps']:8.1f} "
                     f"{100 * r['frac_of_copy']:5.0f}% {opt('speedup_vs_eager', 8)} "
                     f"{opt('speedup_vs_compile', 9)}"
                     + ("  (bwd = fwdbwd - fwd)" if r.get("method") == "subtract" else ""))
    return "\n".join(lines)


def format_memory(rows: list[dict], cuda: bool) -> str:
    head = (f"{'variant':<17} {'shape':<13} {'dtype':<5} {'impl':<20} {'saved MiB':>10} "
            f"{'x input':>8} {'beyond x MiB':>12}" + (f" {'peak MiB':>9} {'x input':>8}" if cuda else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['variant']:<17} {r['shape']:<13} {r['dtype']:<5} {r['impl']:<20} "
        if "saved_bytes" not in r:
            lines.append(lead + r.get("error", "n/a")[:60])
            continue
        line = (lead + f"{r['saved_bytes'] / 2**20:10.2f} {r['saved_bytes'] / r['input_bytes']:8.2f} "
                f"{r['saved_bytes_beyond_inputs'] / 2**20:12.2f}")
        if cuda and "peak_bytes" in r:
            line += f" {r['peak_bytes'] / 2**20:9.2f} {r['peak_bytes'] / r['input_bytes']:8.2f}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], shapes: list[str], passes: list[str], title: str, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fused = [r for r in rows if r["impl"] == "fused" and r["status"] == "ok"]
    series = sorted({(r["variant"], r["dtype"]) for r in fused})
    baselines = [b for b in ("eager", "compile") if any(f"speedup_vs_{b}" in r for r in fused)]
    if not fused or not baselines:
        return False
    fig, axes = plt.subplots(len(baselines), len(passes), squeeze=False,
                             figsize=(max(4.5 * len(passes), 6), 3.6 * len(baselines) + 0.8))
    width = 0.8 / max(len(series), 1)
    for i, base in enumerate(baselines):
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            for k, (variant, dtype) in enumerate(series):
                vals = []
                for s in shapes:
                    hit = [r for r in fused if r["shape"] == s and r["pass"] == pass_
                           and r["variant"] == variant and r["dtype"] == dtype]
                    vals.append(hit[0].get(f"speedup_vs_{base}", math.nan) if hit else math.nan)
                xs = [x + (k - (len(series) - 1) / 2) * width for x in range(len(shapes))]
                bars = ax.bar(xs, vals, width, label=f"{variant} {dtype}")
                ax.bar_label(bars, fmt="%.2g", fontsize=6)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{pass_}: fused speedup vs {base}", fontsize=10)
            ax.grid(axis="y", which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Shuffle Attention microbenchmarks (+ SA-ResNet-50 "
                                "end-to-end): eager vs torch.compile vs sa_cuda fused.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", help="comma list of fp32,bf16,fp16,fp64 "
                   "(default CUDA: fp32,bf16,fp16; CPU: fp32,bf16)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of "
                   f"{','.join(VARIANTS)} (official sa_layer, seed shuffle_attention)")
    p.add_argument("--shapes", help=f"comma list of shape names: {', '.join(SHAPES)} "
                   "(default: all but quick)")
    p.add_argument("--passes", default=",".join(DEFAULT_PASSES),
                   help=f"comma list of {','.join(PASSES)}")
    p.add_argument("--impls", help=f"comma list of {','.join(IMPLS)} (default: all that apply; "
                   "compile-max-autotune only on CUDA)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke test: shape 'quick', fp32, both variants, eager and fused "
                   "only, short timing, no e2e; checks correctness, asserts nothing about speed")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--tag", help="suffix of the output file names (default 'quick' with --quick)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--e2e", dest="e2e", action="store_true", default=None,
                   help="also run the SA-ResNet-50 end-to-end benchmark (default, except with "
                   "--quick, where --e2e runs a tiny one: batch 2, 64x64)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--e2e-batches", help="comma list (default CUDA 32,64; CPU 8; quick 2)")
    p.add_argument("--e2e-resolution", type=int,
                   help="input size (default CUDA 224, CPU 112, quick 64)")
    p.add_argument("--e2e-modes", help="comma list of fp32,amp-bf16,amp-fp16 "
                   "(default CUDA fp32,amp-bf16; CPU fp32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads (default: all cores)")
    p.add_argument("--min-run-time", type=float, help="CPU seconds per measurement (default 1.0, "
                   "quick 0.05)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _csv(value: str | None, default: list[str], allowed) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()] if value else list(default)
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; choose from {list(allowed)}")
    return items


class Progress:
    """tqdm when installed, else one line per step on stderr."""

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if not cuda:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    quick = args.quick
    dtypes = _csv(args.dtypes, ["fp32"] if quick else (["fp32", "bf16", "fp16"] if cuda
                                                       else ["fp32", "bf16"]), DTYPES)
    variants = _csv(args.variants, list(VARIANTS), VARIANTS)
    shapes = _csv(args.shapes, ["quick"] if quick else DEFAULT_SHAPES, SHAPES)
    passes = _csv(args.passes, list(DEFAULT_PASSES), PASSES)
    default_impls = [i for i in IMPLS if cuda or i != "compile-max-autotune"]
    if quick:  # compiling takes tens of seconds on a small CPU: opt in with --impls
        default_impls = ["eager", "fused"]
    impls = _csv(args.impls, default_impls, IMPLS)
    if "compile-max-autotune" in impls and not cuda:
        raise SystemExit("compile-max-autotune is CUDA only")
    min_run_time = args.min_run_time or (0.05 if quick else 1.0)
    bencher = Bencher(device, threads, quick, min_run_time,
                      cuda_warmup_ms=10 if quick else 25, cuda_rep_ms=20 if quick else 100)

    label = device_label(device, threads)
    date = datetime.date.today().isoformat()
    tag = args.tag or ("quick" if quick else None)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{label}-{date}" + (f"-{tag}" if tag else "")
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"

    load_before = _loadavg()
    failures: list[str] = []
    if "fused" in impls and not sa_cuda.fused_available(device):
        failures.append(f"fused kernels are not built for {device.type} "
                        "(sa_cuda.fused_available is False): nothing fused to measure")
        impls = [i for i in impls if i != "fused"]

    configs = [(v, SHAPES[s], d) for v in variants for s in shapes for d in dtypes]
    e2e_cfg = None
    if args.e2e is None:
        args.e2e = not quick
    if args.e2e:
        e2e_cfg = {
            "modes": _csv(args.e2e_modes, ["fp32"] if (quick or not cuda) else ["fp32", "amp-bf16"],
                          e2e.MODES),
            "batches": ([int(b) for b in args.e2e_batches.split(",")] if args.e2e_batches
                        else [2] if quick else ([32, 64] if cuda else [8])),
            "resolution": args.e2e_resolution or (64 if quick else (224 if cuda else 112)),
            "warmup": 1 if quick else (10 if cuda else 2),
            "iters": 2 if quick else (30 if cuda else 5),
        }
    per_config = 1 + 1 + len(impls) * (len(passes) + 1)  # check, copy, passes + memory per impl
    total = len(configs) * per_config
    if e2e_cfg:
        total += len(e2e_cfg["modes"]) * len(e2e_cfg["batches"]) * 4
    progress = Progress(total)

    rows: list[dict] = []
    memory: list[dict] = []
    checks: list[dict] = []
    copies: dict[tuple[int, str], dict] = {}
    for variant, shape, dname in configs:
        dtype = DTYPES[dname]
        key = f"{variant}/{shape.name}/{dname}"
        common = {"variant": variant, "shape": shape.name, "B": shape.B, "C": shape.C,
                  "H": shape.H, "W": shape.W, "G": shape.G, "dtype": dname}
        e = torch.empty((), dtype=dtype).element_size()
        n = shape.n
        if cuda:
            torch.cuda.empty_cache()
        ref, fused = make_modules(variant, shape, dtype, device, args.seed)
        x, gy = make_inputs(shape, dtype, device, args.seed)
        params = {name: list(m.parameters()) for name, m in (("ref", ref), ("fused", fused))}

        # 1. correctness of the fused module on exactly these inputs
        fused_ok = "fused" in impls
        if fused_ok:
            try:
                chk = check_fused(ref, fused, x, gy)
            except Exception as exc:  # noqa: BLE001  (a crash is a failure, not a skip)
                chk = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()}
            checks.append({**common, **chk})
            if not chk["ok"]:
                fused_ok = False
                bad = {k: v for k, v in chk.get("tensors", {}).items() if not v["ok"]}
                msg = f"{key}: fused check FAILED: {chk.get('error') or bad}"
                failures.append(msg)
                progress.write("FAILED " + msg)
        progress.step(f"{key} check")

        # 2. the copy of the same number of elements (the practical bandwidth peak)
        if (n, dname) not in copies:
            src = torch.empty(n, dtype=dtype, device=device).normal_()
            dst = torch.empty_like(src)
            t = bencher(lambda: dst.copy_(src))
            copies[(n, dname)] = {"n": n, "dtype": dname, "bytes": 2 * n * e,
                                  "median_ms": t.median_ms, "p25_ms": t.p25_ms,
                                  "p75_ms": t.p75_ms, "gbps": 2 * n * e / t.median_ms / 1e6}
            del src, dst
        copy_res = copies[(n, dname)]
        progress.step(f"{key} copy")

        # 3. timing, 4. memory
        if any(i.startswith("compile") for i in impls):
            torch._dynamo.reset()  # fresh caches: no recompile limit, no stale guards
        cfg_rows: dict[tuple[str, str], dict] = {}
        for impl in impls:
            mod_params = params["fused" if impl == "fused" else "ref"]
            row_base = {**common, "impl": impl}
            if impl == "fused" and not fused_ok:
                for pass_ in passes:
                    rows.append({**row_base, "pass": pass_, "status": "FAILED"})
                    progress.step(f"{key} {impl} {pass_}")
                memory.append({**row_base, "error": "FAILED"})
                progress.step(f"{key} {impl} memory")
                continue
            try:
                mod = build_impl(impl, ref, fused)
            except Exception as exc:  # noqa: BLE001
                mod = None
                build_error = f"{type(exc).__name__}: {exc}"
            # memory of one forward + backward (first: it also compiles the compile impls)
            mem = {**row_base, "input_bytes": n * e}
            try:
                if mod is None:
                    raise RuntimeError(build_error)

                def fwd_only(mod=mod) -> object:
                    _step_begin(impl)
                    return mod(x)
                total_saved, beyond = saved_tensor_bytes(fwd_only, [x, *mod_params])
                mem.update(saved_bytes=total_saved, saved_bytes_beyond_inputs=beyond)
                if cuda:
                    mem["peak_bytes"] = peak_cuda_bytes(
                        pass_fn(impl, "fwdbwd", mod, x, gy, mod_params), device)
            except Exception as exc:  # noqa: BLE001
                mem["error"] = f"{type(exc).__name__}: {exc}"
                failures.append(f"{key} {impl} memory: {mem['error'].splitlines()[0]}")
            memory.append(mem)
            progress.step(f"{key} {impl} memory")
            # bwd last: its fallback (fwdbwd - fwd) needs the other two
            for pass_ in sorted(passes, key=lambda q: PASSES.index(q) if q != "bwd" else 99):
                desc = f"{key} {impl} {pass_}"
                row = {**row_base, "pass": pass_, "model_bytes": BYTES_FACTOR[pass_] * n * e,
                       "method": "retain_graph" if pass_ == "bwd" else "direct"}
                try:
                    if mod is None:
                        raise RuntimeError(build_error)
                    try:
                        if pass_ == "bwd" and impl.startswith("compile"):
                            # AOTAutograd donates saved buffers to the compiled backward, which
                            # then refuses retain_graph: recompile without donation (same
                            # kernels; only the backward's output buffers are fresh allocations)
                            with torch._functorch.config.patch(donated_buffer=False):
                                torch._dynamo.reset()
                                mod = build_impl(impl, ref, fused)
                                fn = pass_fn(impl, pass_, mod, x, gy, mod_params)
                            row["method"] = "retain_graph, donated_buffer=False"
                        else:
                            fn = pass_fn(impl, pass_, mod, x, gy, mod_params)
                        t = bencher(fn)
                        del fn
                    except RuntimeError as exc:
                        if pass_ != "bwd":
                            raise
                        # backward of a retained graph unsupported here: t(fwdbwd) - t(fwd)
                        progress.write(f"{desc}: retain_graph backward failed ({exc}); "
                                       "timing fwdbwd - fwd instead")
                        fb, f = (bencher(pass_fn(impl, q, mod, x, gy, mod_params))
                                 for q in ("fwdbwd", "fwd"))
                        med = fb.median_ms - f.median_ms
                        half = (fb.iqr_ms + f.iqr_ms) / 2
                        t = Timing(med, med - half, med + half, 0, fb.timer)
                        row["method"] = "subtract"
                    row.update(status="ok", median_ms=t.median_ms, p25_ms=t.p25_ms,
                               p75_ms=t.p75_ms, iqr_ms=t.iqr_ms, n_measurements=t.n,
                               timer=t.timer)
                    row["gbps"] = row["model_bytes"] / row["median_ms"] / 1e6
                    row["copy_gbps"] = copy_res["gbps"]
                    row["frac_of_copy"] = row["gbps"] / copy_res["gbps"]
                except Exception as exc:  # noqa: BLE001
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}".strip())
                    failures.append(f"{desc}: {row['error'].splitlines()[0]}")
                    progress.write(f"ERROR {desc}: {row['error'].splitlines()[0]}")
                cfg_rows[(impl, pass_)] = row
                progress.step(desc)
            rows.extend(cfg_rows[(impl, q)] for q in passes)
            del mod
        # speedups within this config
        for (impl, pass_), row in cfg_rows.items():
            if row["status"] != "ok":
                continue
            for base in ("eager", "compile"):
                b = cfg_rows.get((base, pass_))
                if b is not None and b["status"] == "ok" and impl != base:
                    row[f"speedup_vs_{base}"] = b["median_ms"] / row["median_ms"]
        del ref, fused, x, gy, params
        gc.collect()

    e2e_rows: list[dict] = []
    if e2e_cfg:
        if any(i.startswith("compile") for i in impls):
            torch._dynamo.reset()
        e2e_rows, e2e_failures = e2e.run_e2e(
            device, e2e_cfg["modes"], e2e_cfg["batches"], e2e_cfg["resolution"],
            e2e_cfg["warmup"], e2e_cfg["iters"], log=progress.write,
            tick=lambda: progress.step("e2e"))
        failures += e2e_failures
    progress.close()
    load_after = _loadavg()

    # ---- report
    title = (f"sa_cuda {sa_cuda.__version__} | {label} | torch {torch.__version__} | {date}")
    print(f"\n{title}")
    print(f"timer: {_timer_desc(bencher, device)}")
    # the 1-minute load average at the start is other processes' (this one had not run yet)
    busy = load_before[0] if load_before else None
    if not cuda and busy is not None and busy > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {busy:.1f} on {os.cpu_count()} cores when the run started: "
              "other processes compete for the CPU, timings are unreliable (a multi-threaded "
              "region waits for its descheduled threads)")
    print("model bytes: fwd/infer 2ne, bwd 3ne, fwdbwd 5ne; GB/s = model bytes / median; "
          "%copy = GB/s / (copy of n elements, 2ne bytes, same run)\n")
    print(format_table(rows))
    print("\ncopy of n elements (x.copy_(y), 2*n*e bytes):")
    for c in copies.values():
        print(f"  n={c['n']:>10} {c['dtype']:<5} {c['median_ms']:9.4f} ms  {c['gbps']:8.1f} GB/s")
    print("\nmemory of one forward+backward (saved = bytes autograd keeps for backward, unique "
          "storages; 'beyond x' excludes the input and the parameters"
          + ("; peak = max_memory_allocated delta" if cuda else "") + "):")
    print(format_memory(memory, cuda))
    if e2e_rows:
        print(f"\nend-to-end SA-ResNet-50 (eager = reference SA layers, fused = sa_cuda.SALayer, "
              f"same weights; {e2e_cfg['warmup']} warm-up + {e2e_cfg['iters']} timed steps):")
        print(e2e.format_table(e2e_rows))

    result = {
        "title": title,
        "date": date,
        "device": label,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model_name(),
        "threads": threads,
        "torch": torch.__version__,
        "sa_cuda": sa_cuda.__version__,
        "python": platform.python_version(),
        "command": " ".join([sys.executable, *sys.argv]),
        "timer": _timer_desc(bencher, device),
        "model_bytes": {p: f"{BYTES_FACTOR[p]}*n*e" for p in PASSES},
        "bwd_method": "retain_graph: one forward outside the timed region, timed "
                      "torch.autograd.grad(out, [x, *params], grad_out, retain_graph=True); "
                      "'subtract' rows: t(fwdbwd) - t(fwd)",
        "loadavg_1_5_15min": {"start": load_before, "end": load_after, "cores": os.cpu_count()},
        "quick": quick,
        "shapes": {s: vars(SHAPES[s]) for s in shapes},
        "checks": checks,
        "copy": list(copies.values()),
        "results": rows,
        "memory": memory,
        "e2e": {"config": e2e_cfg, "results": e2e_rows} if e2e_cfg else None,
        "failures": failures,
    }
    json_path.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nJSON: {json_path}")
    if not args.no_plot:
        if plot(rows, shapes, passes, title, png_path):
            print(f"PNG:  {png_path}")
    if failures:
        print(f"\n{len(failures)} FAILURE(S):")
        for f in failures:
            print("  " + f.splitlines()[0])
        return 1
    print("\nall fused results checked against the float64 reference: OK")
    return 0


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _timer_desc(bencher: Bencher, device: torch.device) -> str:
    if device.type == "cuda":
        return ("triton.testing.do_bench (L2 flushed), quantiles 25/50/75" if bencher._do_bench
                else "CUDA events, L2 flushed with a 256 MiB write per call")
    return (f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={bencher.min_run_time}), "
            f"{bencher.threads} threads; median and IQR of the blocks")


if __name__ == "__main__":
    raise SystemExit(main())
