"""How the benchmarks time a callable, the copy that gives the bandwidth yardstick of the same run,
and the model bytes.

Timers (each has ``time(make_fns, bytes_per_call) -> dict`` with median_ms, p25_ms, p75_ms,
timer; ``make_fns(copies)`` returns one zero-argument callable per input copy):
- ``Bencher``: CUDA ``triton.testing.do_bench`` (L2 flushed before every call; quantiles 25/50/75),
  or CUDA events with a 256 MiB flush write when triton is missing; CPU
  ``torch.utils.benchmark.Timer(...).blocked_autorange`` (median and IQR of the blocks);
- ``GraphTimer`` (CUDA): several iterations captured into one CUDA graph (enough for ~2 ms), the
  graph replayed; time per iteration = replay time / iterations, so launch overhead does not hide
  kernel time. Iterations rotate over input copies whose total exceeds twice the L2 cache, so small
  shapes are not timed out of a warm L2 (the copy rotates the same way).

Model bytes (docs/design.md), n = B*C*H*W, e = element size: fwd/infer 2*n*e (read x, write out),
bwd 3*n*e (read x and grad_out, write grad_x), fwdbwd 5*n*e.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark  # noqa: F401  (imported before any progress bar: see below)
from torch import Tensor

# torch.utils.benchmark imports torch.utils.cpp_extension, which logs "No CUDA runtime is found,
# using CUDA_HOME=..." when it is imported on a machine without a GPU. Importing it here, at start
# up, prints that line before the progress bar instead of through it.

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold 64-bit glibc accepts.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_MMAP_MAX = 32 << 20


def mallopt(settings: dict[int, int]) -> bool:
    """Applies glibc mallopt settings ``{parameter: value}``, for the rest of the process; False
    where there is no glibc mallopt or it refuses one. Left alone, glibc returns a freed block
    above its mmap threshold (or a free heap top above its trim threshold) to the kernel, so the
    next allocation page-faults on every 4 KiB of it, on some calls and not on others."""
    try:
        libc_mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(bool(libc_mallopt(param, value)) for param, value in settings.items())


BYTES_FACTOR = {"fwd": 2, "infer": 2, "bwd": 3, "fwdbwd": 5}  # model bytes = factor * n * e
# The bottleneck tail relu(SA(x) + identity): the forward reads x and identity and writes out; the
# backward reads grad_out, out and x and writes grad_x and grad_identity.
TAIL_BYTES_FACTOR = {"fwd": 3, "infer": 3, "bwd": 5, "fwdbwd": 8}


def model_bytes(pass_: str, n: int, dtype: torch.dtype, tail: bool = False) -> int:
    return (TAIL_BYTES_FACTOR if tail else BYTES_FACTOR)[pass_] * n * element_size(dtype)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(times: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75) of ``times``."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], statistics.median(times), q[2]


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

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "p25_ms": self.p25_ms,
            "p75_ms": self.p75_ms,
            "iqr_ms": self.iqr_ms,
            "n_measurements": self.n,
            "timer": self.timer,
        }


class Bencher:
    """Times a zero-argument callable on one device (the module docstring says how)."""

    def __init__(
        self,
        device: torch.device,
        threads: int,
        min_run_time: float,
        cuda_warmup_ms: int = 25,
        cuda_rep_ms: int = 100,
    ) -> None:
        self.device, self.threads, self.min_run_time = device, threads, min_run_time
        self.cuda_warmup_ms, self.cuda_rep_ms = cuda_warmup_ms, cuda_rep_ms
        self.do_bench = None
        self._flush: Tensor | None = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench

                self.do_bench = do_bench
            except ImportError:
                self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> Timing:
        return self._cuda(fn) if self.device.type == "cuda" else self._cpu(fn)

    def time(self, make_fns: Callable[[int], list], bytes_per_call: int) -> dict:
        """The timer interface of GraphTimer, on one input copy."""
        return self(make_fns(1)[0]).as_dict()

    def description(self) -> str:
        if self.device.type == "cuda":
            return (
                "triton.testing.do_bench (L2 flushed), quantiles 25/50/75"
                if self.do_bench
                else "CUDA events, L2 flushed with a 256 MiB write per call"
            )
        return (
            f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={self.min_run_time}"
            f"), {self.threads} threads; median and IQR of the blocks"
        )

    def _cpu(self, fn: Callable[[], object]) -> Timing:
        for _ in range(2):  # warm-up (first-call allocations, compile caches)
            fn()
        m = torch.utils.benchmark.Timer(
            stmt="fn()", globals={"fn": fn}, num_threads=self.threads, label="sa_cuda"
        ).blocked_autorange(min_run_time=self.min_run_time)
        p25, median, p75 = quartiles(sorted(m.times))
        return Timing(
            median * 1e3,
            p25 * 1e3,
            p75 * 1e3,
            len(m.times),
            f"torch.utils.benchmark.Timer.blocked_autorange({self.threads} threads)",
        )

    def _cuda(self, fn: Callable[[], object]) -> Timing:
        if self.do_bench is not None:
            q = self.do_bench(
                fn, warmup=self.cuda_warmup_ms, rep=self.cuda_rep_ms, quantiles=[0.25, 0.5, 0.75]
            )
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
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for start, end in events:
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        sync(self.device)
        p25, median, p75 = quartiles(sorted(s.elapsed_time(e) for s, e in events))
        return Timing(median, p25, p75, iters, "CUDA events (L2 flushed)")


class GraphTimer:
    """CUDA-graph replay (the module docstring says how)."""

    def __init__(self, device: torch.device, target_ms: float = 2.0, replays: int = 15) -> None:
        self.device, self.target_ms, self.replays = device, target_ms, replays
        props = torch.cuda.get_device_properties(device)
        self.l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        self.stream = torch.cuda.Stream(device)

    def copies_for(self, bytes_per_call: int) -> int:
        return max(1, min(16, math.ceil(2 * self.l2_bytes / max(bytes_per_call, 1))))

    def time(self, make_fns: Callable[[int], list], bytes_per_call: int) -> dict:
        s = self.stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(
            s
        ):  # the backward of a retained forward runs on the forward's stream
            fns = make_fns(self.copies_for(bytes_per_call))
            iters = len(fns) * self._rounds(fns)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                for i in range(iters):
                    fns[i % len(fns)]()
            graph.replay()
            times = [self._elapsed_ms(graph.replay) / iters for _ in range(self.replays)]
        torch.cuda.current_stream(self.device).wait_stream(s)
        del graph, fns
        p25, median, p75 = quartiles(times)
        return {
            "median_ms": median,
            "p25_ms": p25,
            "p75_ms": p75,
            "iters_per_graph": iters,
            "input_copies": self.copies_for(bytes_per_call),
            "timer": "CUDA graph replay",
        }

    def _rounds(self, fns: list) -> int:
        """Rounds over the input copies per graph: enough for ~target_ms, at most 200 calls."""
        for _ in range(2):  # warm-up
            for fn in fns:
                fn()
        per_call = max(self._elapsed_ms(lambda: [fn() for fn in fns]) / len(fns), 1e-4)
        return max(1, min(200 // len(fns), math.ceil(self.target_ms / per_call / len(fns))))

    def _elapsed_ms(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        fn()
        end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end)


def time_copy(timer, elems: int, dtype: torch.dtype, device: torch.device) -> dict:
    """``dst.copy_(src)`` of ``elems`` elements (2 * elems * e bytes): the practical bandwidth
    peak, timed by ``timer`` in the same run as what is compared with it."""
    nbytes = 2 * elems * element_size(dtype)

    def make_fns(count: int) -> list[Callable[[], object]]:
        pairs = [
            (
                torch.empty(elems, dtype=dtype, device=device).normal_(),
                torch.empty(elems, dtype=dtype, device=device),
            )
            for _ in range(count)
        ]
        return [lambda src=src, dst=dst: dst.copy_(src) for src, dst in pairs]

    t = timer.time(make_fns, nbytes)
    return {"n": elems, "bytes": nbytes, **t, "gbps": nbytes / t["median_ms"] / 1e6}
