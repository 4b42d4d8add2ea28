"""End-to-end benchmark: SA-ResNet-50 with reference (eager) vs fused SA layers, same weights.

Measures, per precision mode and batch size, for each of the two models:
- ``train``: one training step (forward, cross-entropy loss, backward, SGD step with momentum),
- ``infer``: eval-mode forward under ``torch.inference_mode()``,
as images/s (from the median step time; p25/p75 kept as the spread) and memory:
CUDA: peak ``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it
(model, optimizer state, inputs); CPU (no allocator statistics): the bytes autograd keeps alive
for the backward of the training step (unique storages packed by ``saved_tensors_hooks``).

Before timing, the fused model's eval-mode logits and train-mode loss are compared with the eager
model's (same weights): fp32 must agree to 1e-3 of max|logit|; autocast modes are reported and
only fail when the difference is above 0.1 of max|logit| or not finite.

Called by bench.py (``--e2e``); also runnable alone: ``python benchmarks/e2e.py --device cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from typing import Callable

import torch
from torch import nn

from sa_cuda.models import sa_resnet50

AMP_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}
MODES = ("fp32", *AMP_DTYPES)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, mode: str):
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[mode])


def time_iters(fn: Callable[[], object], device: torch.device, warmup: int,
               iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of fn (after ``warmup`` calls), synchronized per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], statistics.median(times), q[2]


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the unique storages autograd saves for backward while fn runs."""
    storages: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _perturb_sa(model: nn.Module, seed: int) -> None:
    """Non-trivial SA parameters (official init makes cweight = sweight = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".sa." in name:
                p.add_((torch.randn(p.shape, generator=g) * 0.5).to(p))


def make_models(device: torch.device, seed: int = 0) -> dict[str, nn.Module]:
    """{"eager": SA-ResNet-50 with reference SA layers, "fused": the same weights, fused SA}."""
    torch.manual_seed(seed)
    eager = sa_resnet50(fused=False)
    _perturb_sa(eager, seed)
    fused = sa_resnet50(fused=True)
    fused.load_state_dict(eager.state_dict(), strict=True)
    return {"eager": eager.to(device), "fused": fused.to(device)}


def _check(models: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor,
           device: torch.device, mode: str) -> dict:
    """Eval logits and train-mode loss of fused vs eager (copies: BN statistics stay untouched)."""
    out = {}
    with torch.no_grad(), _autocast(device, mode):
        e, f = (copy.deepcopy(models[k]).eval()(images).float() for k in ("eager", "fused"))
        scale = e.abs().max().item()
        out["logits_max_abs_diff"] = (e - f).abs().max().item()
        out["logits_max_abs"] = scale
        le, lf = (nn.functional.cross_entropy(copy.deepcopy(models[k]).train()(images).float(),
                                              labels).item() for k in ("eager", "fused"))
        out["train_loss_eager"], out["train_loss_fused"] = le, lf
    rel = out["logits_max_abs_diff"] / max(scale, 1e-30)
    out["logits_rel_diff"] = rel
    tol = 1e-3 if mode == "fp32" else 0.1
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), (rel, le, lf)))
    out["tolerance"] = tol
    out["ok"] = bool(finite and rel <= tol and abs(le - lf) <= tol * max(1.0, abs(le)))
    return out


def run_e2e(device: torch.device, modes: list[str], batches: list[int], resolution: int,
            warmup: int, iters: int, log: Callable[[str], None] = print,
            tick: Callable[[], None] = lambda: None) -> tuple[list[dict], list[str]]:
    """Returns (rows, failures). One row per (mode, batch, model, step)."""
    rows: list[dict] = []
    failures: list[str] = []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for mode in modes:
        for batch in batches:
            key = f"e2e/sa_resnet50/{mode}/b{batch}/{resolution}px"
            models = make_models(device)
            gen = torch.Generator().manual_seed(1)
            images = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device)
            labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            try:
                check = _check(models, images, labels, device, mode)
            except Exception as exc:  # noqa: BLE001  (a crash of the fused model is a failure)
                check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if not check["ok"]:
                failures.append(f"{key}: fused vs eager check FAILED: {check}")
                log(f"FAILED {key}: {check}")
            for name, model in models.items():
                opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

                def train_step(model=model, opt=opt) -> None:
                    with _autocast(device, mode):
                        loss = nn.functional.cross_entropy(model(images), labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                def infer_step(model=model) -> None:
                    with torch.inference_mode(), _autocast(device, mode):
                        model(images)

                for step, fn in (("train", train_step), ("infer", infer_step)):
                    row = {"key": key, "model": "sa_resnet50", "impl": name, "step": step,
                           "mode": mode, "batch": batch, "resolution": resolution,
                           "check": check}
                    if name == "fused" and not check["ok"]:
                        row["status"] = "FAILED"
                        rows.append(row)
                        tick()
                        continue
                    try:
                        model.train(step == "train")
                        times = time_iters(fn, device, warmup, iters)
                        p25, med, p75 = _quantiles(times)
                        row.update(status="ok", median_s=med, p25_s=p25, p75_s=p75,
                                   iqr_s=p75 - p25, n=len(times), images_per_s=batch / med)
                        if device.type == "cuda":
                            _sync(device)
                            torch.cuda.reset_peak_memory_stats(device)
                            base = torch.cuda.memory_allocated(device)
                            fn()
                            _sync(device)
                            row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
                        if step == "train":
                            def fwd_loss(model=model) -> None:
                                with _autocast(device, mode):
                                    nn.functional.cross_entropy(model(images), labels)
                            row["saved_bytes"] = saved_bytes(fwd_loss)
                    except Exception as exc:  # noqa: BLE001
                        row["status"] = "error"
                        row["error"] = f"{type(exc).__name__}: {exc}"
                        failures.append(f"{key}/{name}/{step}: {row['error']}")
                        log(f"ERROR {key}/{name}/{step}: {row['error']}")
                    rows.append(row)
                    tick()
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # speedups of fused over eager
    for row in rows:
        if row["impl"] == "fused" and row.get("status") == "ok":
            base = [r for r in rows if r["key"] == row["key"] and r["impl"] == "eager"
                    and r["step"] == row["step"] and r.get("status") == "ok"]
            if base:
                row["speedup_vs_eager"] = base[0]["median_s"] / row["median_s"]
    return rows, failures


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<12} {'mode':<9} {'batch':>5} {'res':>4} {'step':<6} {'impl':<6} "
            f"{'median ms':>10} {'IQR ms':>8} {'img/s':>8} {'x eager':>8} {'peak MiB':>9} "
            f"{'saved MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['model']:<12} {r['mode']:<9} {r['batch']:>5} {r['resolution']:>4} "
                         f"{r['step']:<6} {r['impl']:<6} {r.get('status', '?').upper()}")
            continue
        peak = f"{r['peak_bytes'] / 2**20:9.1f}" if "peak_bytes" in r else f"{'-':>9}"
        saved = f"{r['saved_bytes'] / 2**20:9.1f}" if "saved_bytes" in r else f"{'-':>9}"
        sp = f"{r['speedup_vs_eager']:8.2f}" if "speedup_vs_eager" in r else f"{'':>8}"
        lines.append(f"{r['model']:<12} {r['mode']:<9} {r['batch']:>5} {r['resolution']:>4} "
                     f"{r['step']:<6} {r['impl']:<6} {r['median_s'] * 1e3:10.2f} "
                     f"{r['iqr_s'] * 1e3:8.2f} {r['images_per_s']:8.1f} {sp} {peak} {saved}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default=None, help=f"comma list of {MODES}")
    p.add_argument("--batches", default=None, help="comma list (CUDA 32,64; CPU 8)")
    p.add_argument("--resolution", type=int, default=None, help="CUDA 224, CPU 112")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    modes = args.modes.split(",") if args.modes else (["fp32", "amp-bf16"] if cuda else ["fp32"])
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else ([32, 64] if cuda else [8]))
    rows, failures = run_e2e(device, modes, batches, args.resolution or (224 if cuda else 112),
                             args.warmup or (10 if cuda else 2), args.iters or (30 if cuda else 5))
    print(format_table(rows))
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
