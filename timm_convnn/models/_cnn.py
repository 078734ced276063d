""" Shared by the CNN families: the 3x3-conv -> ConvNN factory and the warm-start checkpoint filter. """
import logging
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from ..layers import ConvNN2d, ConvNNBranch2d

__all__ = ['CONVNN_CNN_KWARGS', 'ConvNNConvFactory', 'cnn_checkpoint_filter_fn', 'unwrap_state_dict']

_logger = logging.getLogger(__name__)

# ConvNN options accepted as CNN model kwargs (JSON-serialisable)
CONVNN_CNN_KWARGS = (
    'num_neighbors', 'candidates', 'num_samples', 'similarity', 'weighting', 'aggregation', 'coords', 'coord_scale',
    'neighbor_order', 'branch_ratio',
)


class ConvNNConvFactory:
    """Builds the ConvNN replacement of a 3x3 conv: ``ConvNNBranch2d`` when ``branch_ratio`` is set, else ``ConvNN2d``.

    One factory per model build; each layer it builds gets the next ``sample_seed`` (0, 1, 2, ... in construction
    order), so that eval-mode random candidates differ from layer to layer and are the same in every process.
    ``convert(conv)`` builds the replacement of an existing ``nn.Conv2d``; calling the factory like ``nn.Conv2d``
    builds the replacement of a 3x3 conv and a plain ``nn.Conv2d`` for any other kernel size.
    """

    def __init__(self, branch_ratio: Optional[float] = None, **convnn_kwargs: Any) -> None:
        self.branch_ratio = branch_ratio
        self.convnn_kwargs = convnn_kwargs
        self.count = 0

    def build(
            self,
            in_channels: int,
            out_channels: int,
            stride: int = 1,
            dilation: int = 1,
            groups: int = 1,
            bias: bool = False,
            device=None,
            dtype=None,
    ) -> nn.Module:
        if groups != 1:
            raise ValueError(f'ConvNN replaces ungrouped 3x3 convs only; got groups={groups}')
        seed = self.count
        self.count += 1
        dd = {'device': device, 'dtype': dtype}
        if self.branch_ratio is None:
            return ConvNN2d(
                in_channels, out_channels, stride=stride, padding=1, bias=bias, sample_seed=seed,
                **self.convnn_kwargs, **dd)
        return ConvNNBranch2d(
            in_channels, out_channels, kernel_size=3, stride=stride, dilation=dilation,
            branch_ratio=self.branch_ratio, bias=bias, sample_seed=seed, **self.convnn_kwargs, **dd)

    def convert(self, conv: nn.Conv2d) -> nn.Module:
        if conv.kernel_size != (3, 3) or conv.stride[0] != conv.stride[1]:
            raise ValueError(f'expected a 3x3 conv with equal strides, got {conv}')
        w = conv.weight
        return self.build(
            conv.in_channels, conv.out_channels, stride=conv.stride[0], dilation=conv.dilation[0],
            groups=conv.groups, bias=conv.bias is not None, device=w.device, dtype=w.dtype)

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, device=None, dtype=None) -> nn.Module:
        if kernel_size != 3:
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, bias=bias, device=device, dtype=dtype)
        if padding != dilation:
            raise ValueError(f'ConvNN replaces "same"-padded 3x3 convs; got padding={padding}, dilation={dilation}')
        return self.build(in_channels, out_channels, stride, dilation, groups, bias, device=device, dtype=dtype)


def _convnn_prefixes(model: nn.Module):
    return tuple(name + '.' for name, m in model.named_modules() if isinstance(m, (ConvNN2d, ConvNNBranch2d)))


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint saved as ``{'model': ...}`` or ``{'state_dict': ...}``, or of a plain state dict."""
    checkpoint = checkpoint.get('model', checkpoint)
    return checkpoint.get('state_dict', checkpoint)


def cnn_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Warm start a ConvNN CNN from a checkpoint of the CNN it modifies (or load one of its own).

    Tensors whose role is unchanged (stem, 1x1 convs, norms, head, ...) load by name. The 3x3 convs that ConvNN
    replaced (``<layer>.weight`` and ``<layer>.bias`` where ``<layer>`` is now a ConvNN module) are dropped, and the
    ConvNN layers' own tensors, absent from the source, keep the model's initialisation. Nothing else is filled in or
    dropped: any other missing, unexpected or mis-shaped tensor still fails a strict load (a checkpoint of another
    ConvNN variant, e.g. ``resnet18_convnn``'s for ``resnet18_convnn_branch``, brings ConvNN tensors of other names,
    which must not load as a warm start that silently keeps every ConvNN layer at its initialisation).
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    prefixes = _convnn_prefixes(model)
    replaced = {p + name for p in prefixes for name in ('weight', 'bias')}
    out = {k: v for k, v in state_dict.items() if k in own or k not in replaced}
    new = [k for k in own if k not in out and k.startswith(prefixes)]
    for k in new:
        out[k] = own[k].detach().clone()
    _adapt_input_aggregates(out, own, model, prefixes)
    if new:
        dropped = len(state_dict) - (len(out) - len(new))
        _logger.info(f'ConvNN warm start: {len(out) - len(new)} tensors loaded, {dropped} replaced-conv tensors '
                     f'dropped, {len(new)} new ConvNN tensors keep their initialisation')
    return out


def _adapt_input_aggregates(
        state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], model: nn.Module, prefixes: tuple) -> None:
    """A ConvNN layer on the image (VGG's first layer) gets the pretrained weights of another input channel count
    (``in_chans``) as timm gets them for a stem conv (``timm.models.adapt_input_conv``: summed over the source
    channels for 1, repeated and rescaled otherwise). timm adapts 4-D conv weights only; it would drop an
    aggregation weight, (out, in, K), and leave the layer at random init. So it is adapted here, and the cfgs'
    ``first_conv`` lists the plain conv stems only. Source channels: the pretrained cfg's ``input_size`` (3)."""
    in_chans = getattr(model, 'in_chans', None)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    base = (cfg.get('input_size') or (3,))[0]
    if not isinstance(in_chans, int) or in_chans == base:
        return
    for key, target in own.items():
        weight = state_dict.get(key)
        if (key.endswith('aggregate.weight') and key.startswith(prefixes) and weight is not None
                and weight.dim() == 3 and target.dim() == 3 and target.shape[1] == in_chans
                and weight.shape[1] == base and weight.shape[::2] == target.shape[::2]):
            adapted = adapt_input_conv(in_chans, weight.unsqueeze(-1), base_chans=base).squeeze(-1)
            state_dict[key] = adapted.to(weight.dtype)
            _logger.info(f'Converted input layer {key} pretrained weights from {base} to {in_chans} channel(s)')
