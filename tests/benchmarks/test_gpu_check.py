"""The GPU check (benchmarks/gpu_check.sh) in its CPU mode, so that the one-command GPU visit cannot
rot between visits: argument handling, the launch-path check on the emulated CUDA kernels (and that
it really compares values: a corrupted output must FAIL), the timing code on a tiny CPU shape, the
ncu CSV parser on a hand-written fixture, the sanitizer/pytest/cuobjdump log parsers, the summary.
Builds nothing: runs against the package built in place and the cached emulation build."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
HELPERS = os.path.join(ROOT, "benchmarks", "gpu_check")
FIXTURE = os.path.join(HELPERS, "fixtures", "ncu_raw_page.csv")
sys.path.insert(0, HELPERS)

import ncu_report  # noqa: E402
import summary  # noqa: E402

STEPS = [
    "env",
    "build",
    "resources",
    "check",
    "tests",
    "timing",
    "channels_last",
    "residual",
    "residual_check",
    "memcheck",
    "racecheck",
    "ncu",
    "synccheck",
    "initcheck",
]


def run_script(*args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("SA_GPU_CHECK_CPU", None)
    return subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_cpu")
    result = run_script("--cpu", str(out))
    return result, out


def test_cpu_mode_passes_and_prints_the_summary_last(cpu_run):
    result, out = cpu_run
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    tail = result.stdout[result.stdout.index("=== sa_cuda GPU check summary") :]
    table = tail.split("\n\n")[0].splitlines()[2:]
    assert [line.split()[0] for line in table] == STEPS
    status = {line.split()[0]: line.split()[1] for line in table}
    assert {s for s, v in status.items() if v == "ran"} == {
        "env",
        "check",
        "timing",
        "channels_last",
        "residual",
        "residual_check",
        "ncu",
    }
    assert "cpu mode" in tail.split("\n\n")[0]
    assert "channels_last (the NHWC kernels" in tail and "tiny-l1-cl-b1" in tail
    assert "residual (the bottleneck tail" in tail and "tiny-l1-tail-b1" in tail
    assert tail.rstrip().splitlines()[-1].startswith("RESULT: PASS")
    assert (out / "summary.txt").read_text().strip() == tail.strip()


def test_cpu_mode_json_holds_the_results(cpu_run):
    _, out = cpu_run
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "cpu" and s["result"] == "PASS" and s["failed_steps"] == []
    assert [step["name"] for step in s["steps"]] == STEPS
    for step in s["steps"]:
        assert step["status"] in ("ran", "skipped")
        if step["status"] == "ran":
            assert step["rc"] == 0 and 0 <= step["seconds"] <= step["box"] + 20
    for step in ("check", "residual_check"):
        assert s[step]["backend"] == "emulated" and s[step]["failed"] == 0
        assert s[step]["passed"] >= 4
    assert s["ncu"]["attribution"] == "ok" and len(s["ncu"]["passes"]) == 8
    assert s["timing"]["fused_checks_failed"] == 0 and s["timing"]["timed"] >= 12
    cl = json.loads((out / "timing-channels_last.json").read_text())
    assert all(c["ok"] for c in cl["checks"]) and len(cl["checks"]) == 2
    timed = [r for r in cl["rows"] if r["status"] == "ok"]
    assert len(timed) == 12 and {r["impl"] for r in timed} == {"eager", "fused"}
    assert all(r["layout"] == "channels_last" and r["shape"].endswith("-cl-b1") for r in timed)
    tail = json.loads((out / "timing-residual.json").read_text())
    assert all(c["ok"] for c in tail["checks"]) and len(tail["checks"]) == 2
    timed = [r for r in tail["rows"] if r["status"] == "ok"]
    assert len(timed) == 12 and {r["impl"] for r in timed} == {"eager", "fused"}
    assert all(r["residual"] and r["shape"].endswith("-tail-b1") for r in timed)
    n = 256 * 4 * 4  # the tiny shape's elements (benchmarks.configs.TINY_STAGES, B = 1)
    bytes_per_pass = {"fwd": 3 * n * 4, "bwd": 5 * n * 4, "fwdbwd": 8 * n * 4}
    assert all(r["model_bytes"] == bytes_per_pass[r["pass"]] for r in timed)


@pytest.mark.parametrize("step_json", ["check.json", "check-residual.json"])
def test_cpu_mode_launch_path_check_compared_real_values(cpu_run, step_json):
    """check: plain cases, all 10 outputs against the float64 truth. residual_check: residual
    cases, the forward's 3 so, the backward's 8 equal to the plain backward of relu's masked
    gradient."""
    _, out = cpu_run
    check = json.loads((out / step_json).read_text())
    paths = {c["path"] for c in check["cases"]}
    assert any(p.startswith("warp") for p in paths) and any(p.startswith("group") for p in paths)
    assert {c["offset"] for c in check["cases"]} == {0, 1}
    assert {c["dtype"] for c in check["cases"]} == {"fp32", "bf16"}
    residual = step_json == "check-residual.json"
    assert {c["epilogue"] for c in check["cases"]} == {"residual" if residual else "plain"}
    for case in check["cases"]:
        names = ["out", "mean", "rstd", "grad_x"] + ["grad_identity"] * residual
        assert list(case["outputs"])[: len(names)] == names
        assert len(case["outputs"]) == 10 + residual
        for name, o in case["outputs"].items():
            assert o["ok"] and o["finite"] and o["bitwise_repeat"]
            if residual and name not in ("out", "mean", "rstd"):
                assert o["equal"] and "bound" not in o, name
                continue
            assert 0 <= o["err"] <= o["bound"] and o["max_abs_ref"] > 0
            if case["dtype"] == "bf16":  # eager bf16 misses the float64 result: a real yardstick
                assert o["err_eager"] > 0


def test_cpu_mode_timing_rows_and_plot(cpu_run):
    _, out = cpu_run
    timing = json.loads((out / "timing.json").read_text())
    assert all(c["ok"] for c in timing["checks"]) and len(timing["checks"]) == 2
    ok = [r for r in timing["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"eager", "fused"}
    assert {r["pass"] for r in ok} == {"fwd", "bwd", "fwdbwd"}
    for r in ok:
        assert r["median_ms"] > 0 and r["copy_gbps"] > 0
        assert r["gbps"] == pytest.approx(r["model_bytes"] / r["median_ms"] / 1e6)
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
    with open(out / "timing.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "epilogue,corrupt,cases",
    [
        ("plain", "grad_x", "warp N=63"),
        ("residual", "out", "warp N=63"),
        ("residual", "grad_identity", "warp N=63"),
        ("residual", "grad_x", "nhwc 32\\+8"),  # channels_last outputs
    ],
)
def test_launch_path_check_fails_on_a_corrupted_output(tmp_path, epilogue, corrupt, cases):
    import launch_paths

    report = tmp_path / "check.json"
    rc = launch_paths.main(
        [
            *("--backend", "emulated", "--set", "small", "--cases", cases),
            *("--dtypes", "fp32", "--offsets", "0", "--epilogues", epilogue),
            *("--corrupt", corrupt, "--json", str(report)),
        ]
    )
    assert rc == 1
    [case] = json.loads(report.read_text())["cases"]
    assert not case["ok"] and case["epilogue"] == epilogue and "error" not in case
    for name, o in case["outputs"].items():
        assert o["ok"] == (name != corrupt), name
        assert o["bitwise_repeat"] == (name != corrupt), name
    bad = case["outputs"][corrupt]
    assert bad["err"] > bad["bound"] if "bound" in bad else not bad["equal"]


def test_every_launch_path_has_residual_cases():
    """Both sets take the residual epilogue on every spec, variant, dtype and offset they take
    the plain one on."""
    import launch_specs

    for which in ("full", "small"):
        keys = {
            e: {
                (c.spec.path, c.variant, c.dtype, c.offsets)
                for c in launch_specs.cases(which, None, None, None, (e,))
            }
            for e in launch_specs.EPILOGUES
        }
        assert keys["plain"] and keys["plain"] == keys["residual"], which


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "OUTDIR is required"),
        (["--budget", "abc", "out"], "--budget must be an integer"),
        (["--budget", "10", "out"], "--budget must be an integer >= 60"),
        (["--steps", "check,bogus", "out"], "unknown step 'bogus'"),
        (["--frobnicate", "out"], "unknown option --frobnicate"),
        (["a", "b"], "one OUTDIR only"),
    ],
)
def test_bad_arguments_exit_2_with_usage(args, message):
    result = run_script(*args, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and "usage: bash benchmarks/gpu_check.sh" in result.stderr


def test_script_syntax_and_help():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    result = run_script("--help", timeout=30)
    assert result.returncode == 0 and ",".join(STEPS) in result.stdout


def test_ncu_parser_reads_the_raw_page_fixture():
    with open(FIXTURE) as f:
        kernels = ncu_report.parse_csv(f.read())
    assert [k["id"] for k in kernels] == list(range(9))
    k0 = kernels[0]
    assert k0["name"].startswith(
        "void sa_cuda::sa_gpu::sa_layer_forward_kernel<float, false, 4, 2>"
    )
    assert k0["block"] == "(512, 1, 1)" and k0["grid"] == "(2048, 1, 1)"
    m = k0["metrics"]
    assert m["gpu__time_duration.sum"] == pytest.approx(22_400)  # 22.40 usecond in ns
    assert m["dram__bytes_read.sum"] == 25_731_072  # thousands separators
    assert m["dram__bytes_write.sum"] == pytest.approx(25.69e6)  # Mbyte
    assert m["launch__grid_size"] == 2048
    assert set(m) == set(ncu_report.METRICS)


def test_ncu_parser_keeps_the_requested_metrics_only():
    # ncu 2025's raw page (the fifth H200 visit) adds about 280 device__attribute_* and launch__*
    # columns after the metrics asked for; the report keeps METRICS alone, with their values.
    with open(FIXTURE) as f:
        lines = f.read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    extra = {"device__attribute_clock_rate": "1980000", "launch__occupancy_limit_registers": "3"}
    lines[header] += "".join(f',"{name}"' for name in extra)
    lines[header + 1] += ',"",""'  # the units row
    for i in range(header + 2, len(lines)):
        lines[i] += "".join(f',"{value}"' for value in extra.values())
    widened = ncu_report.parse_csv("\n".join(lines))
    with open(FIXTURE) as f:
        plain = ncu_report.parse_csv(f.read())
    assert [k["metrics"] for k in widened] == [k["metrics"] for k in plain]
    assert all(set(k["metrics"]) == set(ncu_report.METRICS) for k in widened)


def _fixture_manifest():
    # what ncu_workload.py --dry-run --dtypes fp32 writes (8 calls: 2 shapes x 2 variants x fwd, bwd)
    items = []
    for shape in ([8, 256, 56, 56], [8, 2048, 7, 7]):
        n = shape[0] * shape[1] * shape[2] * shape[3]
        for variant in ("sa_layer", "shuffle_attention"):
            for pass_, factor in (("fwd", 2), ("bwd", 3)):
                items.append(
                    {
                        "variant": variant,
                        "shape": shape,
                        "groups": 64,
                        "dtype": "fp32",
                        "pass": pass_,
                        "model_bytes": factor * n * 4,
                    }
                )
    return items


def test_ncu_report_attributes_kernels_and_computes_headlines():
    with open(FIXTURE) as f:
        result = ncu_report.report(f.read(), _fixture_manifest())
    assert result["attribution"] == "ok"
    passes = result["passes"]
    assert [len(p["kernels"]) for p in passes] == [
        1,
        1,
        1,
        1,
        2,
        1,
        1,
        1,
    ]  # gate kernel joins its fwd
    first = passes[0]
    assert first["dram_bytes"] == pytest.approx(25_731_072 + 25.69e6)
    assert first["dram_over_model"] == pytest.approx((25_731_072 + 25.69e6) / 51_380_224)
    assert first["dram_gbps"] == pytest.approx((25_731_072 + 25.69e6) / 22_400)
    assert first["ld_sectors_per_request"] == 16 and first["registers"] == 40
    two = passes[4]
    assert two["duration_us"] == pytest.approx(4.10 + 1.20)
    assert two["registers"] == 38  # of the longest kernel of the pass
    table = ncu_report.format_table(passes)
    assert "shuffle_attention (8, 2048, 7, 7)" in table and "16.0" in table


def test_ncu_report_attributes_nhwc_kernels_by_their_parameters():
    # the NHWC kernels' own names lack the pass; their signatures (what ncu prints) carry it
    def kernel(i, name):
        return {"id": i, "name": name, "block": None, "grid": None, "metrics": {}}

    names = [
        "void nhwc_moments_kernel<float>(ForwardParams, ChunkMoments<float> *)",
        "void nhwc_stats_kernel<float, GateSink<float>>(ForwardParams, const ChunkMoments<float> *)",
        "void sa_layer_nhwc_gate_kernel<float>(ForwardParams, const PlaneGate<float> *)",
        "void sa_layer_nhwc_grad_sums_kernel<float>(BackwardParams, ChunkSums<float> *)",
        "void sa_layer_nhwc_grad_coeffs_kernel<float>(BackwardParams, const ChunkSums<float> *)",
        "void sa_layer_nhwc_input_grad_kernel<float>(BackwardParams, const InputGradCoeffs<float> *)",
        "void nhwc_moments_kernel<float>(ForwardParams, ChunkMoments<float> *)",
        "void shuffle_attention_nhwc_gate_kernel<float>(ForwardParams, NhwcWindows, const Std *)",
        "void shuffle_attention_nhwc_grad_sums_kernel<float>(BackwardParams, NhwcWindows, float *)",
        "void shuffle_attention_nhwc_input_grad_kernel<float>(BackwardParams, NhwcWindows)",
    ]
    manifest = [
        {"variant": v, "layout": "channels_last", "pass": p}
        for v in ("sa_layer", "shuffle_attention")
        for p in ("fwd", "bwd")
    ]
    groups = ncu_report.attribute([kernel(i, n) for i, n in enumerate(names)], manifest)
    assert [[k["id"] for k in g] for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    table = ncu_report.format_table(
        [
            ncu_report.headline(
                {**item, "shape": [8, 256, 56, 56], "dtype": "fp32", "model_bytes": 1}, g
            )
            for item, g in zip(manifest, groups)
        ]
    )
    assert "shuffle_attention (8, 256, 56, 56)   cl fp32  bwd" in table


def test_channels_last_table_divides_by_the_same_runs_nchw_rows():
    def row(shape, impl, ms, layout=None):
        r = {"variant": "sa_layer", "shape": shape, "dtype": "fp32", "pass": "fwd", "impl": impl}
        return {**r, "status": "ok", "median_ms": ms, "pct_of_copy": 40.0, "layout": layout}

    nchw = [row("r50-l1-b8", "fused", 0.02), row("r50-l1-b8", "eager", 9.0)]
    cl = [
        row("r50-l1-cl-b8", "eager", 0.15, "channels_last"),
        row("r50-l1-cl-b8", "fused", 0.05, "channels_last"),
        row("r50-l4-cl-b8", "fused", 0.01, "channels_last"),  # no NCHW row, no eager row
    ]
    lines = summary.format_channels_last_table(nchw, cl).splitlines()[2:]
    assert lines[0].split() == [
        "sa_layer", "r50-l1-cl-b8", "fp32", "fwd", "|", "0.0200", "0.0500", "2.50", "|",
        "0.1500", "3.00", "|", "40%",
    ]  # fmt: skip
    assert lines[1].split()[4:] == ["|", "-", "0.0100", "-", "|", "-", "-", "|", "40%"]
    assert len(lines) == 2


def test_ncu_report_refuses_an_attribution_that_does_not_line_up():
    with open(FIXTURE) as f:
        text = f.read()
    assert ncu_report.report(text, _fixture_manifest()[:6])["attribution"] == "failed"
    assert (
        ncu_report.report(text, _fixture_manifest() + _fixture_manifest()[:2])["attribution"]
        == "failed"
    )


def test_ncu_parser_reads_the_details_page_long_form():
    text = "\n".join(
        [
            "==PROF== Disconnected from process 1",
            '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"',
            '"0","1","python3.12","127.0.0.1","shuffle_attention_forward_kernel","1","7","(256, 1, 1)","(16, 1, 1)",'
            '"0","9.0","GPU Speed Of Light Throughput","Duration","usecond","1,234.50"',
            '"0","1","python3.12","127.0.0.1","shuffle_attention_forward_kernel","1","7","(256, 1, 1)","(16, 1, 1)",'
            '"0","9.0","Memory Workload Analysis","dram__bytes_read.sum","Kbyte","2.5"',
        ]
    )
    [k] = ncu_report.parse_csv(text)
    assert k["metrics"] == {"Duration": pytest.approx(1_234_500), "dram__bytes_read.sum": 2500}


def test_log_parsers_read_real_tool_output():
    memcheck = "========= COMPUTE-SANITIZER\nlaunch paths ...\n========= ERROR SUMMARY: 0 errors\n"
    racecheck = "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    assert summary.sanitizer_verdict(memcheck) == "ERROR SUMMARY: 0 errors"
    assert (
        summary.sanitizer_verdict(racecheck)
        == "RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)"
    )
    assert summary.sanitizer_verdict("Killed\n") is None
    pytest_log = (
        "SKIPPED [2] tests/test_x.py:10: no CUDA\n"
        "3 failed, 250 passed, 8 skipped in 80.12s (0:01:20)\n"
    )
    assert (
        summary.pytest_verdict(pytest_log) == "3 failed, 250 passed, 8 skipped in 80.12s (0:01:20)"
    )
    cuobjdump = (
        "Resource usage:\n Common:\n  GLOBAL:0\n"
        " Function _ZN7sa_cuda6sa_gpu23sa_layer_forward_kernelIfLb1ELi4ELi2EEEvNS_13ForwardParamsE:\n"
        "  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
        " Function _ZN7sa_cuda6sa_gpu23sa_layer_forward_kernelIdLb0ELi1ELi8EEEvNS_13ForwardParamsE:\n"
        "  REG:64 STACK:16 SHARED:0 LOCAL:24 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
        " Function _ZN7sa_cuda6sa_gpu33shuffle_attention_backward_kernelIfEEvNS_14BackwardParamsEl:\n"
        "  REG:72 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:700 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    usage = summary.resource_usage(cuobjdump)
    assert usage["sa_layer_forward"] == {
        "kernels": 2,
        "reg_min": 40,
        "reg_max": 64,
        "local_max": 24,
        "stack_max": 16,
    }
    assert usage["shuffle_attention_backward"]["reg_max"] == 72
    families = {
        "_ZN7sa_cuda3gpu34shuffle_attention_nhwc_gate_kernelIfEEvNS_13ForwardParamsE": (
            "shuffle_attention_nhwc"
        ),
        "_ZN7sa_cuda3gpu30sa_layer_nhwc_grad_sums_kernelIdEEvNS_14BackwardParamsE": "sa_layer_nhwc",
        "_ZN7sa_cuda3gpu17nhwc_stats_kernelIfNS0_8GateSinkIfEEEEvNS_13ForwardParamsE": "nhwc_stats",
        "_ZN7sa_cuda3gpu19nhwc_moments_kernelIdEEvNS_13ForwardParamsE": "nhwc_stats",
        "_ZN7sa_cuda3gpu24param_grad_reduce_kernelIfEEvNS_14BackwardParamsE": "other",
    }
    assert {name: summary.kernel_family(name) for name in families} == families


def test_steps_selects_and_the_rest_is_listed_as_not_selected(tmp_path):
    result = run_script("--cpu", "--steps", "ncu", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEPS
    for s in steps:
        if s["name"] == "ncu":
            assert (
                s["status"] == "ran"
                and s["rc"] == 0
                and s["verdict"] == "9 kernels, attribution ok"
            )
        else:
            assert s["status"] == "skipped" and s["note"] in (
                "not selected (--steps)",
                "cpu mode (needs a GPU)",
                "cpu mode (builds nothing; uses the package built in place)",
            )
