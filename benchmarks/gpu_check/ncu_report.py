"""Parses Nsight Compute's CSV export into per-pass headline figures (gpu_check.sh's ncu step).

Input: ``ncu --import REPORT --csv --page raw [--print-units base]``: a header row of column and
metric names ("ID", "Process ID", ..., "Kernel Name", ..., then one column per metric), a row of
units (empty for the non-metric columns), then one row per profiled kernel; lines before the
header (==PROF== messages) are skipped. The long form of ``--page details`` (one row per metric
with "Metric Name", "Metric Unit", "Metric Value") is read too. Numbers may carry thousands
separators; byte, time and rate units with SI prefixes are normalised (bytes, ns, bytes/s).

Attribution: ncu_workload.py writes a manifest of its op calls in launch order, alternating the
forward and the backward of each (layout, variant, shape, dtype). Profiled kernels are walked in ID
order: a kernel whose name says "forward" or "backward" belongs to the next call of that pass, or to
the current one if that already is of that pass; a kernel naming neither belongs to the current
call. ncu's names are the demangled signatures, and every kernel of a pass takes that pass's
parameters, so the word is there even where the kernel's own name lacks it:
``void nhwc_moments_kernel<float>(ForwardParams, ...)``, ``void
sa_layer_nhwc_grad_sums_kernel<float>(BackwardParams, ...)``.
If the walk does not end on the manifest's last call with a kernel for every call, the
attribution is reported as failed and only the per-kernel rows are given.

--print-metrics prints the metric list for ``ncu --metrics``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

METRICS = [
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "launch__registers_per_thread",
    "launch__block_size",
    "launch__grid_size",
    "launch__shared_mem_per_block_dynamic",
    "sm__warps_active.avg.pct_of_peak_sustained_active",  # achieved occupancy
    "sm__maximum_warps_per_active_cycle_pct",  # theoretical occupancy
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
]

_PREFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TIME = {
    "nsecond": 1.0,
    "usecond": 1e3,
    "msecond": 1e6,
    "second": 1e9,
    "ns": 1.0,
    "us": 1e3,
    "ms": 1e6,
    "s": 1e9,
}


def to_number(text: str, unit: str = "") -> float | None:
    """A CSV cell as a number in base units (bytes, ns, bytes/s, else as given); None if n/a."""
    text = text.strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    unit = unit.strip()
    if unit in _TIME:
        return value * _TIME[unit]
    m = re.fullmatch(r"([KMGT]?)(byte|B)(/second|/s)?", unit)
    if m:
        return value * _PREFIX[m.group(1)]
    return value


def parse_csv(text: str) -> list[dict]:
    """Kernels in ID order: {"id", "name", "block", "grid", "metrics": {name: number}}."""
    rows = list(csv.reader(line for line in text.splitlines() if line.strip()))
    start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
    if start is None:
        raise ValueError("no header row (first column 'ID') in the ncu CSV")
    header, body = rows[start], rows[start + 1 :]
    col = {name: i for i, name in enumerate(header)}
    name_col = next(
        (col[c] for c in ("Kernel Name", "Function Name", "Demangled Name") if c in col), None
    )
    if name_col is None:
        raise ValueError("no kernel name column in the ncu CSV")
    kernels: dict[int, dict] = {}

    def kernel(row: list[str]) -> dict:
        kid = int(row[col["ID"]])
        return kernels.setdefault(
            kid,
            {
                "id": kid,
                "name": row[name_col],
                "block": row[col["Block Size"]] if "Block Size" in col else None,
                "grid": row[col["Grid Size"]] if "Grid Size" in col else None,
                "metrics": {},
            },
        )

    if "Metric Name" in col:  # --page details: one row per metric
        for row in body:
            if len(row) == len(header):
                kernel(row)["metrics"][row[col["Metric Name"]]] = to_number(
                    row[col["Metric Value"]], row[col["Metric Unit"]]
                )
    else:  # --page raw: one row per kernel, a units row first
        units = [""] * len(header)
        if body and body[0] and body[0][0] == "":
            units, body = body[0], body[1:]
        first_metric = (
            max(
                col.get(c, -1)
                for c in (
                    "Kernel Name",
                    "Function Name",
                    "Demangled Name",
                    "Block Size",
                    "Grid Size",
                    "CC",
                    "Device",
                    "Stream",
                    "Context",
                )
            )
            + 1
        )
        # The metrics asked for (--print-metrics), not every column: ncu 2025's raw page also
        # lists about 280 device__attribute_* and launch__* values per kernel (the fifth visit's
        # JSON went from 0.1 to 1.1 MB with them).
        wanted = [i for i in range(first_metric, len(header)) if header[i] in METRICS]
        for row in body:
            if len(row) != len(header):
                continue
            k = kernel(row)
            for i in wanted:
                k["metrics"][header[i]] = to_number(row[i], units[i])
    return [kernels[k] for k in sorted(kernels)]


def attribute(kernels: list[dict], manifest: list[dict]) -> list[list[dict]] | None:
    """The kernels of each manifest call (module docstring), or None if they do not line up."""
    if not manifest:
        return None
    groups: list[list[dict]] = [[] for _ in manifest]
    current = 0
    for k in kernels:
        name = k["name"].lower()
        word = "fwd" if "forward" in name else "bwd" if "backward" in name else None
        if word is not None and manifest[current]["pass"] != word:
            current += 1
            while current < len(manifest) and manifest[current]["pass"] != word:
                current += 1
            if current >= len(manifest):
                return None
        groups[current].append(k)
    if current != len(manifest) - 1 or not all(groups):
        return None
    return groups


def _sum(kernels: list[dict], metric: str) -> float | None:
    values = [k["metrics"].get(metric) for k in kernels]
    return None if any(v is None for v in values) else sum(values)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline(item: dict, kernels: list[dict]) -> dict:
    """One pass: its kernels' DRAM bytes against the model bytes, bandwidth, launch figures."""
    ns = _sum(kernels, "gpu__time_duration.sum")
    read, write = _sum(kernels, "dram__bytes_read.sum"), _sum(kernels, "dram__bytes_write.sum")
    dram = read + write if read is not None and write is not None else None
    main = max(kernels, key=lambda k: k["metrics"].get("gpu__time_duration.sum") or 0.0)
    m = main["metrics"]
    return {
        **item,
        "kernels": [k["name"] for k in kernels],
        "duration_us": ns / 1e3 if ns is not None else None,
        "dram_bytes": dram,
        "dram_over_model": _ratio(dram, item["model_bytes"]),
        "dram_gbps": _ratio(dram, ns),  # bytes per ns = GB/s
        "model_gbps": _ratio(item["model_bytes"], ns),
        "dram_pct_of_peak": m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
        "registers": m.get("launch__registers_per_thread"),
        "block": main["block"],
        "grid": main["grid"],
        "dynamic_smem_bytes": m.get("launch__shared_mem_per_block_dynamic"),
        "achieved_occupancy_pct": m.get("sm__warps_active.avg.pct_of_peak_sustained_active"),
        "theoretical_occupancy_pct": m.get("sm__maximum_warps_per_active_cycle_pct"),
        "ld_sectors_per_request": _ratio(
            _sum(kernels, "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"),
            _sum(kernels, "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"),
        ),
        "st_sectors_per_request": _ratio(
            _sum(kernels, "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum"),
            _sum(kernels, "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum"),
        ),
        "smem_bank_conflicts": _sum(kernels, "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"),
    }


def report(csv_text: str, manifest: list[dict]) -> dict:
    kernels = parse_csv(csv_text)
    groups = attribute(kernels, manifest)
    passes = [headline(item, ks) for item, ks in zip(manifest, groups)] if groups else []
    return {"kernels": kernels, "attribution": "ok" if groups else "failed", "passes": passes}


def format_table(passes: list[dict]) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "n/a"

    head = (
        f"{'variant':<17} {'shape':<18} {'cl':<2} {'dtype':<5} {'pass':<4} {'us':>8} {'DRAM/model':>10} "
        f"{'DRAM GB/s':>9} {'%peak':>5} {'regs':>4} {'occ%':>5} {'ld sec/req':>10} {'st sec/req':>10}"
    )
    lines = [head, "-" * len(head)]
    for p in passes:
        lines.append(
            f"{p['variant']:<17} {str(tuple(p['shape'])):<18} "
            f"{'cl' if p.get('layout') == 'channels_last' else '':<2} {p['dtype']:<5} {p['pass']:<4} "
            f"{f(p['duration_us'], '8.1f')} {f(p['dram_over_model'], '10.2f')} "
            f"{f(p['dram_gbps'], '9.0f')} {f(p['dram_pct_of_peak'], '5.0f')} "
            f"{f(p['registers'], '4.0f')} {f(p['achieved_occupancy_pct'], '5.0f')} "
            f"{f(p['ld_sectors_per_request'], '10.1f')} {f(p['st_sectors_per_request'], '10.1f')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="?")
    p.add_argument("--manifest")
    p.add_argument("--json")
    p.add_argument("--print-metrics", action="store_true")
    args = p.parse_args(argv)
    if args.print_metrics:
        print(",".join(METRICS))
        return 0
    if not args.csv or not args.manifest:
        p.error("CSV and --manifest are required")
    manifest = json.loads(Path(args.manifest).read_text())["items"]
    result = report(Path(args.csv).read_text(), manifest)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"ncu: {len(result['kernels'])} kernels profiled, attribution {result['attribution']}")
    if result["passes"]:
        print(
            "(model bytes: fwd 2*n*e, bwd 3*n*e; DRAM/model = measured DRAM bytes / model bytes; "
            "sectors/request 16 = 128-bit accesses of a full warp)"
        )
        print(format_table(result["passes"]))
    else:
        for k in result["kernels"]:
            print(f"  {k['id']:>3} {k['name'][:90]}")
    return 0 if result["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
