"""What every benchmark script shares besides the timers (benchmarks.timers): the modules and
inputs of a config, the correctness check that runs before anything is timed, the statement each
pass times, and the memory autograd saves.
"""

from __future__ import annotations

import copy
import gc
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.configs import VARIANTS, Shape
from benchmarks.timers import sync
from sa_cuda.testing import accuracy_bound


def make_modules(
    variant: str, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[nn.Module, nn.Module]:
    """(reference, fused) with identical, non-trivial parameters (SA-Net's init has
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


def make_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[Tensor, Tensor]:
    """(x requiring grad, grad_out)."""
    g = torch.Generator().manual_seed(seed + 2)
    size = (shape.B, shape.C, shape.H, shape.W)
    # a per-channel offset and scale, so that means and variances differ between planes
    x = torch.randn(size, generator=g) * (
        0.5 + torch.rand(1, shape.C, 1, 1, generator=g)
    ) + torch.randn(1, shape.C, 1, 1, generator=g)
    gy = torch.randn(size, generator=g)
    return (
        x.to(device=device, dtype=dtype).requires_grad_(True),
        gy.to(device=device, dtype=dtype),
    )


def forward_backward(mod: nn.Module, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    x = x.detach().requires_grad_(True)
    names, params = zip(*mod.named_parameters())
    out = mod(x)
    grads = torch.autograd.grad(out, [x, *params], gy)
    return {
        "out": out.detach(),
        "grad_x": grads[0],
        **{f"grad_{n}": g for n, g in zip(names, grads[1:])},
    }


def _max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_fused(ref: nn.Module, fused: nn.Module, x: Tensor, gy: Tensor) -> dict:
    """Fused output and all gradients vs a float64 reference with the same parameter values,
    each within accuracy_bound (given eager's error in the same dtype)."""
    return check_results(forward_backward(fused, x, gy), ref, x, gy)


def check_results(results: dict[str, Tensor], ref: nn.Module, x: Tensor, gy: Tensor) -> dict:
    """``results`` (some of forward_backward's tensors, by its keys, computed from x and gy) vs a
    float64 reference with ref's parameter values, each within accuracy_bound (given eager's
    error in the same dtype) and with eager's shape and dtype."""
    dtype = x.dtype
    ref64 = copy.deepcopy(ref).double()
    R = forward_backward(ref64, x.double(), gy.double())
    del ref64
    try:
        E = forward_backward(ref, x, gy)
        eager_error = None
    except RuntimeError as exc:  # eager kernel missing for this dtype on this device
        E, eager_error = None, str(exc).splitlines()[0]
    details, ok = {}, True
    for key, f in results.items():
        r = R[key]
        scale = r.abs().max().item()
        err = _max_err(f, r)
        finite = bool(torch.isfinite(f).all())
        err_eager = _max_err(E[key], r) if E is not None else None
        bound = accuracy_bound(dtype, scale, err_eager)
        want_dtype = (E[key] if E is not None else f).dtype  # eager's dtype for this tensor
        good = finite and err <= bound and f.shape == r.shape and f.dtype == want_dtype
        ok &= good
        details[key] = {
            "err": err,
            "bound": bound,
            "err_eager": err_eager,
            "max_abs_ref": scale,
            "ok": good,
        }
    del R, E
    return {"ok": ok, "tensors": details, "eager_error": eager_error}


# --------------------------------------------------------------------------------------------
# what is timed


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


def step_begin(impl: str) -> None:
    if impl == "compile-max-autotune":  # CUDA graphs: a new iteration may overwrite old outputs
        torch.compiler.cudagraph_mark_step_begin()


def pass_fn(
    impl: str, pass_: str, mod: Callable, x: Tensor, gy: Tensor, params: list[Tensor]
) -> Callable[[], object]:
    """The timed statement of ``pass_`` (README, "What is measured") as a zero-argument callable.
    ``bwd`` runs its one forward here, outside the timed region, and raises if ``mod``'s graph
    cannot be back-propagated with retain_graph."""
    inputs = [x, *params]
    if pass_ == "fwd":

        def fn():
            step_begin(impl)
            return mod(x)
    elif pass_ == "infer":

        def fn():
            step_begin(impl)
            with torch.no_grad():
                return mod(x)
    elif pass_ == "fwdbwd":

        def fn():
            step_begin(impl)
            out = mod(x)
            return torch.autograd.grad(out, inputs, gy)
    elif pass_ == "bwd":
        step_begin(impl)
        out = mod(x)
        torch.autograd.grad(out, inputs, gy, retain_graph=True)  # raises if unsupported

        def fn():
            return torch.autograd.grad(out, inputs, gy, retain_graph=True)
    else:
        raise ValueError(pass_)
    return fn


def time_rounds(bencher, cases: dict, rounds: int) -> dict:
    """{impl: {pass: ms}} of ``cases`` ({impl: (module, x, gy, passes)}): each pass_fn is run once
    untimed (torch.compile compiles there), then all are timed in ``rounds`` interleaved rounds
    (the machine's load drifts between rounds, not within one): each time is the median over the
    rounds of the timer's median."""
    fns = {}
    for impl, (mod, x, gy, passes) in cases.items():
        params = list(mod.parameters())
        for pass_ in passes:
            fns[(impl, pass_)] = pass_fn(impl, pass_, mod, x, gy, params)
            fns[(impl, pass_)]()
    samples = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            samples[key].append(bencher(fn).median_ms)
    times: dict = {}
    for (impl, pass_), ms in samples.items():
        times.setdefault(impl, {})[pass_] = statistics.median(ms)
    return times


# --------------------------------------------------------------------------------------------
# memory


def saved_tensor_bytes(fn: Callable[[], object], exclude: list[Tensor] = ()) -> tuple[int, int]:
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


def peak_cuda_bytes(fn: Callable[[], object], device: torch.device, warmup: bool = True) -> int:
    """Peak allocated bytes during one call of fn beyond what was allocated before it (after one
    warm-up call unless told otherwise, so that compilation and autotuning buffers are not
    counted)."""
    if warmup:
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
