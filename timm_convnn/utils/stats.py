""" Parameter and FLOP counts of timm models, shape-only (meta device), for the README and the CLI.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix products and convolutions (2 FLOPs per
multiply-add), the convention of timm's and the paper's tables. ConvNN's neighbour selection GEMM is a matrix product
and is counted; its top-k, gathers and the K-tap weighted sum are elementwise work and are not (the paper's profiler
counted the aggregation as a depthwise conv, 2 * C * n * K per layer; ``convnn_aggregation_flops`` gives that term).
"""
from typing import Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_flops', 'convnn_aggregation_flops']


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: Tuple[int, ...], batch_size: int = 1) -> int:
    """Forward FLOPs for one batch of ``input_size`` images; runs on the model's device (use ``meta``: free)."""
    p = next(model.parameters())
    x = torch.zeros((batch_size, *input_size), device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops()


def convnn_aggregation_flops(model: nn.Module, input_size: Tuple[int, ...]) -> int:
    """The paper's count of the ConvNN aggregation (a depthwise / standard Conv1d of kernel K over n tokens)."""
    from ..layers import ConvNNAttention, ConvNN2d
    total = 0
    hooks = []

    def hook(m, args, out):
        nonlocal total
        agg = m.aggregate
        if isinstance(m, ConvNNAttention):
            tokens = out.shape[1]
        else:
            tokens = out.shape[2] * out.shape[3]
        k_eff = min(agg.num_neighbors, tokens)
        fan_in = 1 if agg.depthwise else agg.in_channels // agg.groups
        total += 2 * tokens * agg.out_channels * fan_in * k_eff

    for m in model.modules():
        if isinstance(m, (ConvNNAttention, ConvNN2d)):
            hooks.append(m.register_forward_hook(hook))
    try:
        count_flops(model, input_size)
    finally:
        for h in hooks:
            h.remove()
    return total
