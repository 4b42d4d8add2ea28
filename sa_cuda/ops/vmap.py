"""vmap rules of the fused ops (of every namespace: library.py registers them), so that torch.func
transforms (vmap, grad, vjp, jacrev and their compositions, e.g. per-sample gradients
``vmap(grad(f))``) work over the functionals.

Forward: when only x is mapped, the mapped dimension is folded into the batch (one kernel call on
[V * B, C, H, W]; every plane is independent). When a parameter is mapped too, every slice has its
own parameters: the op runs once per slice.
Backward: the parameter gradients are sums over the batch, and under vmap every slice needs its
own sum, so the op runs once per slice (grad_x alone could be folded, but the op returns both).
The residual ops (forward and backward) run once per slice too.
A mapped dimension of size 0 has no slice to run the op on: the outputs are then empty tensors of
the shapes and dtypes the op's fake kernel gives one slice (which checks the arguments as the op
does).
"""

from __future__ import annotations

import torch


def _slice(args, in_dims, index: int) -> list:
    return [a if d is None else a.select(d, index) for a, d in zip(args, in_dims)]


def _meta_slice(a: torch.Tensor, d: int | None) -> torch.Tensor:
    """One slice of a mapped tensor (a whole unmapped one) as an empty tensor on meta."""
    shape = a.shape if d is None else a.shape[:d] + a.shape[d + 1 :]
    return torch.empty(shape, dtype=a.dtype, device="meta")


def _no_slices(op, args, in_dims) -> tuple:
    """The outputs of ``op`` over a mapped dimension of size 0: its fake kernel run on meta
    tensors of one slice's shape gives each output's shape and dtype; each is returned empty, with
    a leading dimension of 0, on the arguments' device."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    one = [_meta_slice(a, d) if isinstance(a, torch.Tensor) else a for a, d in zip(args, in_dims)]
    outputs = tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in op(*one))
    return outputs, (0,) * len(outputs)


def _per_slice(op, info, args, in_dims):
    """Runs ``op`` on every slice of the mapped arguments and stacks its outputs along dim 0."""
    if info.batch_size == 0:
        return _no_slices(op, args, in_dims)
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
        stats = (V, B, mean.shape[1])  # not -1: V * B may be 0
        return (out.view(V, B, *out.shape[1:]), mean.view(stats), rstd.view(stats)), (0, 0, 0)

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
