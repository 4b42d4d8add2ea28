"""The summary of a gpu_check.sh run: one row per step (status, rc, seconds, time box, verdict),
then the launch-path counts, the sanitizer verdicts, the test counts, the timing table and the ncu
headline figures. Reads what the steps left in OUTDIR; writes OUTDIR/summary.json and
OUTDIR/summary.txt and prints the text. Exit code 1 when a step that ran failed.

Standard library only (no torch import), so the summary costs nothing and works whatever broke.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ncu_report import format_table as format_ncu_table

SANITIZERS = ("memcheck", "racecheck", "synccheck", "initcheck")
PASSES = ("fwd", "bwd", "fwdbwd")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def read_steps(out: Path) -> list[dict]:
    """OUTDIR/steps.tsv, one line per step: name, status, rc, seconds, box, note."""
    steps = []
    for line in read_text(out / "steps.tsv").splitlines():
        name, status, rc, seconds, box, note = (line.split("\t") + [""] * 6)[:6]
        steps.append(
            {
                "name": name,
                "status": status,
                "rc": None if rc == "-" else int(rc),
                "seconds": int(seconds),
                "box": int(box),
                "note": note,
            }
        )
    return steps


def sanitizer_verdict(log: str) -> str | None:
    """compute-sanitizer's closing line: 'ERROR SUMMARY: 0 errors' (memcheck, synccheck,
    initcheck) or 'RACECHECK SUMMARY: ...' (racecheck)."""
    hits = re.findall(r"((?:ERROR|RACECHECK) SUMMARY: [^\n]*)", log)
    return hits[-1].strip() if hits else None


def pytest_verdict(log: str) -> str | None:
    """pytest's closing line, e.g. '3 failed, 250 passed, 8 skipped in 80.12s'."""
    hits = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+ in [\d.]+s(?: \([^)]*\))?)", log, re.MULTILINE)
    return hits[-1].strip() if hits else None


def kernel_family(name: str) -> str:
    """The family of a (mangled) kernel name: sa_layer/shuffle_attention forward/backward (NCHW),
    sa_layer_nhwc/shuffle_attention_nhwc (channels_last), nhwc_stats (their shared statistics),
    else other."""
    fam = re.search(r"(sa_layer|shuffle_attention)_(forward|backward)_kernel", name)
    if fam:
        return f"{fam.group(1)}_{fam.group(2)}"
    nhwc = re.search(r"(sa_layer|shuffle_attention)_nhwc_\w+?_kernel", name)
    if nhwc:
        return f"{nhwc.group(1)}_nhwc"
    return "nhwc_stats" if re.search(r"\dnhwc_(moments|stats)_kernel", name) else "other"


def resource_usage(log: str) -> dict:
    """cuobjdump -res-usage: per kernel family (kernel_family) the register range and the largest
    local memory (spills) and stack."""
    families: dict[str, dict] = {}
    for name, body in re.findall(r"Function ([^\s:]+):\s*\n\s*(REG:[^\n]*)", log):
        key = kernel_family(name)
        vals = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", body)}
        f = families.setdefault(
            key, {"kernels": 0, "reg_min": 10**9, "reg_max": 0, "local_max": 0, "stack_max": 0}
        )
        f["kernels"] += 1
        f["reg_min"] = min(f["reg_min"], vals.get("REG", 0))
        f["reg_max"] = max(f["reg_max"], vals.get("REG", 0))
        f["local_max"] = max(f["local_max"], vals.get("LOCAL", 0))
        f["stack_max"] = max(f["stack_max"], vals.get("STACK", 0))
    return families


def format_timing_table(rows: list[dict], impls: list[str]) -> str:
    """timing.py's rows: per (variant, shape, dtype, pass) each impl's ms and % of the copy's
    bandwidth, then the fused GB/s and the copy's."""
    cells = {(r["variant"], r["shape"], r["dtype"], r["pass"], r["impl"]): r for r in rows}
    head = (
        f"{'variant':<17} {'shape':<16} {'dtype':<5} {'pass':<6}"
        + "".join(f" | {impl + ' ms':>12} {'%copy':>5}" for impl in impls)
        + f" | {'fused GB/s':>10} {'copy GB/s':>9}"
    )
    lines = [head, "-" * len(head)]
    keys = sorted(
        {k[:4] for k in cells},
        key=lambda k: (k[0], int(k[1].split("-b")[-1]), k[1], k[2], PASSES.index(k[3])),
    )
    for k in keys:
        line = f"{k[0]:<17} {k[1]:<16} {k[2]:<5} {k[3]:<6}"
        for impl in impls:
            r = cells.get((*k, impl))
            if r is None or r["status"] != "ok":
                line += f" | {('-' if r is None else r['status'])[:18]:>18}"
            else:
                line += f" | {r['median_ms']:12.4f} {r['pct_of_copy']:4.0f}%"
        fused = cells.get((*k, "fused"))
        if fused is not None and fused["status"] == "ok":
            line += f" | {fused['gbps']:10.1f} {fused['copy_gbps']:9.1f}"
        lines.append(line)
    return "\n".join(lines)


def format_channels_last_table(nchw_rows: list[dict], cl_rows: list[dict]) -> str:
    """The channels_last step's fused rows against the timing step's (same run, same shapes):
    fused NCHW ms, fused channels_last ms, cl / NCHW, eager channels_last ms, its time over fused
    channels_last's, and fused channels_last's % of the copy."""
    ok = {
        (r["variant"], r["shape"], r["dtype"], r["pass"], r["impl"]): r
        for r in nchw_rows + cl_rows
        if r["status"] == "ok"
    }
    head = (
        f"{'variant':<17} {'shape':<13} {'dtype':<5} {'pass':<6} | {'NCHW ms':>8} {'cl ms':>8} "
        f"{'cl/NCHW':>7} | {'eager cl':>8} {'x eager':>7} | {'%copy':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in cl_rows:
        if r["impl"] != "fused" or r["status"] != "ok":
            continue
        key = (r["variant"], r["shape"].replace("-cl-b", "-b"), r["dtype"], r["pass"])
        nchw = ok.get((*key, "fused"))
        eager = ok.get((r["variant"], r["shape"], r["dtype"], r["pass"], "eager"))
        lines.append(
            f"{r['variant']:<17} {r['shape']:<13} {r['dtype']:<5} {r['pass']:<6} | "
            + (f"{nchw['median_ms']:8.4f} " if nchw else f"{'-':>8} ")
            + f"{r['median_ms']:8.4f} "
            + (f"{r['median_ms'] / nchw['median_ms']:7.2f}" if nchw else f"{'-':>7}")
            + " | "
            + (
                f"{eager['median_ms']:8.4f} {eager['median_ms'] / r['median_ms']:7.2f}"
                if eager
                else f"{'-':>8} {'-':>7}"
            )
            + f" | {r['pct_of_copy']:4.0f}%"
        )
    return "\n".join(lines)


def timing_verdict(timing: dict) -> tuple[str, dict]:
    """timing.py's JSON: the step's verdict and its counts."""
    rows = timing["rows"]
    ok = sum(r["status"] == "ok" for r in rows)
    bad_checks = sum(not c["ok"] for c in timing["checks"])
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    verdict = (
        f"{ok}/{len(rows)} timed, {skipped} skipped for time, fused checks "
        f"{len(timing['checks']) - bad_checks} ok / {bad_checks} FAILED"
    )
    counts = {"timed": ok, "rows": len(rows), "skipped": skipped, "fused_checks_failed": bad_checks}
    return verdict, counts


# The JSON each launch-path step writes into OUTDIR (launch_paths.py: plain, residual epilogue).
CHECK_FILES = {"check": "check.json", "residual_check": "check-residual.json"}

# The JSON each timing step writes into OUTDIR.
TIMING_FILES = {
    "timing": "timing.json",
    "channels_last": "timing-channels_last.json",
    "residual": "timing-residual.json",
}


def read_timings(out: Path) -> dict:
    """{step: its timing JSON, or None} for the steps of TIMING_FILES (read once: the verdicts
    count their rows, the tables print them)."""
    return {step: read_json(out / name) for step, name in TIMING_FILES.items()}


def verdicts(out: Path, steps: list[dict], timings: dict) -> tuple[dict, dict]:
    """(one-line verdict per step, details for summary.json); timings: read_timings(out)."""
    logs = out / "logs"
    v, details = {}, {}
    for step, name in CHECK_FILES.items():
        check = read_json(out / name)
        if check:
            v[step] = (
                f"{check['passed']} PASS, {check['failed']} FAIL ({check['backend']}, "
                f"set {check['set']})"
            )
            details[step] = {
                k: check[k] for k in ("backend", "set", "passed", "failed", "poisoned_allocator")
            }
            details[step]["failures"] = [c for c in check["cases"] if not c["ok"]][:50]
    for tool in SANITIZERS:
        line = sanitizer_verdict(read_text(logs / f"{tool}.log"))
        res = read_json(out / "sanitizers" / f"{tool}.json")
        counts = f"; {res['passed']} PASS, {res['failed']} FAIL" if res else ""
        v[tool] = (line or "no sanitizer summary line") + counts
        details[tool] = {
            "summary_line": line,
            **({"passed": res["passed"], "failed": res["failed"]} if res else {}),
        }
    tests = pytest_verdict(read_text(logs / "tests.log"))
    v["tests"] = tests or "no pytest summary line"
    details["tests"] = {"summary_line": tests}
    res = resource_usage(read_text(logs / "resources.log"))
    if res:
        v["resources"] = "; ".join(
            f"{k}: {f['kernels']} kernels, {f['reg_min']}-{f['reg_max']} regs, "
            f"local {f['local_max']} B"
            for k, f in sorted(res.items())
        )
        details["resources"] = res
    for step, timing in timings.items():
        if timing:
            v[step], details[step] = timing_verdict(timing)
    ncu = read_json(out / "ncu" / "ncu.json")
    if ncu:
        v["ncu"] = f"{len(ncu['kernels'])} kernels, attribution {ncu['attribution']}"
        details["ncu"] = {
            "kernels": len(ncu["kernels"]),
            "attribution": ncu["attribution"],
            "passes": ncu["passes"],
        }
    build_log = read_text(logs / "build.log")
    built = re.findall(r"^built: [^\n]*", build_log, re.MULTILINE)
    if built:
        v["build"] = built[-1]
    return v, details


def timing_section(heading: str, timing: dict | None) -> list[str]:
    """A timing step's table under its heading (nothing when the step timed nothing), with the
    implementations it timed."""
    if not (timing and timing["rows"]):
        return []
    impls = [
        i for i in ("eager", "compile", "fused") if any(r["impl"] == i for r in timing["rows"])
    ]
    return ["", heading, format_timing_table(timing["rows"], impls)]


def tables(details: dict, timings: dict) -> list[str]:
    """The summary's tables after the step rows: timing, channels_last, residual, ncu, launch-path
    failures; timings: read_timings(out)."""
    timing, tail = timings["timing"], timings["residual"]
    lines = timing_section(
        f"timing ({timing['timer']}; {timing['model_bytes']}; compile: "
        f"batches {timing['compile']['batches']}, backend {timing['compile']['backend']}):"
        if timing
        else "",
        timing,
    )
    cl = timings["channels_last"]
    if cl and cl["rows"]:
        lines += [
            "",
            "channels_last (the NHWC kernels; cl/NCHW = fused channels_last over fused NCHW of the "
            "timing step, x eager = eager channels_last over fused channels_last):",
            format_channels_last_table(timing["rows"] if timing else [], cl["rows"]),
        ]
    lines += timing_section(
        "residual (the bottleneck tail relu(SA(x) + identity): eager and compile = the layer, then "
        f"add and relu; fused = the residual epilogue; {tail['model_bytes'] if tail else ''}):",
        tail,
    )
    if details.get("ncu", {}).get("passes"):
        lines += [
            "",
            "ncu (DRAM/model = measured DRAM bytes / model bytes; sectors/request 16 = "
            "128-bit accesses of a full warp):",
            format_ncu_table(details["ncu"]["passes"]),
        ]
    failures = [c for step in CHECK_FILES for c in details.get(step, {}).get("failures", [])]
    if failures:
        lines += ["", "launch-path failures (first 10):"]
        lines += [
            f"  {c['variant']} {c.get('epilogue', 'plain')} {c['path']} {tuple(c['shape'])} "
            f"{c['dtype']} off={c['offset']}: "
            f"{c.get('error') or [k for k, o in c['outputs'].items() if not o['ok']]}"
            for c in failures[:10]
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--total", type=int, required=True, help="seconds the steps took")
    args = p.parse_args(argv)
    out = Path(args.outdir)
    steps = read_steps(out)
    timings = read_timings(out)
    v, details = verdicts(out, steps, timings)
    failed = [s["name"] for s in steps if s["status"] == "ran" and s["rc"] != 0]
    ran = [s for s in steps if s["status"] == "ran"]
    result = "FAIL" if failed or not ran else "PASS"

    lines = [
        f"=== sa_cuda GPU check summary: mode {args.mode}, {args.total} s of a {args.budget} s budget ===",
        f"{'step':<10} {'status':<8} {'rc':>4} {'seconds':>7} {'box':>5}  verdict / note",
    ]
    for s in steps:
        rc = "-" if s["rc"] is None else str(s["rc"])
        text = "; ".join(
            t for t in (s["note"], v.get(s["name"], "") if s["status"] == "ran" else "") if t
        )
        lines.append(
            f"{s['name']:<10} {s['status']:<8} {rc:>4} {s['seconds']:>7} {s['box']:>5}  {text}"
        )
    lines += tables(details, timings)
    skipped = [s["name"] for s in steps if s["status"] != "ran"]
    lines += [
        "",
        f"RESULT: {result} ({len(ran)} steps ran"
        + (f", failed: {', '.join(failed)}" if failed else "")
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + ")",
    ]
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "mode": args.mode,
                "budget_s": args.budget,
                "total_s": args.total,
                "result": result,
                "failed_steps": failed,
                "steps": [{**s, "verdict": v.get(s["name"])} for s in steps],
                **details,
            },
            indent=1,
        )
    )
    print(text)
    return 1 if result == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
