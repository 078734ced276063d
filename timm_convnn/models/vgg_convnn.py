""" VGG-11 (with batch norm) with ConvNN or hybrid ConvNN / conv branching in place of every 3x3 convolution.

timm's own ``VGG`` (not a fork), built through its ``conv_layer`` hook: the hook receives a factory that returns the
ConvNN replacement for each 3x3 conv and a plain ``nn.Conv2d`` for the head's 7x7 / 1x1 convs. This is the paper's
Table 1 model (VGG-11 with BN, all eight convs replaced; lambda 0.5, K 9, cosine similarity, all candidates; "PE" =
coordinate channels appended to the similarity features).

Paper: "Attention Via Convolutional Nearest Neighbors", Mingi Kang, Jeova Farias Sales Rocha Neto,
https://arxiv.org/abs/2511.14137. CIFAR-sized (32 x 32) input works as is: timm's VGG head pools small maps.
"""
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vgg import VGG, cfgs as _vgg_cfgs

from ._cnn import CONVNN_CNN_KWARGS, ConvNNConvFactory, cnn_checkpoint_filter_fn, unwrap_state_dict
from ._pretrained import WARM_START_PREFIX, explain_load_errors, warm_start_cfg

__all__ = ['checkpoint_filter_fn']

_MODES = {
    'convnn': dict(),
    'convnn_branch': dict(branch_ratio=0.5),
    'convnn_branch_pe': dict(branch_ratio=0.5, coords='append'),
}


# torchvision's VGG classifier (Linear 512*7*7 -> 4096, Linear 4096 -> 4096, Linear 4096 -> classes) is timm's VGG
# pre-logits ConvMlp (7x7 conv, 1x1 conv) and head: prefix in torchvision -> (prefix in timm, conv weight shape)
_TORCHVISION_CLASSIFIER = {
    'classifier.0.': ('pre_logits.fc1.', (512, 7, 7)),
    'classifier.3.': ('pre_logits.fc2.', (4096, 1, 1)),
    'classifier.6.': ('head.fc.', None),
}


def _torchvision_to_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix, (timm_prefix, conv_shape) in _TORCHVISION_CLASSIFIER.items():
            if key.startswith(prefix):
                key = timm_prefix + key[len(prefix):]
                if conv_shape is not None and key.endswith('.weight'):
                    value = value.reshape(-1, *conv_shape)
                break
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VGG) -> Dict[str, torch.Tensor]:
    """timm or torchvision VGG checkpoints (torchvision's classifier becomes timm's pre-logits and head), or our own."""
    return cnn_checkpoint_filter_fn(_torchvision_to_timm(unwrap_state_dict(state_dict)), model)


def _create_vgg_convnn(variant: str, pretrained: bool = False, **kwargs) -> VGG:
    if 'conv_layer' in kwargs:
        raise TypeError(f'{variant} builds its own ConvNN layers; conv_layer= cannot be passed')
    convnn = ConvNNConvFactory(**{k: kwargs.pop(k) for k in CONVNN_CNN_KWARGS if k in kwargs})
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3, 4, 5))
    with explain_load_errors(variant, pretrained, kwargs):
        return build_model_with_cfg(
            VGG,
            variant,
            pretrained,
            model_cfg=_vgg_cfgs[variant.split('_')[0]],
            feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
            pretrained_filter_fn=checkpoint_filter_fn,
            conv_layer=convnn,
            **kwargs,
        )


def _vgg_convnn(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> VGG:
    model_args = dict(norm_layer=nn.BatchNorm2d, **_MODES[variant.split('_', 1)[1]])
    model_args.update(kwargs)
    return _create_vgg_convnn(variant, pretrained=pretrained, **model_args)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        # (timm adapts these stem convs to other in_chans; the ConvNN stems' weights: checkpoint_filter_fn)
        'first_conv': 'features.0.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2511.14137', 'paper_name': 'Attention Via Convolutional Nearest Neighbors',
        'origin_url': 'https://github.com/mingikang31/Convolutional-Nearest-Neighbor',
        **kwargs,
    }


# warm-start weights: timm's (torchvision's) VGG-11-BN ImageNet-1k weights (see _pretrained.py)
_NEW = 'the ConvNN layers that replace every 3x3 conv'
_TAG = f'{WARM_START_PREFIX}tv_in1k'
default_cfgs = generate_default_cfgs({
    f'vgg11_convnn.{_TAG}': warm_start_cfg(_cfg(first_conv=()), 'vgg11_bn.tv_in1k', _NEW),
    f'vgg11_convnn_branch.{_TAG}': warm_start_cfg(_cfg(), 'vgg11_bn.tv_in1k', _NEW),
    f'vgg11_convnn_branch_pe.{_TAG}': warm_start_cfg(_cfg(), 'vgg11_bn.tv_in1k', _NEW),
})


@register_model
def vgg11_convnn(pretrained: bool = False, **kwargs) -> VGG:
    """VGG-11-BN, every 3x3 conv replaced by ConvNN (all candidates, K 9, cosine)."""
    return _vgg_convnn('vgg11_convnn', pretrained, kwargs)


@register_model
def vgg11_convnn_branch(pretrained: bool = False, **kwargs) -> VGG:
    """VGG-11-BN, every 3x3 conv replaced by the ConvNN / conv hybrid (lambda 0.5, all candidates, K 9, cosine)."""
    return _vgg_convnn('vgg11_convnn_branch', pretrained, kwargs)


@register_model
def vgg11_convnn_branch_pe(pretrained: bool = False, **kwargs) -> VGG:
    """VGG-11-BN hybrid as ``vgg11_convnn_branch`` plus coordinate channels in the similarity (paper's "with PE")."""
    return _vgg_convnn('vgg11_convnn_branch_pe', pretrained, kwargs)
