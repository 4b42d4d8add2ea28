"""The program profiled by ncu (gpu_check.sh's ncu step): the fused forward op, then the fused
backward op on the forward's statistics, per (layout, variant, shape, dtype): one call each, so every
profiled kernel belongs to one known pass. Writes the manifest (the items in launch order, with
their model bytes) that ncu_report.py needs to attribute kernels to passes.

--dry-run writes the manifest without running anything (no GPU needed: the CPU mode).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch
from common import DTYPES, VARIANTS, write_json

# the largest and the smallest plane of SA-ResNet-50 (stages 1 and 4), batch 8, G = 64
SHAPES = [(8, 256, 56, 56), (8, 2048, 7, 7)]
GROUPS = 64
LAYOUTS = ("nchw", "channels_last")  # channels_last: x and grad_out dense NHWC (the NHWC kernels)
PASS_BYTES = {"fwd": 2, "bwd": 3}  # model bytes = factor * n * e (read x [+ grad_out], write)


def items(dtypes: list[str], layouts: list[str]) -> list[dict]:
    out = []
    for layout, shape in itertools.product(layouts, SHAPES):
        for dname in dtypes:
            e = torch.empty((), dtype=DTYPES[dname]).element_size()
            for variant in VARIANTS:
                for pass_, factor in PASS_BYTES.items():  # fwd then bwd: ncu_report.py relies on it
                    out.append(
                        {
                            "variant": variant,
                            "layout": layout,
                            "shape": list(shape),
                            "groups": GROUPS,
                            "dtype": dname,
                            "pass": pass_,
                            "model_bytes": factor * math.prod(shape) * e,
                        }
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    if not set(layouts) <= set(LAYOUTS):
        p.error(f"--layouts: each of {LAYOUTS}, got {args.layouts!r}")
    todo = items(args.dtypes.split(","), layouts)
    write_json(args.manifest, {"items": todo})
    if args.dry_run:
        print(f"manifest with {len(todo)} items (dry run)")
        return 0
    ops = torch.ops.sa_cuda
    gen = torch.Generator(device="cuda").manual_seed(0)
    for fwd in todo[::2]:  # items come in (forward, backward) pairs of one config; both run here
        variant, shape, dtype = fwd["variant"], fwd["shape"], DTYPES[fwd["dtype"]]
        m = shape[1] // (2 * GROUPS)
        matrix = variant == "shuffle_attention"
        params = [
            torch.randn(
                (m, m) if matrix and i in (0, 2) else (m,),
                generator=gen,
                device="cuda",
                dtype=dtype,
            )
            * 0.5
            for i in range(6)
        ]
        memory_format = (
            torch.channels_last if fwd["layout"] == "channels_last" else torch.contiguous_format
        )
        x, grad_out = (
            torch.randn(shape, generator=gen, device="cuda", dtype=dtype).contiguous(
                memory_format=memory_format
            )
            for _ in range(2)
        )
        out, mean, rstd = getattr(ops, f"{variant}_forward")(x, GROUPS, *params, 1e-5)
        torch.cuda.synchronize()
        getattr(ops, f"{variant}_backward")(grad_out, x, mean, rstd, GROUPS, *params)
        torch.cuda.synchronize()
        print(f"ran {variant} {tuple(shape)} {fwd['layout']} {fwd['dtype']} fwd+bwd", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
