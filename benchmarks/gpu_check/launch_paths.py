"""Launch-path check: every kernel launch path x dtype x variant of csrc/cuda against the CPU op in
float64 (the forward's out, mean, rstd and all 7 outputs of the backward), plain and with the
residual epilogue.

Per case (variant, epilogue, shape, groups, dtype, storage offset):
- x and grad_out live in a flat buffer at a storage offset of 0, 1, 2 or 4 elements, so that every
  plane pointer is misaligned for some pack width (16-, 8-, 4-byte packs);
- before each run the CUDA caching allocator is pre-filled with NaN bytes (a big and some small
  blocks, written with 0xff, NaN in every float dtype, then freed), so that an output element the
  kernels never write, or a read of memory they never wrote, shows as NaN instead of stale values;
- the kernels run twice on the same inputs: every output must be bitwise identical;
- each output is compared with the CPU op in float64 on the same (rounded) values, within
  sa_cuda.testing.accuracy_bound: relative to the error eager PyTorch (sa_cuda.reference in
  the case's dtype) makes against that float64 result. mean/rstd (float32 statistics, float64 for
  float64 input) are held to the bound of their own dtype, eager's error being torch.var_mean's.
- residual epilogue (``relu(SA(x) + identity)``, identity at x's offset): the forward's outputs
  as above, against the CPU residual op in float64 and eager's ``relu(layer(x) + identity)``; the
  backward's 8 outputs bit for bit against what the same kernels give the plain backward of relu's
  masked gradient ``threshold_backward(grad_out, out, 0)`` (placed at grad_out's offset: a
  misaligned tensor takes one-element packs, whose sums run in another order), and grad_identity
  against that masked gradient. The plain cases check those kernels' accuracy; a float64 truth
  of the residual backward would need out's mask, which rounding flips where SA(x) + identity is
  within an ulp of 0.

The case list is data (launch_specs.py: SPECS): a spec names the launch path a shape is chosen
for. The paths are those of csrc/cuda/launch_common.cuh; add a spec when a path is added.

--set small is the workload of compute-sanitizer and of the CPU mode (few, small cases).
--epilogues plain,residual (the default) takes both; one of them, only its cases.
--backend emulated runs the same kernel source through the CPU SIMT emulator (tests/emulation.py).
--corrupt OUTPUT adds an error to that output of the kernels' result before it is checked: a test
hook showing that the check compares real values (every case that has the output must FAIL).

Prints one line per case and a final PASS/FAIL count; exit code 1 when any case fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import BACKENDS, DTYPES, backend_ops, caching_allocator_active, write_json
from conftest import PARAM_ARG_NAMES, PARAM_KEYS, forward_backward, make_ref
from launch_specs import EPILOGUES, Case, cases

from sa_cuda.testing import accuracy_bound, max_abs, max_err

EPS = 1e-5


def output_names(variant: str, residual: bool = False) -> list[str]:
    grads = ["grad_x", *(["grad_identity"] if residual else [])]
    return ["out", "mean", "rstd", *grads, *(f"grad_{n}" for n in PARAM_ARG_NAMES[variant])]


def run_forward(ops, variant: str, x, groups: int, params, identity=None) -> list:
    """The forward op's (out, mean, rstd); with identity, the residual forward op's."""
    if identity is None:
        return list(getattr(ops, f"{variant}_forward")(x, groups, *params, EPS))
    return list(getattr(ops, f"{variant}_residual_forward")(x, identity, groups, *params, EPS))


def run_op(ops, variant: str, x, grad_out, groups: int, params, identity=None) -> list:
    """The forward op, then the backward op on the forward's statistics: 10 tensors; with
    identity, the residual ops: 11 (grad_identity after grad_x)."""
    out, mean, rstd = run_forward(ops, variant, x, groups, params, identity)
    if identity is None:
        grads = getattr(ops, f"{variant}_backward")(grad_out, x, mean, rstd, groups, *params)
    else:
        backward = getattr(ops, f"{variant}_residual_backward")
        grads = backward(grad_out, out, x, mean, rstd, groups, *params)
    return [out, mean, rstd, *grads]


def masked_backward(ops, case: Case, offset: int, x, grad_out, params, run: list) -> list:
    """The residual backward's yardstick for ``run`` (run_op's residual outputs on x and grad_out):
    the plain backward op on relu's masked gradient, placed at grad_out's offset, with the run's
    statistics: (grad_x, the masked gradient, six parameter gradients)."""
    out, mean, rstd = run[:3]
    masked = torch.ops.aten.threshold_backward(grad_out, out, 0.0)
    masked_at = at_offset(masked, offset, masked.device, case.spec.channels_last)
    grads = getattr(ops, f"{case.variant}_backward")(
        masked_at, x, mean, rstd, case.spec.groups, *params
    )
    return [grads[0], masked, *grads[1:]]


def poison_allocator(device: torch.device) -> bool:
    """Leaves NaN bytes (0xff) in every block the CUDA caching allocator holds: the cache is
    emptied first (so no block keeps a previous run's valid-looking results), then a 64 MiB block
    (large pool) and 8 MiB of small blocks (the small pool serves requests <= 1 MiB) are filled
    and freed, and the next allocations are carved from them."""
    if not caching_allocator_active(device):
        return False
    torch.cuda.empty_cache()
    blocks = [torch.full((64 << 20,), 255, dtype=torch.uint8, device=device)]
    blocks += [torch.full((512 << 10,), 255, dtype=torch.uint8, device=device) for _ in range(16)]
    del blocks
    return True


def at_offset(
    values: torch.Tensor, offset: int, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """values copied into a fresh flat buffer on device, starting `offset` elements in, dense
    NCHW or dense channels_last."""
    flat = torch.empty(values.numel() + offset, dtype=values.dtype, device=device)
    B, C, H, W = values.shape
    strides = (H * W * C, 1, W * C, C) if channels_last else values.contiguous().stride()
    view = flat[offset:].as_strided(values.shape, strides)
    view.copy_(values)
    return view


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def references(case: Case, seed: int) -> dict:
    """Inputs (rounded to the case's dtype, on the CPU: x, grad_out, params and, for a residual
    case, identity) and the two yardsticks of every output that has them (``truth``: the CPU op in
    float64; ``eager``: eager PyTorch in the case's dtype): all 10 of a plain case, the forward's
    3 of a residual one (its backward is checked against masked_backward)."""
    spec, variant, dtype = case.spec, case.variant, DTYPES[case.dtype]
    ref = make_ref(variant, spec.shape[1], spec.groups, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    # per-channel offsets and scales, so planes have different means and variances
    C = spec.shape[1]
    x = (
        torch.randn(spec.shape, generator=gen, dtype=torch.float64)
        * (0.5 + torch.rand(1, C, 1, 1, generator=gen, dtype=torch.float64))
        + torch.randn(1, C, 1, 1, generator=gen, dtype=torch.float64)
    ).to(dtype)
    grad_out = torch.randn(spec.shape, generator=gen, dtype=torch.float64).to(dtype)
    identity = None
    if case.residual:  # drawn last: x and grad_out are the plain case's
        identity = torch.randn(spec.shape, generator=gen, dtype=torch.float64).to(dtype)
    named = dict(ref.named_parameters())
    params = [named[k].detach() for k in PARAM_KEYS[variant]]

    x64, params64 = x.double(), [p.double() for p in params]
    if identity is not None:
        truth = run_forward(
            torch.ops.sa_cuda, variant, x64, spec.groups, params64, identity.double()
        )
    else:
        truth = run_op(torch.ops.sa_cuda, variant, x64, grad_out.double(), spec.groups, params64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(acc), dim=(2, 3), unbiased=False)
    stats = [mean, (var + EPS).rsqrt()]
    if identity is not None:
        with torch.no_grad():
            eager_out = torch.relu(ref(x) + identity)
        return {
            "x": x,
            "grad_out": grad_out,
            "identity": identity,
            "params": params,
            "truth": truth,
            "eager": [eager_out, *stats],
            "want_dtypes": [dtype, acc, acc],
        }
    eager = forward_backward(ref, x, grad_out)
    return {
        "x": x,
        "grad_out": grad_out,
        "identity": None,
        "params": params,
        "truth": truth,
        "eager": [eager["out"], *stats, eager["x"], *(eager[k] for k in PARAM_KEYS[variant])],
        "want_dtypes": [dtype, acc, acc, dtype, *([dtype] * 6)],
    }


def compare(names, got, again, truth, eager, want_dtypes) -> dict:
    result = {}
    for name, g, g2, r, e, want in zip(names, got, again, truth, eager, want_dtypes):
        g_cpu = g.detach().cpu()
        scale = max_abs(r)
        err_eager = max_err(e.reshape(r.shape), r)
        bound = accuracy_bound(want, scale, err_eager)
        finite = bool(torch.isfinite(g_cpu).all())
        err = max_err(g_cpu, r) if g_cpu.shape == r.shape else float("inf")
        checks = {
            "finite": finite,
            "dtype": g.dtype == want,
            "shape": g.shape == r.shape,
            "accuracy": finite and err <= bound,
            "bitwise_repeat": bit_identical(g, g2),
        }
        result[name] = {
            "err": err,
            "bound": bound,
            "err_eager": err_eager,
            "max_abs_ref": scale,
            **checks,
            "ok": all(checks.values()),
        }
    return result


def compare_exact(names, got, again, want) -> dict:
    """Outputs that must equal ``want`` (torch.equal: the same values, 0.0 equal to -0.0)."""
    result = {}
    for name, g, g2, w in zip(names, got, again, want):
        shape = g.shape == w.shape
        checks = {
            "finite": bool(torch.isfinite(g).all()),
            "dtype": g.dtype == w.dtype,
            "shape": shape,
            "equal": shape and g.dtype == w.dtype and torch.equal(g, w),
            "bitwise_repeat": bit_identical(g, g2),
        }
        result[name] = {**checks, "ok": all(checks.values())}
    return result


def describe_failure(outputs: dict) -> str:
    parts = []
    for name, o in outputs.items():
        if o["ok"]:
            continue
        why = [
            k for k in ("finite", "dtype", "shape", "equal", "bitwise_repeat") if not o.get(k, 1)
        ]
        if not o.get("accuracy", True) and o["finite"]:
            why.append(f"err {o['err']:.3g} > bound {o['bound']:.3g} (eager {o['err_eager']:.3g})")
        parts.append(f"{name}: {', '.join('not ' + w if ' ' not in w else w for w in why)}")
    return "; ".join(parts)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="cuda")
    p.add_argument("--set", dest="which", choices=("full", "small"), default="full")
    p.add_argument("--dtypes", help="comma list of " + ",".join(DTYPES) + " (default: the set's)")
    p.add_argument(
        "--offsets", help="comma list of storage offsets in elements (default: the set's)"
    )
    p.add_argument(
        "--cases", help="regular expression on the case label (variant, epilogue, path, shape)"
    )
    p.add_argument(
        "--epilogues",
        default=",".join(EPILOGUES),
        help="comma list of " + ",".join(EPILOGUES) + " (default: both)",
    )
    p.add_argument(
        "--corrupt",
        choices=output_names("sa_layer", True) + output_names("shuffle_attention", True),
        help="test hook: perturb this output of the kernels' result before the check",
    )
    p.add_argument("--json", help="write the per-case results here")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--seed", type=int, default=0)
    return p, p.parse_args(argv)


def run_twice(ops, device, case: Case, offset: int, prepared: dict) -> tuple[list, list, list]:
    """The case's ops run twice at ``offset`` on a poisoned allocator: (first run, second run,
    the residual backward's masked_backward yardstick for the second run, or [])."""
    params = [t.to(device) for t in prepared["params"]]
    layout = (offset, device, case.spec.channels_last)
    runs = []
    for _ in range(2):
        poison_allocator(device)
        x, grad_out = (at_offset(prepared[k], *layout) for k in ("x", "grad_out"))
        identity = (
            None if prepared["identity"] is None else at_offset(prepared["identity"], *layout)
        )
        runs.append(run_op(ops, case.variant, x, grad_out, case.spec.groups, params, identity))
    exact = (
        masked_backward(ops, case, offset, x, grad_out, params, runs[1]) if case.residual else []
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return runs[0], runs[1], exact


def check_offset(ops, device, case, offset, prepared, corrupt) -> tuple[dict, str, str]:
    """One case at one storage offset: two poisoned runs, compared with the references.
    ``prepared``: references()'s result, or the error string of a failed reference.
    Returns (row, detail of a failure, summary)."""
    row = {
        "path": case.spec.path,
        "variant": case.variant,
        "epilogue": case.epilogue,
        "shape": case.spec.shape,
        "groups": case.spec.groups,
        "dtype": case.dtype,
        "offset": offset,
    }
    names = output_names(case.variant, case.residual)
    try:
        if isinstance(prepared, str):
            raise RuntimeError(prepared)
        got, again, exact = run_twice(ops, device, case, offset, prepared)
        if corrupt in names:
            bad = got[names.index(corrupt)]
            bad[(0,) * bad.dim()] += 1.0 + bad.detach().abs().max()  # any layout
        n = len(prepared["truth"])  # the outputs held to the float64 truth; the rest to `exact`
        yardsticks = (prepared["truth"], prepared["eager"], prepared["want_dtypes"])
        row["outputs"] = compare(names[:n], got[:n], again[:n], *yardsticks)
        row["outputs"].update(compare_exact(names[n:], got[n:], again[n:], exact))
        row["ok"] = all(o["ok"] for o in row["outputs"].values())
        worst = max(
            o["err"] / o["bound"] if o["bound"] > 0 else 0.0
            for o in row["outputs"].values()
            if "bound" in o
        )
        return row, describe_failure(row["outputs"]), f"max err/bound {worst:.2g}"
    except Exception as exc:  # noqa: BLE001  (a crash is a failure; go on with the rest)
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return row, row["error"], ""


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    dtypes = args.dtypes.split(",") if args.dtypes else None
    if dtypes and not set(dtypes) <= set(DTYPES):
        p.error(f"unknown dtype in {dtypes}; choose from {list(DTYPES)}")
    offsets = [int(o) for o in args.offsets.split(",")] if args.offsets else None
    epilogues = tuple(args.epilogues.split(","))
    if not set(epilogues) <= set(EPILOGUES):
        p.error(f"unknown epilogue in {list(epilogues)}; choose from {list(EPILOGUES)}")
    todo = cases(args.which, dtypes, offsets, args.cases, epilogues)
    if not todo:
        p.error("no case matches")
    if args.list:
        for case in todo:
            print(f"{case.label} {case.dtype:<4} offsets {case.offsets}")
        return 0

    ops, device = backend_ops(args.backend)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    results, passed, failed = [], 0, 0
    report = {
        "backend": args.backend,
        "device": str(device),
        "set": args.which,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "poisoned_allocator": caching_allocator_active(device),
        "corrupt": args.corrupt,
        "cases": results,
    }
    for index, case in enumerate(todo):
        try:
            prepared = references(case, args.seed + index)
        except Exception as exc:  # noqa: BLE001  (the yardstick itself failed: report, go on)
            prepared = f"reference: {type(exc).__name__}: {exc}"
        for offset in case.offsets:
            row, detail, summary = check_offset(ops, device, case, offset, prepared, args.corrupt)
            results.append(row)
            passed += row["ok"]
            failed += not row["ok"]
            print(
                f"{'PASS' if row['ok'] else 'FAIL'} {case.label} {case.dtype:<4} off={offset} "
                f"{summary}{'  ' + detail if detail else ''}",
                flush=True,
            )
        report.update(passed=passed, failed=failed, seconds=round(time.perf_counter() - t0, 1))
        write_json(args.json, report)
    print(
        f"launch paths ({args.backend}, set {args.which}): {passed} PASS, {failed} FAIL "
        f"({report['seconds']} s; allocator poisoned with NaN: "
        f"{'yes' if report['poisoned_allocator'] else 'no'})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
