"""The bottleneck tails inside a ResNet-style model, timed in place (CPU, host clock).

A bottleneck's tail is what its block runs after ``bn3``, the downsample aside: in torchvision's
ResNet-50 ``out += identity; relu(out)``; in SA-ResNet-50 with the reference layers
``relu(sa(out) + identity)`` in small eager ops; with the fused layers one sa_cuda op (the
residual epilogue). Everything else in the three models is the same computation, so the
difference of their tails' times is SA-Net's price over ResNet, measured without the noise of
the rest of the step (a 430 ms step on a shared host moves by more than the SA layers cost).

- Forward: a block's tail takes the time from bn3's return to the block's return, less the
  downsample's (both models' blocks run the downsample after bn3).
- Backward: the autograd nodes that the tail's forward recorded, walked from the block's output
  back to bn3's output and to the identity, each timed from its pre-hook to its hook (the CPU
  autograd engine runs them one at a time on the caller's thread). The AccumulateGrad nodes of
  the tail's parameters are left out: a parameter's node outlives the graph, so its hooks would
  pile up from step to step, and adding a few hundred parameter gradients is not the tail's
  cost.

A CUDA kernel's time is not the host's: use this on the CPU only.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

from torch import nn


def is_bottleneck(module: nn.Module) -> bool:
    """torchvision's Bottleneck and sa_cuda.models' SABottleneck: conv1..conv3, bn1..bn3, an
    optional downsample, then the tail."""
    return all(hasattr(module, name) for name in ("conv3", "bn3", "downsample"))


def tail_nodes(root, stop: list) -> list:
    """The autograd nodes reachable from root without passing through a node of ``stop``
    (compared by identity), AccumulateGrad nodes left out."""
    found, seen, todo = [], set(), [root]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or any(node is s for s in stop):
            continue
        seen.add(id(node))
        if type(node).__name__ == "AccumulateGrad":
            continue
        found.append(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


class TailTimer:
    """Times the tail of every bottleneck of ``model`` (forward and, in training, backward) until
    ``remove()``. After each step, ``end_step()`` returns that step's seconds per stage and pass,
    ``{"layer1/fwd": s, "layer1/bwd": s, ...}`` (a stage is the block name's first part), and
    starts the next; ``discard()`` forgets what was recorded since the last ``end_step()``."""

    def __init__(self, model: nn.Module) -> None:
        self._now: dict[str, float] = defaultdict(float)
        self._handles = []
        self.blocks = [(name, mod) for name, mod in model.named_modules() if is_bottleneck(mod)]
        if not self.blocks:
            raise ValueError("model: no bottleneck block (conv3, bn3, downsample) to time")
        for name, block in self.blocks:
            self._attach(name.split(".")[0], block)

    def _attach(self, stage: str, block: nn.Module) -> None:
        state: dict = {}

        def block_pre(module, args):
            state.update(identity=args[0].grad_fn, downsample_s=0.0)

        def bn3_post(module, args, output):
            state.update(bn3=output.grad_fn, tail_t0=time.perf_counter())

        def downsample_pre(module, args):
            state["downsample_t0"] = time.perf_counter()

        def downsample_post(module, args, output):
            state["downsample_s"] += time.perf_counter() - state.pop("downsample_t0")
            state["identity"] = output.grad_fn

        def block_post(module, args, output):
            took = time.perf_counter() - state.pop("tail_t0") - state["downsample_s"]
            self._now[f"{stage}/fwd"] += took
            if output.grad_fn is not None:
                stop = [node for node in (state["bn3"], state["identity"]) if node is not None]
                for node in tail_nodes(output.grad_fn, stop):
                    self._time_node(stage, node)

        hooks = [
            block.register_forward_pre_hook(block_pre),
            block.bn3.register_forward_hook(bn3_post),
            block.register_forward_hook(block_post),
        ]
        if block.downsample is not None:
            hooks.append(block.downsample.register_forward_pre_hook(downsample_pre))
            hooks.append(block.downsample.register_forward_hook(downsample_post))
        self._handles.extend(hooks)

    def _time_node(self, stage: str, node) -> None:
        started: list[float] = []

        def pre(grad_outputs):
            started.append(time.perf_counter())

        def post(grad_inputs, grad_outputs):
            self._now[f"{stage}/bwd"] += time.perf_counter() - started.pop()

        node.register_prehook(pre)
        node.register_hook(post)

    def end_step(self) -> dict[str, float]:
        step, self._now = dict(self._now), defaultdict(float)
        return step

    def discard(self) -> None:
        self._now = defaultdict(float)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def summarize(steps: list[dict[str, float]]) -> dict[str, float]:
    """Medians over steps, in ms: per ``stage/pass`` key, and ``all/fwd``, ``all/bwd``, ``all``
    (each step's sum first, then the median)."""
    keys = sorted({key for step in steps for key in step})
    out = {key: 1e3 * statistics.median(step.get(key, 0.0) for step in steps) for key in keys}
    for pass_ in ("fwd", "bwd"):
        if any(key.endswith("/" + pass_) for key in keys):
            out[f"all/{pass_}"] = 1e3 * statistics.median(
                sum(v for k, v in step.items() if k.endswith("/" + pass_)) for step in steps
            )
    out["all"] = 1e3 * statistics.median(sum(step.values()) for step in steps)
    return out
