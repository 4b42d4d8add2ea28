"""SA-Net at the price of ResNet? torchvision's ResNet-50 against SA-ResNet-50 with the reference
(eager) and with the fused SA layers (whose bottleneck tails run as the residual epilogue),
interleaved in one run, fp32, contiguous.

Per batch size: the fused SA-ResNet-50 is checked against the eager one with the same weights
first (e2e's check: eval logits and train-mode loss). Then ``--rounds`` rounds; in each, every
model, in an order rotated from round to round, runs ``--steps`` training steps (forward,
cross-entropy, backward, SGD with momentum) and ``--steps`` inference forwards
(``inference_mode``), each timed after one untimed call. Reported per model and step: the median
step time over all rounds, and the overhead over ResNet-50, the median over the rounds of
``SA-ResNet's round median / ResNet-50's round median - 1`` (with its quartiles): each round's two
numbers come from the same minutes of a shared machine's load.

On the CPU the bottleneck tails are timed in the same steps (benchmarks/tails.py: hooks that
read the clock, microseconds a block in every model alike): per model, step, stage and pass the median
ms a step, and the tails' price, the median over rounds of ``(SA-ResNet's tails - ResNet-50's
tails) / ResNet-50's step`` (with its quartiles). The tails are the one part in which the three
models differ, so their price is SA's cost over ResNet without the rest of the step's noise.
Page faults are counted per step (``ru_minflt``); glibc's malloc neither mmaps nor trims during
the run (``--glibc-defaults`` keeps glibc's settings), so that no model pays faults for the order
of its allocations.

Then torch.profiler (CPU) over ``--profile-steps`` more steps of each model and step, and the
share of the profiled self time by kind of the outermost op around it: ``sa`` (the sa_cuda ops
and their autograd.Function: the fused layers with their tails), ``conv``, ``batch_norm``,
``add/relu`` (aten add and relu, relu's backward), ``optimizer`` (SGD's step and zero_grad) and
``other`` (the eager model's SA layers are there: their small ops are pooling, group norm,
sigmoid, mul, cat, ...).

    python -m benchmarks.overhead [--batches 8,32] [--resolution 224] [--rounds 5] [--quick]
                                  [--glibc-defaults]

Writes ``overhead-<device>-<tag>.json`` and a PNG of the overheads and the tails' prices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import e2e, report
from benchmarks.configs import RESULTS_DIR
from benchmarks.tails import TailTimer, summarize
from benchmarks.timers import M_MMAP_MAX, M_TRIM_THRESHOLD, mallopt, quartiles, sync

MODELS = ("resnet50", "sa_eager", "sa_fused")
LABELS = {
    "resnet50": "ResNet-50 (torchvision)",
    "sa_eager": "SA-ResNet-50 eager",
    "sa_fused": "SA-ResNet-50 fused",
}
STEPS = ("train", "infer")
# Every block from the heap, and the heap never trimmed: after its first steps a model reuses its
# memory, as a caching allocator would, and no step pays page faults for glibc's choices (left
# alone, glibc gave torchvision's ResNet-50 about 107,000 faults a batch-8 training step here and
# the fused SA-ResNet-50 about 17,000, by the order of their allocations alone).
_MALLOC = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
OP_KINDS = ("sa", "conv", "batch_norm", "add/relu", "optimizer", "other")
# The ops of the residual add and relu (forward and backward), by name.
_ADD_RELU = {"aten::add", "aten::add_", "aten::relu", "aten::relu_", "aten::threshold_backward"}
_ADD_RELU |= {"ReluBackward0", "ThresholdBackward0", "ThresholdBackward1"}


def make_models(device: torch.device) -> dict[str, nn.Module]:
    """torchvision's ResNet-50 and e2e's SA-ResNet-50 pair (same weights, SA gates perturbed)."""
    import torchvision

    torch.manual_seed(0)
    models = {"resnet50": torchvision.models.resnet50().to(device)}
    sa = e2e.make_models(device)
    models.update(sa_eager=sa["eager"], sa_fused=sa["fused"])
    return models


def name_kind(name: str) -> str | None:
    """The kind of op a profiler event's name says, if it says one."""
    lower = name.lower()
    if name.startswith("sa_cuda::") or "shuffleattention" in lower:
        return "sa"  # the fused ops, and the autograd.Function (and its backward node) around them
    if lower.startswith("optimizer."):
        return "optimizer"  # SGD's step and zero_grad
    if "conv" in lower:
        return "conv"
    if "batch_norm" in lower or "batchnorm" in lower:
        return "batch_norm"
    stripped = name.removeprefix("autograd::engine::evaluate_function: ")
    return "add/relu" if stripped in _ADD_RELU else None


def event_kind(event) -> str:
    """The kind of the outermost op around a profiler event that names one (an aten::empty inside
    a convolution is the convolution's), else "other"."""
    chain = []
    while event is not None:
        chain.append(event.name)
        event = event.cpu_parent
    return next((kind for kind in map(name_kind, reversed(chain)) if kind), "other")


def profile_shares(fn, steps: int) -> dict[str, float]:
    """The share of the profiled self CPU time of ``steps`` calls of fn, per op kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    totals = dict.fromkeys(OP_KINDS, 0.0)
    for event in prof.events():
        totals[event_kind(event)] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {kind: value / whole for kind, value in totals.items()}


def time_steps(
    fn, device: torch.device, steps: int, timer: TailTimer | None
) -> tuple[list[float], list[dict[str, float]], list[int]]:
    """Seconds of each of ``steps`` calls of fn after one untimed call; with each call's tails
    (``timer.end_step()``, when there is a timer) and its page faults, both taken outside the
    timed region."""
    fn()
    sync(device)
    if timer is not None:
        timer.discard()
    times, tails, faults = [], [], []
    for _ in range(steps):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - began)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
        if timer is not None:
            tails.append(timer.end_step())
    return times, tails, faults


def run_batch(args, batch: int, device: torch.device, log) -> dict:
    """One batch size: the check, the interleaved rounds, the profiles."""
    models = make_models(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, args.resolution, args.resolution, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    pair = {"eager": models["sa_eager"], "fused": models["sa_fused"]}
    check = e2e._check(pair, images, labels, device, "fp32")
    result = {"batch": batch, "check": check, "times": {}, "overhead": {}, "shares": {}}
    result.update(faults={}, tails={}, tail_price={})
    host_clock = device.type == "cpu"  # the tails' timer reads the host's clock
    if not check["ok"]:
        log(f"batch {batch}: fused vs eager check FAILED: {check}")
        return result
    fns = {
        name: e2e.step_fns(model, images, labels, device, "fp32") for name, model in models.items()
    }
    # per (model, step): one entry a round, the round's steps
    rounds = {(name, step): [] for name in MODELS for step in STEPS}
    tail_rounds = {(name, step): [] for name in MODELS for step in STEPS}
    faults = {(name, step): [] for name in MODELS for step in STEPS}
    timers = {name: TailTimer(model) for name, model in models.items()} if host_clock else {}
    for r in range(args.rounds):
        order = MODELS[r % len(MODELS) :] + MODELS[: r % len(MODELS)]
        for name in order:
            for step in STEPS:
                models[name].train(step == "train")
                times, tails, step_faults = time_steps(
                    fns[name][step], device, args.steps, timers.get(name)
                )
                rounds[(name, step)].append(times)
                tail_rounds[(name, step)].append(tails)
                faults[(name, step)].extend(step_faults)
        log(f"batch {batch}: round {r + 1}/{args.rounds} done")
    for timer in timers.values():
        timer.remove()
    for step in STEPS:
        for name in MODELS:
            key = f"{name}/{step}"
            every = [t for times in rounds[(name, step)] for t in times]
            p25, median, p75 = quartiles(every)
            result["times"][key] = {"median_s": median, "p25_s": p25, "p75_s": p75}
            result["faults"][key] = statistics.median(faults[(name, step)])
            if host_clock:
                result["tails"][key] = summarize(
                    [t for ts in tail_rounds[(name, step)] for t in ts]
                )
            if name == "resnet50":
                continue
            ratios = [
                statistics.median(mine) / statistics.median(base) - 1.0
                for mine, base in zip(rounds[(name, step)], rounds[("resnet50", step)])
            ]
            q25, q50, q75 = quartiles(ratios)
            result["overhead"][key] = {"median": q50, "p25": q25, "p75": q75}
            if not host_clock:
                continue
            # the round's tails (median step sum) over ResNet-50's, per ResNet-50's round step
            prices = [
                (summarize(mine)["all"] - summarize(base)["all"]) / (1e3 * statistics.median(t))
                for mine, base, t in zip(
                    tail_rounds[(name, step)],
                    tail_rounds[("resnet50", step)],
                    rounds[("resnet50", step)],
                )
            ]
            q25, q50, q75 = quartiles(prices)
            result["tail_price"][key] = {"median": q50, "p25": q25, "p75": q75}
    for name in MODELS:
        for step in STEPS:
            models[name].train(step == "train")
            shares = profile_shares(fns[name][step], args.profile_steps)
            result["shares"][f"{name}/{step}"] = shares
    return result


def _spread(over: dict | None) -> tuple[str, str]:
    if not over:
        return "", ""
    return f"{over['median']:+.1%}", f"({over['p25']:+.1%}..{over['p75']:+.1%})"


def format_rows(results: list[dict]) -> str:
    head = (
        f"{'batch':>5} {'step':<6} {'model':<24} {'median ms':>10} {'overhead':>9} "
        f"{'(p25..p75)':>16} {'tails ms':>9} {'tail price':>10} {'(p25..p75)':>16} "
        f"{'faults':>7} " + " ".join(f"{kind:>10}" for kind in OP_KINDS)
    )
    lines = [head, "-" * len(head)]
    for res in results:
        if not res["check"]["ok"]:
            lines.append(f"{res['batch']:>5} check FAILED")
            continue
        for step in STEPS:
            for name in MODELS:
                key = f"{name}/{step}"
                median, spread = _spread(res["overhead"].get(key))
                price, price_spread = _spread(res["tail_price"].get(key))
                tails = f"{res['tails'][key]['all']:9.2f}" if key in res["tails"] else f"{'':9}"
                shares = " ".join(f"{res['shares'][key][kind]:10.1%}" for kind in OP_KINDS)
                lines.append(
                    f"{res['batch']:>5} {step:<6} {LABELS[name]:<24} "
                    f"{res['times'][key]['median_s'] * 1e3:10.1f} {median:>9} {spread:>16} "
                    f"{tails} {price:>10} {price_spread:>16} {res['faults'][key]:7.0f} {shares}"
                )
    return "\n".join(lines)


def format_tails(results: list[dict]) -> str:
    """Per stage: the tails' median ms a step, forward and backward, per model."""
    stages = ("layer1", "layer2", "layer3", "layer4")
    head = f"{'batch':>5} {'step':<6} {'pass':<4} {'model':<24} " + " ".join(
        f"{stage:>8}" for stage in (*stages, "all")
    )
    lines = [head, "-" * len(head)]
    for res in results:
        for step in STEPS:
            for pass_ in ("fwd", "bwd") if step == "train" else ("fwd",):
                for name in MODELS:
                    tails = res["tails"].get(f"{name}/{step}")
                    if not tails:
                        continue
                    cells = " ".join(
                        f"{tails.get(f'{stage}/{pass_}', 0.0):8.2f}" for stage in (*stages, "all")
                    )
                    lines.append(
                        f"{res['batch']:>5} {step:<6} {pass_:<4} {LABELS[name]:<24} {cells}"
                    )
    return "\n".join(lines)


def plot(results: list[dict], title: str, path: Path) -> bool:
    """Per (batch, step), eager and fused: the step's overhead over ResNet-50 and, where the
    tails were timed, their price; with the 3% target."""
    plt = report.pyplot()
    if plt is None:
        return False
    ok = [res for res in results if res["check"]["ok"]]
    if not ok:
        return False
    groups = [f"{step}\nbatch {res['batch']}" for step in STEPS for res in ok]
    panels = [("overhead", "step time over ResNet-50's - 1 (%)")]
    if all(res["tail_price"] for res in ok):
        panels.append(("tail_price", "tails' time - ResNet-50's, over its step (%)"))

    def values(field):
        def value(name, group):
            step, batch = group.split("\nbatch ")
            res = next(res for res in ok if str(res["batch"]) == batch)
            return 100 * res[field][f"{name}/{step}"]["median"]

        return value

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (field, ylabel) in zip(axes[0], panels):
        report.grouped_bars(ax, groups, ["sa_eager", "sa_fused"], values(field), LABELS.get)
        ax.axhline(3.0, color="k", linestyle="--", linewidth=0.8, label="target: +3%")
        ax.axhline(0.0, color="k", linewidth=0.6)
        ax.set_xlabel("step and batch size")
        ax.set_ylabel(ylabel)
    report.save_figure(fig, axes, 3, title, path, dpi=110)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each model a round")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="batch 2 at 64x64, 1 round, 1 step")
    p.add_argument("--glibc-defaults", action="store_true", help="keep glibc's malloc settings")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.resolution, args.rounds, args.steps, args.profile_steps = (
            "2",
            64,
            1,
            1,
            1,
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steady = not args.glibc_defaults and mallopt(_MALLOC)
    malloc = "no mmap, no trim" if steady else "glibc defaults"
    began = time.perf_counter()
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        results.append(run_batch(args, batch, device, lambda msg: print(msg, flush=True)))
    label = report.device_label(device, args.threads)
    print(
        f"\n{label}; {args.resolution}x{args.resolution}, fp32; {args.rounds} rounds of "
        f"{args.steps} steps; malloc: {malloc}; {time.perf_counter() - began:.0f} s\n"
    )
    print(format_rows(results))
    if any(res["tails"] for res in results):
        print("\nthe tails, median ms a step:\n" + format_tails(results))
    stem = report.output_stem("overhead", label, args)
    summary = {
        "device": label,
        "resolution": args.resolution,
        "rounds": args.rounds,
        "steps": args.steps,
        "profile_steps": args.profile_steps,
        "malloc": malloc,
        "loadavg": report.loadavg(),
        "results": results,
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    title = f"SA-ResNet-50 over ResNet-50, {label}, {args.resolution}px fp32"
    if plot(results, title, stem.with_suffix(".png")):
        print(f"wrote {stem}.json, {stem}.png")
    return report.exit_status(
        [f"batch {res['batch']}: fused vs eager check" for res in results if not res["check"]["ok"]]
    )


if __name__ == "__main__":
    raise SystemExit(main())
