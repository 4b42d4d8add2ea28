"""vmap rules of the fused ops (of every namespace: library.py registers them), so that torch.func
transforms (vmap, grad, vjp, jacrev and their compositions, e.g. per-sample gradients
``vmap(grad(f))``) work over the functionals.

Forward: when only x is mapped, the mapped dimension is folded into the batch (one kernel call on
[V * B, C, H, W]; every plane is independent). When a parameter is mapped too, every slice has its
own parameters: the op runs once per slice.
Backward: the parameter gradients are sums over the batch, and under vmap every slice needs its
own sum, so the op runs once per slice (grad_x alone could be folded, but the op returns both).
The residual ops (forward and backward) run once per slice too.
"""

from __future__ import annotations

import torch


def _slice(args, in_dims, index: int) -> list:
    return [a if d is None else a.select(d, index) for a, d in zip(args, in_dims)]


def _per_slice(op, info, args, in_dims):
    """Runs ``op`` on every slice of the mapped arguments and stacks its outputs along dim 0."""
    results = [op(*_slice(args, in_dims, v)) for v in range(info.batch_size)]
    outputs = tuple(torch.stack(list(column)) for column in zip(*results))
    return outputs, (0,) * len(outputs)


def _forward_rule(op):
    def rule(info, in_dims, x, groups, *params_and_eps):
        args = (x, groups, *params_and_eps)
        x_dim = in_dims[0]
        if any(d is not None for d in in_dims[1:]):
            return _per_slice(op, info, args, in_dims)
        # Only x is mapped: [V, B, C, H, W] -> [V * B, C, H, W], one call.
        x = x.movedim(x_dim, 0)
        V, B = x.shape[0], x.shape[1]
        out, mean, rstd = op(x.reshape(V * B, *x.shape[2:]), groups, *params_and_eps)
        return (out.view(V, B, *out.shape[1:]), mean.view(V, B, -1), rstd.view(V, B, -1)), (0, 0, 0)

    return rule


def _per_slice_rule(op):
    def rule(info, in_dims, *args):
        return _per_slice(op, info, args, in_dims)

    return rule


def register(forward, backward, residual_forward, residual_backward) -> None:
    """vmap rules for one variant's forward and backward op, and its residual forward and
    backward op (OpOverloads of any namespace). The residual ops run once per slice."""
    torch.library.register_vmap(forward, _forward_rule(forward))
    for op in (backward, residual_forward, residual_backward):
        torch.library.register_vmap(op, _per_slice_rule(op))
