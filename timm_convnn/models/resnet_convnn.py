""" ResNet with ConvNN (or hybrid ConvNN / conv branching) in place of every 3x3 convolution.

timm's own ``ResNet`` (not a fork). timm's blocks hard-code their 3x3 convs, so ``ConvNNBasicBlock`` and
``ConvNNBottleneck`` subclass timm's ``BasicBlock`` / ``Bottleneck`` and swap those convs (``conv1`` and ``conv2`` of
a basic block, ``conv2`` of a bottleneck) for ``ConvNN2d`` or ``ConvNNBranch2d`` built from the conv's own channels,
stride and dilation. Stem, 1x1 convs, shortcuts, norms and head are timm's.

Strided blocks: queries on the strided grid, candidates from the full map. K is clamped on small maps.

Paper: "Attention Via Convolutional Nearest Neighbors", Mingi Kang, Jeova Farias Sales Rocha Neto,
https://arxiv.org/abs/2511.14137 (hybrid branching layer, §4.2.3; the reference code has no bottleneck ResNet, so
the 3x3 conv of the bottleneck is what is replaced here).

Defaults: branch variants lambda 0.5, K 9, cosine similarity, all candidates, unit weights (paper CNN setting).
ConvNN options are model kwargs: ``num_neighbors``, ``candidates``, ``num_samples``, ``similarity``, ``weighting``,
``aggregation``, ``coords``, ``coord_scale``, ``neighbor_order``, ``branch_ratio``.
"""
from typing import Any, Dict, Type, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ._cnn import CONVNN_CNN_KWARGS, ConvNNConvFactory, cnn_checkpoint_filter_fn
from ._pretrained import WARM_START_PREFIX, explain_load_errors, warm_start_cfg

__all__ = ['ConvNNBasicBlock', 'ConvNNBottleneck', 'checkpoint_filter_fn']

_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
_MODES = {
    'convnn': dict(),
    'convnn_branch': dict(branch_ratio=0.5),
}


class ConvNNBasicBlock(BasicBlock):
    """timm's ``BasicBlock`` with both 3x3 convs replaced by the ``convnn`` factory's layers."""

    def __init__(self, *args, convnn: ConvNNConvFactory, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv1 = convnn.convert(self.conv1)
        self.conv2 = convnn.convert(self.conv2)


class ConvNNBottleneck(Bottleneck):
    """timm's ``Bottleneck`` with its 3x3 conv (``conv2``) replaced by the ``convnn`` factory's layer."""

    def __init__(self, *args, convnn: ConvNNConvFactory, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv2 = convnn.convert(self.conv2)


class _BlockFactory:
    """A block class with the model's ConvNN factory bound (ResNet reads ``expansion`` and calls it per block)."""

    def __init__(self, block: Type[Union[ConvNNBasicBlock, ConvNNBottleneck]], convnn: ConvNNConvFactory) -> None:
        self.block = block
        self.expansion = block.expansion
        self.convnn = convnn

    def __call__(self, *args, **kwargs):
        return self.block(*args, convnn=self.convnn, **kwargs)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ResNet) -> Dict[str, torch.Tensor]:
    """timm ResNet checkpoints of the same depth (the replaced 3x3 convs dropped, the ConvNN layers new), or our own."""
    return cnn_checkpoint_filter_fn(state_dict, model)


def _create_resnet_convnn(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    if 'block' in kwargs:
        raise TypeError(f'{variant} builds its own ConvNN blocks; block= cannot be passed')
    convnn = ConvNNConvFactory(**{k: kwargs.pop(k) for k in CONVNN_CNN_KWARGS if k in kwargs})
    depth = int(variant.split('_')[0][len('resnet'):])
    block = ConvNNBottleneck if depth >= 50 else ConvNNBasicBlock
    with explain_load_errors(variant, pretrained, kwargs):
        return build_model_with_cfg(
            ResNet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            block=_BlockFactory(block, convnn),
            **kwargs,
        )


def _resnet_convnn(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> ResNet:
    arch, mode = variant.split('_', 1)
    model_args = dict(layers=_LAYERS[int(arch[len('resnet'):])], **_MODES[mode])
    model_args.update(kwargs)
    return _create_resnet_convnn(variant, pretrained=pretrained, **model_args)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2511.14137', 'paper_name': 'Attention Via Convolutional Nearest Neighbors',
        'origin_url': 'https://github.com/mingikang31/Convolutional-Nearest-Neighbor',
        **kwargs,
    }


# warm-start weights: timm's ResNet A1 (ResNet strikes back) ImageNet-1k weights (see _pretrained.py)
default_cfgs = generate_default_cfgs({
    f'resnet{d}_{mode}.{WARM_START_PREFIX}a1_in1k': warm_start_cfg(
        _cfg(), f'resnet{d}.a1_in1k', 'the ConvNN layers that replace every 3x3 conv')
    for d in _LAYERS for mode in _MODES
})


@register_model
def resnet18_convnn(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18, every 3x3 conv replaced by ConvNN (all candidates, K 9, cosine)."""
    return _resnet_convnn('resnet18_convnn', pretrained, kwargs)


@register_model
def resnet18_convnn_branch(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18, every 3x3 conv replaced by the ConvNN / conv hybrid (lambda 0.5, all candidates, K 9, cosine)."""
    return _resnet_convnn('resnet18_convnn_branch', pretrained, kwargs)


@register_model
def resnet34_convnn(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-34, every 3x3 conv replaced by ConvNN (all candidates, K 9, cosine)."""
    return _resnet_convnn('resnet34_convnn', pretrained, kwargs)


@register_model
def resnet34_convnn_branch(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-34, every 3x3 conv replaced by the ConvNN / conv hybrid (lambda 0.5, all candidates, K 9, cosine)."""
    return _resnet_convnn('resnet34_convnn_branch', pretrained, kwargs)


@register_model
def resnet50_convnn(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50, every bottleneck 3x3 conv replaced by ConvNN (all candidates, K 9, cosine)."""
    return _resnet_convnn('resnet50_convnn', pretrained, kwargs)


@register_model
def resnet50_convnn_branch(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50, every bottleneck 3x3 conv replaced by the ConvNN / conv hybrid (lambda 0.5, K 9, cosine)."""
    return _resnet_convnn('resnet50_convnn_branch', pretrained, kwargs)
