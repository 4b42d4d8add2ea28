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

Run by ``python -m benchmarks.bench`` (``--e2e``); also alone: ``python -m benchmarks.e2e``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.configs import E2E_AMP_DTYPES, E2E_MODES, csv_choice
from benchmarks.harness import peak_cuda_bytes, saved_tensor_bytes
from benchmarks.timers import quartiles, sync
from sa_cuda.models import sa_resnet50

STEPS = ("train", "infer")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _autocast(device: torch.device, mode: str):
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=E2E_AMP_DTYPES[mode])


def time_iters(
    fn: Callable[[], object], device: torch.device, warmup: int, iters: int
) -> list[float]:
    """Seconds of each of ``iters`` calls of fn (after ``warmup`` calls), synchronized per call
    (a training step is long enough for the host clock)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _perturb_sa(model: nn.Module, seed: int) -> None:
    """Non-trivial SA parameters (SA-Net's init makes cweight = sweight = 0)."""
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


def _check(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    mode: str,
) -> dict:
    """Eval logits and train-mode loss of fused vs eager (copies: BN statistics stay untouched)."""
    out = {}
    with torch.no_grad(), _autocast(device, mode):
        e, f = (copy.deepcopy(models[k]).eval()(images).float() for k in ("eager", "fused"))
        scale = e.abs().max().item()
        out["logits_max_abs_diff"] = (e - f).abs().max().item()
        out["logits_max_abs"] = scale
        le, lf = (
            nn.functional.cross_entropy(
                copy.deepcopy(models[k]).train()(images).float(), labels
            ).item()
            for k in ("eager", "fused")
        )
        out["train_loss_eager"], out["train_loss_fused"] = le, lf
    rel = out["logits_max_abs_diff"] / max(scale, 1e-30)
    out["logits_rel_diff"] = rel
    tol = 1e-3 if mode == "fp32" else 0.1
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), (rel, le, lf)))
    out["tolerance"] = tol
    out["ok"] = bool(finite and rel <= tol and abs(le - lf) <= tol * max(1.0, abs(le)))
    return out


def step_fns(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, mode: str
) -> dict[str, Callable[[], None]]:
    """{"train": one SGD training step, "infer": one inference forward, "train_forward": the
    training step's forward and loss alone (what autograd saves memory for)}."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_forward() -> torch.Tensor:
        with _autocast(device, mode):
            return nn.functional.cross_entropy(model(images), labels)

    def train() -> None:
        loss = train_forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode(), _autocast(device, mode):
            model(images)

    return {"train": train, "infer": infer, "train_forward": train_forward}


def measure_step(
    row: dict, model: nn.Module, fns: dict, device: torch.device, warmup: int, iters: int
) -> None:
    """Times ``row["step"]`` of ``model`` and measures its memory, into ``row``."""
    step, batch = row["step"], row["batch"]
    model.train(step == "train")
    p25, med, p75 = quartiles(time_iters(fns[step], device, warmup, iters))
    row.update(
        status="ok",
        median_s=med,
        p25_s=p25,
        p75_s=p75,
        iqr_s=p75 - p25,
        n=iters,
        images_per_s=batch / med,
    )
    if device.type == "cuda":
        row["peak_bytes"] = peak_cuda_bytes(fns[step], device, warmup=False)
    if step == "train":
        row["saved_bytes"] = saved_tensor_bytes(fns["train_forward"])[0]


def run_config(
    device: torch.device,
    mode: str,
    batch: int,
    resolution: int,
    warmup: int,
    iters: int,
    log: Callable[[str], None],
    tick: Callable[[], None],
    failures: list[str],
    memory_format: str = "contiguous",
) -> list[dict]:
    """The rows of one (mode, batch, memory format): the check, then each model's train and
    infer steps. channels_last: the models' weights and the images in that format, as torchvision's
    and timm's training scripts set it (every activation is then channels_last)."""
    key = f"e2e/sa_resnet50/{mode}/b{batch}/{resolution}px/{memory_format}"
    fmt = MEMORY_FORMATS[memory_format]
    models = {k: m.to(memory_format=fmt) for k, m in make_models(device).items()}
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device)
    images = images.contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    try:
        check = _check(models, images, labels, device, mode)
    except Exception as exc:  # noqa: BLE001  (a crash of the fused model is a failure)
        check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if not check["ok"]:
        failures.append(f"{key}: fused vs eager check FAILED: {check}")
        log(f"FAILED {key}: {check}")
    rows = []
    for name, model in models.items():
        fns = step_fns(model, images, labels, device, mode)
        for step in STEPS:
            row = {
                "key": key,
                "model": "sa_resnet50",
                "impl": name,
                "step": step,
                "mode": mode,
                "batch": batch,
                "resolution": resolution,
                "memory_format": memory_format,
                "check": check,
            }
            rows.append(row)
            if name == "fused" and not check["ok"]:
                row["status"] = "FAILED"
            else:
                try:
                    measure_step(row, model, fns, device, warmup, iters)
                except Exception as exc:  # noqa: BLE001
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}")
                    failures.append(f"{key}/{name}/{step}: {row['error']}")
                    log(f"ERROR {key}/{name}/{step}: {row['error']}")
            tick()
    return rows


def run_e2e(
    device: torch.device,
    modes: list[str],
    batches: list[int],
    resolution: int,
    warmup: int,
    iters: int,
    log: Callable[[str], None] = print,
    tick: Callable[[], None] = lambda: None,
    memory_formats: tuple[str, ...] = ("contiguous",),
) -> tuple[list[dict], list[str]]:
    """Returns (rows, failures). One row per (mode, batch, memory format, model, step)."""
    rows: list[dict] = []
    failures: list[str] = []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for mode in modes:
        for batch in batches:
            for fmt in memory_formats:
                rows += run_config(
                    device, mode, batch, resolution, warmup, iters, log, tick, failures, fmt
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    # speedups of fused over eager
    ok = {(r["key"], r["impl"], r["step"]): r for r in rows if r.get("status") == "ok"}
    for (key, impl, step), row in ok.items():
        if impl == "fused" and (key, "eager", step) in ok:
            row["speedup_vs_eager"] = ok[(key, "eager", step)]["median_s"] / row["median_s"]
    return rows, failures


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<12} {'mode':<9} {'batch':>5} {'res':>4} {'format':<13} {'step':<6} {'impl':<6} "
        f"{'median ms':>10} {'IQR ms':>8} {'img/s':>8} {'x eager':>8} {'peak MiB':>9} "
        f"{'saved MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = (
            f"{r['model']:<12} {r['mode']:<9} {r['batch']:>5} {r['resolution']:>4} "
            f"{r.get('memory_format', 'contiguous'):<13} {r['step']:<6} {r['impl']:<6} "
        )
        if r.get("status") != "ok":
            lines.append(lead + r.get("status", "?").upper())
            continue
        peak = f"{r['peak_bytes'] / 2**20:9.1f}" if "peak_bytes" in r else f"{'-':>9}"
        saved = f"{r['saved_bytes'] / 2**20:9.1f}" if "saved_bytes" in r else f"{'-':>9}"
        sp = f"{r['speedup_vs_eager']:8.2f}" if "speedup_vs_eager" in r else f"{'':>8}"
        lines.append(
            lead + f"{r['median_s'] * 1e3:10.2f} {r['iqr_s'] * 1e3:8.2f} "
            f"{r['images_per_s']:8.1f} {sp} {peak} {saved}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default=None, help=f"comma list of {','.join(E2E_MODES)}")
    p.add_argument("--batches", default=None, help="comma list (CUDA 32,64; CPU 8)")
    p.add_argument("--resolution", type=int, default=None, help="CUDA 224, CPU 112")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--memory-formats",
        default="contiguous",
        help=f"comma list of {','.join(MEMORY_FORMATS)} (default contiguous)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    modes = csv_choice("--modes", args.modes, ["fp32", "amp-bf16"] if cuda else ["fp32"], E2E_MODES)
    batches = (
        [int(b) for b in args.batches.split(",")] if args.batches else ([32, 64] if cuda else [8])
    )
    rows, failures = run_e2e(
        device,
        modes,
        batches,
        args.resolution or (224 if cuda else 112),
        args.warmup or (10 if cuda else 2),
        args.iters or (30 if cuda else 5),
        memory_formats=tuple(
            csv_choice("--memory-formats", args.memory_formats, [], MEMORY_FORMATS)
        ),
    )
    print(format_table(rows))
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
