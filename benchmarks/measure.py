"""One (variant, shape, dtype) config of ``python -m benchmarks.bench``, in this order:
1. the fused module is checked against a float64 reference (output and every gradient) on the
   very inputs that are then timed; a wrong or crashing result is FAILED and never timed;
2. a copy of the same number of elements is timed (the bandwidth yardstick of this run);
3. per implementation: the memory of one forward+backward (first: it also compiles the compile
   implementations), then each pass (harness.pass_fn). ``bwd`` is timed last: when an
   implementation cannot back-propagate a retained graph, it is t(fwdbwd) - t(fwd).
Every failure is recorded in the rows and appended to ``failures``; the run goes on."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
import torch._functorch.config  # noqa: F401  (torch._functorch.config.patch below)
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.configs import DTYPES, PASSES, SPEEDUP_BASELINES, Shape
from benchmarks.report import Progress
from benchmarks.timers import Bencher, Timing, element_size, model_bytes


@dataclass
class Config:
    variant: str
    shape: Shape
    dname: str
    ref: nn.Module
    fused: nn.Module
    x: Tensor
    gy: Tensor
    failures: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.shape.name}/{self.dname}"

    @property
    def common(self) -> dict:
        """The fields every row of this config starts with."""
        s = self.shape
        return {
            "variant": self.variant,
            "shape": s.name,
            "B": s.B,
            "C": s.C,
            "H": s.H,
            "W": s.W,
            "G": s.G,
            "dtype": self.dname,
        }

    def params(self, impl: str) -> list[Tensor]:
        return list((self.fused if impl == "fused" else self.ref).parameters())


def check(cfg: Config, progress: Progress) -> dict:
    """harness.check_fused on the config's inputs; a crash is a failure, not a skip."""
    try:
        chk = harness.check_fused(cfg.ref, cfg.fused, cfg.x, cfg.gy)
    except Exception as exc:  # noqa: BLE001
        chk = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    if not chk["ok"]:
        bad = {k: v for k, v in chk.get("tensors", {}).items() if not v["ok"]}
        msg = f"{cfg.key}: fused check FAILED: {chk.get('error') or bad}"
        cfg.failures.append(msg)
        progress.write("FAILED " + msg)
    return {**cfg.common, **chk}


def memory(cfg: Config, impl: str, mod) -> dict:
    """Saved bytes of one forward (and on CUDA the peak of one forward+backward)."""
    dtype = DTYPES[cfg.dname]
    mem = {**cfg.common, "impl": impl, "input_bytes": cfg.shape.n * element_size(dtype)}
    params = cfg.params(impl)
    try:

        def fwd_only() -> object:
            harness.step_begin(impl)
            return mod(cfg.x)

        total, beyond = harness.saved_tensor_bytes(fwd_only, [cfg.x, *params])
        mem.update(saved_bytes=total, saved_bytes_beyond_inputs=beyond)
        if cfg.x.device.type == "cuda":
            mem["peak_bytes"] = harness.peak_cuda_bytes(
                harness.pass_fn(impl, "fwdbwd", mod, cfg.x, cfg.gy, params), cfg.x.device
            )
    except Exception as exc:  # noqa: BLE001
        mem["error"] = f"{type(exc).__name__}: {exc}"
        cfg.failures.append(f"{cfg.key} {impl} memory: {mem['error'].splitlines()[0]}")
    return mem


def time_pass(
    cfg: Config, bencher: Bencher, impl: str, pass_: str, mod, progress: Progress
) -> tuple[Timing, str]:
    """(timing, method) of one pass; raises what the implementation raises."""
    params = cfg.params(impl)
    if pass_ != "bwd":
        return bencher(harness.pass_fn(impl, pass_, mod, cfg.x, cfg.gy, params)), "direct"
    try:
        if impl.startswith("compile"):
            # AOTAutograd donates saved buffers to the compiled backward, which then refuses
            # retain_graph: recompile without donation (same kernels; only the backward's
            # output buffers are fresh allocations)
            with torch._functorch.config.patch(donated_buffer=False):
                torch._dynamo.reset()
                mod = harness.build_impl(impl, cfg.ref, cfg.fused)
                fn = harness.pass_fn(impl, pass_, mod, cfg.x, cfg.gy, params)
            return bencher(fn), "retain_graph, donated_buffer=False"
        return bencher(harness.pass_fn(impl, pass_, mod, cfg.x, cfg.gy, params)), "retain_graph"
    except RuntimeError as exc:
        progress.write(
            f"{cfg.key} {impl} bwd: retain_graph backward failed ({exc}); "
            "timing fwdbwd - fwd instead"
        )
    fb, f = (
        bencher(harness.pass_fn(impl, q, mod, cfg.x, cfg.gy, params)) for q in ("fwdbwd", "fwd")
    )
    med, half = fb.median_ms - f.median_ms, (fb.iqr_ms + f.iqr_ms) / 2
    return Timing(med, med - half, med + half, 0, fb.timer), "subtract"


def measure_impl(
    cfg: Config,
    bencher: Bencher,
    impl: str,
    passes: list[str],
    copy_gbps: float,
    progress: Progress,
) -> tuple[list[dict], dict]:
    """(one row per pass, in the order of ``passes``; the memory row) of one implementation."""
    base = {**cfg.common, "impl": impl}
    try:
        mod, build_error = harness.build_impl(impl, cfg.ref, cfg.fused), None
    except Exception as exc:  # noqa: BLE001
        mod, build_error = None, f"{type(exc).__name__}: {exc}"
    mem = memory(cfg, impl, mod) if mod is not None else {**base, "error": build_error}
    progress.step(f"{cfg.key} {impl} memory")
    rows = {}
    for pass_ in sorted(passes, key=lambda q: PASSES.index(q) if q != "bwd" else 99):
        desc = f"{cfg.key} {impl} {pass_}"
        nbytes = model_bytes(pass_, cfg.shape.n, DTYPES[cfg.dname])
        row = rows[pass_] = {**base, "pass": pass_, "model_bytes": nbytes}
        try:
            if mod is None:
                raise RuntimeError(build_error)
            t, row["method"] = time_pass(cfg, bencher, impl, pass_, mod, progress)
            gbps = nbytes / t.median_ms / 1e6
            row.update(
                status="ok",
                **t.as_dict(),
                gbps=gbps,
                copy_gbps=copy_gbps,
                frac_of_copy=gbps / copy_gbps,
            )
        except Exception as exc:  # noqa: BLE001
            row.update(status="error", error=f"{type(exc).__name__}: {exc}".strip())
            cfg.failures.append(f"{desc}: {row['error'].splitlines()[0]}")
            progress.write(f"ERROR {desc}: {row['error'].splitlines()[0]}")
        progress.step(desc)
    return [rows[q] for q in passes], mem


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<baseline> on the rows of one config, over the baselines the row's
    implementation is meant to replace (configs.SPEEDUP_BASELINES)."""
    ok = {(r["impl"], r["pass"]): r for r in rows if r["status"] == "ok"}
    for (impl, pass_), row in ok.items():
        for base in SPEEDUP_BASELINES.get(impl, ()):
            if (base, pass_) in ok:
                row[f"speedup_vs_{base}"] = ok[(base, pass_)]["median_ms"] / row["median_ms"]


def failed_impl(
    cfg: Config, impl: str, passes: list[str], progress: Progress
) -> tuple[list[dict], dict]:
    """The rows of an implementation that is not timed because its check FAILED."""
    base = {**cfg.common, "impl": impl}
    rows = [{**base, "pass": q, "status": "FAILED"} for q in passes]
    for q in passes:
        progress.step(f"{cfg.key} {impl} {q}")
    progress.step(f"{cfg.key} {impl} memory")
    return rows, {**base, "error": "FAILED"}
