""" What ConvNN's custom autograd Functions share: first derivatives only (a clear error on a second one), and
support for ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...: per-sample gradients, Jacobians), which
need a Function's ``setup_context`` and a ``vmap`` rule.

The Functions keep a context-taking ``forward`` for plain eager calls (autograd binds the arguments of the
``setup_context`` form to the forward's signature at every call, 20-60 us of host time on a CPU) and get a
``setup_context`` twin, ``transformable``, for calls under a transform.
"""
import functools
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ['first_derivative_only', 'transformable', 'transforms_active', 'fold_batch']


def _second_derivative_message(what: str) -> str:
    return (f'ConvNN has no double backward ({what}): differentiating the gradient of a ConvNN layer '
            f'(create_graph=True and a second backward: a gradient penalty, a second-order optimizer; or nested '
            f'torch.func.grad) is not supported')


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on the first ``count`` tensors (a backward's gradients) whose own backward raises: a second derivative
    through ConvNN fails where it is taken, with a message naming the layer part (``what``), instead of silently
    missing the ConvNN terms. The other tensors (the backward's incoming gradients and saved inputs) are inputs only so
    that the node is recorded wherever any of them is differentiable (at any ``torch.func`` level)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(what: str, count: int, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.what = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_second_derivative_message(ctx.what))


def first_derivative_only(what: str) -> Callable:
    """Decorator of a custom ``backward`` that builds its gradients without a graph (in place, or by kernels): it runs
    under no_grad, and where grad mode is on (``create_graph=True``; ``torch.func.grad`` always asks for it, whether
    or not anything differentiates the gradients again) they come back through ``_NoSecondDerivative``, so that only
    an actual second derivative raises (``torch.autograd.function.once_differentiable`` does this with a message
    that does not name ConvNN, and misses a second derivative through the saved inputs when the incoming gradients
    are constants, e.g. of ``out.sum()``)."""
    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            present = [i for i, g in enumerate(out) if isinstance(g, torch.Tensor)]
            sources = [t for t in grads + tuple(ctx.saved_tensors) if isinstance(t, torch.Tensor)]
            guarded = _NoSecondDerivative.apply(what, len(present), *[out[i] for i in present], *sources)
            out = list(out)
            for i, g in zip(present, guarded):
                out[i] = g
            return tuple(out)
        return wrapper
    return wrap


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform is running (then a Function must be applied in its ``transformable`` form)."""
    return torch._C._are_functorch_transforms_active()


def transformable(function: type, what: str, forward_vmap: Callable, backward_vmap: Callable) -> type:
    """``function`` in the form ``torch.func`` transforms require. ``function`` is an ``autograd.Function`` whose
    ``forward(ctx, *inputs)`` is ``compute(*inputs)`` then ``save(ctx, inputs, output)``, and whose backward is
    ``gradients(*gradient_inputs(ctx, *grads))`` (one entry per input, None where there is no gradient). The twin:
    ``forward = compute``, ``setup_context = save``, the vmap rule ``forward_vmap`` (``fold_batch``), and a backward
    that calls ``gradients`` through a Function of its own (vmap rule ``backward_vmap``; its backward raises: no
    second derivative), so that ``vmap(grad(...))`` (per-sample gradients) maps the backward too."""
    def refuse(ctx, *grads):
        raise RuntimeError(_second_derivative_message(what))

    backward_function = type(function.__name__ + 'Gradients', (torch.autograd.Function,), dict(
        forward=staticmethod(function.gradients), setup_context=staticmethod(_no_context),
        backward=staticmethod(refuse),
        vmap=staticmethod(lambda info, in_dims, *args: backward_vmap(backward_function.apply, info, in_dims, *args)),
        __doc__=f'The gradients of {function.__name__} as a Function (for torch.func transforms).'))

    def backward(ctx, *grads):
        return backward_function.apply(*function.gradient_inputs(ctx, *grads))

    twin = type(function.__name__ + 'Transformable', (function,), dict(
        forward=staticmethod(function.compute), setup_context=staticmethod(function.save),
        backward=staticmethod(backward),
        vmap=staticmethod(lambda info, in_dims, *args: forward_vmap(twin.apply, info, in_dims, *args)),
        __doc__=f'{function.__name__} for torch.func transforms.'))
    return twin


def _no_context(ctx, inputs, output):
    pass


def fold_batch(*positions: int, weights: Sequence[int] = (), weight_outputs: Sequence[int] = (),
               entries: Optional[int] = None, most_groups: Optional[int] = None,
               most_entry_elements: Optional[int] = None) -> Callable:
    """A vmap rule ``rule(call, info, in_dims, *args)`` for a function (a Function's ``apply``, a custom op) whose
    tensor arguments at ``positions`` are (B, G, ...) (batch, groups: heads), like its tensor outputs, and whose
    arguments at ``weights`` are per group, (G, ...) (e.g. depthwise weights; ``weight_outputs``: the outputs shaped
    so, e.g. the weights' gradient).

    The mapped dimension folds into the batch (a view where it is the leading one; unmapped arguments there are
    expanded), one call, unfolded again, while only ``positions`` are mapped, and the function returns nothing per
    weight or can return it per entry. ``entries``: the position of an int argument R, for a function that returns
    its ``weight_outputs`` per each of R equal runs of the batch, (R * G, ...): the rule multiplies R by the number
    of entries it folds (the gradient of unmapped weights is per entry: per-sample gradients, ``jacrev``; nested
    levels multiply in turn). Otherwise (vmapped weights: an ensemble; such a gradient from a function without
    ``entries``) it folds into the groups: entry e's group g becomes group e * G + g, of the arguments at
    ``positions`` (dim 1) and of the weights (dim 0, expanded where unmapped), so the weights' gradient comes out per
    entry from one call (or one per ``most_groups`` groups / ``most_entry_elements`` elements per batch entry, a
    kernel's limits). Where any other argument is mapped (e.g. a candidate list) the rule maps by a loop, a call per
    entry."""
    def rule(call: Callable, info, in_dims: Sequence[Optional[int]], *args):
        size = info.batch_size
        if size == 0:  # (vmap over no entries: one call on a zero entry for the outputs' shapes, none of it kept)
            return _stacked([call(*[a.new_zeros(a.shape[:d] + a.shape[d + 1:]) if d is not None else a
                                    for a, d in zip(args, in_dims)])], keep=0)
        mapped = [i for i, d in enumerate(in_dims) if d is not None]
        if not all(i in positions or i in weights for i in mapped):
            return _stacked([call(*[a.select(d, j) if d is not None else a for a, d in zip(args, in_dims)])
                             for j in range(size)])
        runs = args[entries] if entries is not None else 1  # (> 1 where an inner vmap level folded its entries)
        if (not weight_outputs or entries is not None) and not any(i in weights for i in mapped):
            out = call(*[_mapped_first(a, in_dims[i], size).flatten(0, 1)
                         if i in positions and isinstance(a, torch.Tensor) else size * runs if i == entries else a
                         for i, a in enumerate(args)])
            return _unfolded(out, size)
        args = [_mapped_first(a, in_dims[i], size) if (i in positions or i in weights) and isinstance(a, torch.Tensor)
                else a for i, a in enumerate(args)]
        step = _entries_per_call(args, positions, size, most_groups, most_entry_elements)
        outs = [call(*[a[s:s + step].movedim(0, 1).flatten(1, 2) if i in positions and isinstance(a, torch.Tensor)
                       else a[s:s + step].flatten(0, 1) if i in weights and isinstance(a, torch.Tensor) else a
                       for i, a in enumerate(args)])
                for s in range(0, size, step)]
        return _concatenated([_unfolded(o, min(step, size - s), weight_outputs, runs)
                              for o, s in zip(outs, range(0, size, step))])
    return rule


def _entries_per_call(args, positions: Sequence[int], size: int, most_groups: Optional[int],
                      most_entry_elements: Optional[int]) -> int:
    """How many vmapped entries one call folds into its groups: all, unless that passes a kernel's limit on groups
    or on the elements of one batch entry (``args``: mapped dimension first)."""
    step = size
    for i in positions:
        a = args[i]
        if isinstance(a, torch.Tensor):
            if most_groups is not None:
                step = min(step, most_groups // max(1, a.shape[2]))
            if most_entry_elements is not None:
                step = min(step, most_entry_elements // max(1, a.shape[2:].numel()))
    return max(1, step)


def _mapped_first(x: torch.Tensor, dim: Optional[int], size: int) -> torch.Tensor:
    return x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)


def _unfolded(out, size: int, weight_outputs: Optional[Sequence[int]] = None, runs: int = 1):
    """A folded call's outputs and their mapped dims: the leading ``size`` entries of the batch (dim 0 of every
    output; ``weight_outputs`` None), or of the groups: dim 1, and for ``weight_outputs``, (runs * size * G, ...) in
    that order, the mapped dim moved first (dim 0), (size, runs * G, ...)."""
    def one(o, i):
        if o is None:
            return None, None
        if weight_outputs is None:
            return o.unflatten(0, (size, -1)), 0
        if i in weight_outputs:
            return o.unflatten(0, (runs, size, -1)).movedim(1, 0).flatten(1, 2), 0
        return o.unflatten(1, (size, -1)), 1
    if isinstance(out, tuple):
        pairs = [one(o, i) for i, o in enumerate(out)]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return one(out, 0)


def _concatenated(parts):
    """The per-chunk (outputs, dims) of a rule concatenated along their mapped dims."""
    if len(parts) == 1:
        return parts[0]
    outs, dims = zip(*parts)
    if not isinstance(dims[0], tuple):
        return torch.cat(outs, dims[0]), dims[0]
    return (tuple(torch.cat(o, d) if d is not None else None for o, d in zip(zip(*outs), dims[0])), dims[0])


def _stacked(outs, keep: Optional[int] = None):
    """Per-entry outputs stacked on a new leading (mapped) dim; ``keep``: only that many entries of it."""
    def stack(parts):
        return torch.stack(parts)[:keep] if keep is not None else torch.stack(parts)
    if isinstance(outs[0], tuple):
        return (tuple(stack(o) if o[0] is not None else None for o in zip(*outs)),
                tuple(0 if o is not None else None for o in outs[0]))
    return stack(outs), 0
