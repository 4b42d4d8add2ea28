"""Instructions the fused CPU kernels execute per element, counted by valgrind's callgrind: the
measure of a CPU kernel change that a shared machine's noise does not move (issue 15: no perf
counters here; "use instruction counts").

Runs itself under ``valgrind --tool=callgrind`` with collection switched on only inside the CPU
kernels' entry points (``sa_cuda::cpu::forward`` / ``backward``: the kernel and its threads' work,
not the op's Python, dispatch or allocation), one thread. Per (variant, shape, dtype) the raw
forward and backward ops (benchmarks.raw_ops) are called once untimed (the thread pool starts),
then once each with a callgrind dump after it (a client request, from a small C helper compiled
with the machine's C compiler against valgrind's callgrind.h): each dump holds one op's
instructions. Reported: instructions per element of x, forward and backward, and with
``--compare DIR`` the ratio to the same run of another checkout (e.g. ``git worktree add``, with
this file and raw_ops.py copied into it if it predates them, and its extension built).

    python -m benchmarks.instructions [--variants sa_layer] [--dtypes fp32,bf16] [--shapes ...]

Needs valgrind (callgrind) and its header. Under valgrind a program runs ~50x slower: ``--quick``
takes about 90 s (mostly the torch import), the default (both variants, fp32 and bf16, the four
SA-ResNet-50 stages at batch 8) about 11 minutes; ``--compare`` runs the two checkouts at once.
Writes ``instructions-<cpu>-<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.configs import DTYPES, SHAPES, VARIANTS, add_round_args, round_choices

KERNELS = {"fwd": "sa_cuda::cpu::forward*", "bwd": "sa_cuda::cpu::backward*"}
_HELPER = """
#include <valgrind/callgrind.h>
void sa_cuda_dump(const char* name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    add_round_args(p, min_run_time=0.0)
    p.add_argument("--inner", help=argparse.SUPPRESS)  # the run under valgrind: its helper .so
    p.add_argument("--compare", help="a checkout whose kernels to count in the same way")
    return p.parse_args(argv)


def inner(args) -> int:
    """Under valgrind: each config's ops, a dump named "<config>/<op>" after each."""
    import ctypes

    from benchmarks.raw_ops import RawOps

    dump = ctypes.CDLL(args.inner).sa_cuda_dump
    dump.argtypes = [ctypes.c_char_p]
    torch.set_num_threads(1)
    shapes, dtypes, variants = round_choices(args)
    with torch.no_grad():
        for variant in variants:
            for name in shapes:
                for dname in dtypes:
                    shape = SHAPES[name]
                    raw = RawOps.of_config(variant, shape, DTYPES[dname], args.seed)
                    raw.backward()  # (the forward ran in RawOps)
                    dump(b"warm-up")
                    for op, fn in (("fwd", raw.forward), ("bwd", raw.backward)):
                        fn()
                        dump(f"{variant}/{name}/{dname}/{op}/{shape.n}".encode())
    return 0


def start(root: Path, args, work: Path, helper: Path) -> tuple[subprocess.Popen, Path]:
    """Starts the valgrind run of the checkout at root (its dumps go to a folder of their own)."""
    out = Path(tempfile.mkdtemp(dir=work))
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no"]
    cmd += [f"--toggle-collect={f}" for f in KERNELS.values()]
    cmd += [f"--callgrind-out-file={out}/cg.out", sys.executable, "-m", "benchmarks.instructions"]
    cmd += ["--inner", str(helper), "--seed", str(args.seed)]
    for flag in ("variants", "dtypes", "shapes"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with open(out / "valgrind.log", "w") as log:  # a file, not a pipe: two runs at once
        run = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log)
    return run, out


def collect(run: subprocess.Popen, out: Path) -> dict:
    """{config: {"elements": n, op: instructions}} of a finished run."""
    if run.wait() != 0:
        log = (out / "valgrind.log").read_text(errors="replace")
        raise SystemExit(f"valgrind run failed:\n{log[-3000:]}")
    counts: dict = {}
    for path in out.glob("cg.out*"):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        totals = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
        if trigger is None or totals is None or trigger.group(1) == "warm-up":
            continue
        variant, shape, dname, op, n = trigger.group(1).split("/")
        row = counts.setdefault(f"{variant}/{shape}/{dname}", {"elements": int(n)})
        row[op] = int(totals.group(1))
    return counts


def format_rows(rows: list[dict], compare: bool) -> str:
    head = f"{'variant':<18} {'shape':<10} {'dtype':<5} {'fwd /elem':>10} {'bwd /elem':>10}"
    if compare:
        head += f" {'fwd vs cmp':>11} {'bwd vs cmp':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['variant']:<18} {r['shape']:<10} {r['dtype']:<5}"
        line += f" {r['fwd_per_element']:10.2f} {r['bwd_per_element']:10.2f}"
        if compare:
            line += "".join(
                f" {r[f'{op}_vs_compare']:11.3f}" if f"{op}_vs_compare" in r else f" {'-':>11}"
                for op in KERNELS
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inner:
        return inner(args)
    if shutil.which("valgrind") is None:
        raise SystemExit("benchmarks.instructions needs valgrind (callgrind) on PATH")
    root = Path(__file__).resolve().parent.parent
    if args.compare and not (Path(args.compare) / "benchmarks" / "instructions.py").exists():
        raise SystemExit(
            f"--compare: {args.compare} has no benchmarks/instructions.py (it runs its own copy): "
            "copy benchmarks/instructions.py and benchmarks/raw_ops.py into it"
        )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        helper = work / "dump.so"
        (work / "dump.c").write_text(_HELPER)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", helper, work / "dump.c"], check=True)
        # both runs at once (one thread each)
        runs = [start(root, args, work, helper)]
        if args.compare:
            runs.append(start(Path(args.compare).resolve(), args, work, helper))
        counts = collect(*runs[0])
        other = collect(*runs[1]) if args.compare else {}
    rows = []
    order = {name: i for i, name in enumerate([*VARIANTS, *SHAPES, *DTYPES])}
    for key, c in sorted(counts.items(), key=lambda kv: [order[k] for k in kv[0].split("/")]):
        variant, shape, dname = key.split("/")
        row = {"variant": variant, "shape": shape, "dtype": dname, **c}
        for op in KERNELS:
            row[f"{op}_per_element"] = c[op] / c["elements"]
            if key in other:
                row[f"{op}_vs_compare"] = c[op] / other[key][op]
        rows.append(row)
    print(format_rows(rows, bool(other)))
    label = f"cpu-{report.slug(report.cpu_model_name())}"
    path = report.output_stem("instructions", label, args).with_suffix(".json")
    result = {"device": label, "compare": args.compare, "threads": 1, "rows": rows}
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
