""" Vision Transformer with ConvNN token mixing.

timm's own ``VisionTransformer`` (not a fork; ``VisionTransformerConvNN`` only extends ``__init__``, handing the layers
the token layout, and ``set_input_size``) whose blocks mix tokens with ``ConvNNAttention``: for each token the top-K
candidates by q/k similarity are weighted by a softmax over their scores and aggregated by a depthwise Conv1d(kernel
K, stride K) initialised to ones. With K = n this is exactly the ViT's attention, so timm ViT weights give a faithful
warm start (``checkpoint_filter_fn``).

Paper: "Attention Via Convolutional Nearest Neighbors", Mingi Kang, Jeova Farias Sales Rocha Neto,
https://arxiv.org/abs/2511.14137.
Reference code: https://github.com/mingikang31/Convolutional-Nearest-Neighbor-Attention (re-implemented here; the
differences are listed in ``timm_convnn/layers/attention.py``).

Variants (patch 16, 224 px):
``vit_{tiny,small,base}_convnn_{all,all_k16,random,random_k16,spatial,spatial_k16,branch}``.
Every ConvNN option is also a model kwarg: ``num_neighbors``, ``candidates``, ``num_samples``, ``similarity``,
``weighting``, ``aggregation``, ``coords``, ``coord_scale``, ``neighbor_order``, ``branch_ratio``.
"""
import logging
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import LayerNorm, Mlp, PatchEmbed, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

from ..layers import ConvNNAttention, ConvNNBranchAttention
from ..layers.attention import TokenGrid, record_token_grid
from ._pretrained import WARM_START_PREFIX, explain_load_errors, warm_start_cfg

__all__ = ['ConvNNBlock', 'VisionTransformerConvNN', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)

# ConvNN options accepted as model kwargs (JSON-serialisable, so they round-trip through Hub config.json model_args)
CONVNN_KWARGS = (
    'num_neighbors', 'candidates', 'num_samples', 'similarity', 'weighting', 'aggregation', 'coords', 'coord_scale',
    'neighbor_order', 'branch_ratio',
)

_SIZES = {
    'tiny': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'small': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'base': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
_MODES = {  # paper ViT defaults (dot similarity, softmax weights, unit depthwise aggregation) come from the layer
    'all': dict(candidates='all', num_neighbors=9),
    'all_k16': dict(candidates='all', num_neighbors=16),
    'random': dict(candidates='random', num_neighbors=9, num_samples=32),
    'random_k16': dict(candidates='random', num_neighbors=16, num_samples=32),
    'spatial': dict(candidates='spatial', num_neighbors=9, num_samples=128),
    'spatial_k16': dict(candidates='spatial', num_neighbors=16, num_samples=128),
    'branch': dict(candidates='all', num_neighbors=9, branch_ratio=0.5),
}


class _NoAttention(nn.Identity):
    """Stand-in handed to ``Block.__init__`` so it does not build (and initialise) an attention we replace."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()


class ConvNNBlock(Block):
    """timm's pre-norm ViT ``Block`` with a ConvNN token mixer, given to ``VisionTransformer`` as ``block_fn``.

    Takes ``Block``'s arguments plus the ConvNN options; the block index (``depth``) seeds the layer's eval-mode
    random candidates so that layers sample different tokens. ``branch_ratio`` selects ``ConvNNBranchAttention``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            init_values: Optional[float] = None,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            attn_layer: Any = None,
            depth: int = 0,
            branch_ratio: Optional[float] = None,
            device=None,
            dtype=None,
            **convnn_kwargs,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_attn_norm=scale_attn_norm,
            scale_mlp_norm=scale_mlp_norm, proj_bias=proj_bias, proj_drop=proj_drop, attn_drop=attn_drop,
            init_values=init_values, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer,
            mlp_layer=mlp_layer, attn_layer=_NoAttention, depth=depth, **dd)
        attn_kwargs = dict(
            num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm, proj_bias=proj_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, sample_seed=depth, **convnn_kwargs, **dd)
        if branch_ratio is None:
            self.attn = ConvNNAttention(dim, **attn_kwargs)
        else:
            self.attn = ConvNNBranchAttention(dim, branch_ratio=branch_ratio, **attn_kwargs)


@register_notrace_module
class GridPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` as the patch embedding of a ``dynamic_img_size`` ConvNN ViT, whose forward hook
    (``record_token_grid``) records each input's patch grid for the ConvNN layers. The subclass only makes it an FX
    leaf module: a graph traced with timm's FX helpers (``create_feature_extractor``, ``features_only=True,
    feature_cls='fx'``) then calls the module, and its hook, on every run (traced through, the hook saw FX proxies
    and failed, and a graph would not record the grid)."""


class VisionTransformerConvNN(VisionTransformer):
    """timm's ``VisionTransformer`` built with ``ConvNNBlock``s. The one addition: the ConvNN layers get the model's
    token layout, however their blocks were built: the number of prefix (class / register) tokens, which are always
    candidates, and the patch grid, which spatial candidates and coordinates follow (from the patch embedding, again
    on ``set_input_size``; ``dynamic_img_size`` models record it on every forward)."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get('dynamic_img_size') and kwargs.get('embed_layer', PatchEmbed) is PatchEmbed:
            kwargs['embed_layer'] = GridPatchEmbed
        super().__init__(*args, **kwargs)
        # dynamic_img_size: the patch embedding records the patch grid of every forward for the layers (the token
        # count does not determine the 2-D layout: 144 patches are 12 x 12 or 9 x 16)
        token_grid = TokenGrid() if self.dynamic_img_size else None
        if token_grid is not None:
            self.patch_embed.token_grid = token_grid
            self.patch_embed.__jit_ignored_attributes__ = ['token_grid']  # the hook records nothing under TorchScript
            self.patch_embed.register_forward_hook(record_token_grid)
        for m in self._convnn_layers():
            m.num_prefix_tokens = self.num_prefix_tokens
            m.token_grid = token_grid
            m.dynamic_grid = token_grid is not None
        self._set_patch_grid()

    def _convnn_layers(self) -> List[ConvNNAttention]:
        return [m for m in self.modules() if isinstance(m, ConvNNAttention)]

    def _set_patch_grid(self) -> None:
        grid = self.patch_embed.grid_size
        for m in self._convnn_layers():
            m.grid_size = (int(grid[0]), int(grid[1])) if grid is not None else None

    def set_input_size(
            self,
            img_size: Optional[Tuple[int, int]] = None,
            patch_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self._set_patch_grid()


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Load timm ViT checkpoints (any layout timm's ViT filter handles) or our own into a ConvNN ViT.

    timm's ViT filter unwraps envelopes, converts foreign layouts and resamples patch / position embeddings. ConvNN
    keeps timm's attention parameter names, so the only tensors a plain ViT checkpoint lacks are the ConvNN
    aggregation weights (``blocks.*.attn.aggregate.weight``): they take the model's initial value (ones), which
    makes a K = n model compute exactly the source ViT. Any other missing or mismatched tensor still fails loading.
    """
    state_dict = _vit_checkpoint_filter_fn(state_dict, model)
    new = [name for name in model.state_dict() if name not in state_dict and '.attn.aggregate.' in name]
    for name in new:
        state_dict[name] = model.state_dict()[name].detach().clone()
    if new:
        _logger.info(f'ConvNN ViT warm start: {len(state_dict) - len(new)} tensors loaded, {len(new)} new ConvNN '
                     f'tensors keep their initialisation ({new[0]}, ...)')
    return state_dict


def _create_vit_convnn(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    for name in ('attn_layer', 'block_fn'):
        if name in kwargs:
            raise TypeError(f'{variant} builds its own ConvNN blocks; {name}= cannot be passed')
    convnn_kwargs = {k: kwargs.pop(k) for k in CONVNN_KWARGS if k in kwargs}
    out_indices = kwargs.pop('out_indices', 3)
    with explain_load_errors(variant, pretrained, kwargs):
        return build_model_with_cfg(
            VisionTransformerConvNN,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            block_fn=partial(ConvNNBlock, **convnn_kwargs),
            **kwargs,
        )


def _vit_convnn(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> VisionTransformer:
    size, mode = variant[len('vit_'):].split('_convnn_')
    model_args = dict(_SIZES[size], **_MODES[mode])
    model_args.update(kwargs)
    return _create_vit_convnn(variant, pretrained=pretrained, **model_args)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN, 'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2511.14137', 'paper_name': 'Attention Via Convolutional Nearest Neighbors',
        'origin_url': 'https://github.com/mingikang31/Convolutional-Nearest-Neighbor-Attention',
        **kwargs,
    }


# warm-start weights: timm's ImageNet-1k ViT of the same size (see _pretrained.py); no ConvNN-trained weights yet
_WARM_START = {
    'tiny': 'vit_tiny_patch16_224.augreg_in21k_ft_in1k',
    'small': 'vit_small_patch16_224.augreg_in21k_ft_in1k',
    'base': 'vit_base_patch16_224.augreg2_in21k_ft_in1k',
}
default_cfgs = generate_default_cfgs({
    f'vit_{size}_convnn_{mode}.{WARM_START_PREFIX}{source.split(".")[1]}': warm_start_cfg(
        _cfg(), source, 'the depthwise aggregation weights (blocks.*.attn.aggregate.weight, init 1)')
    for size, source in _WARM_START.items() for mode in _MODES
})


@register_model
def vit_tiny_convnn_all(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16, ConvNN attention over all tokens, K 9."""
    return _vit_convnn('vit_tiny_convnn_all', pretrained, kwargs)


@register_model
def vit_tiny_convnn_all_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16, ConvNN attention over all tokens, K 16."""
    return _vit_convnn('vit_tiny_convnn_all_k16', pretrained, kwargs)


@register_model
def vit_tiny_convnn_random(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16, ConvNN attention over 32 random candidates, K 9 (the paper's best CIFAR setting)."""
    return _vit_convnn('vit_tiny_convnn_random', pretrained, kwargs)


@register_model
def vit_tiny_convnn_random_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16, ConvNN attention over 32 random candidates, K 16."""
    return _vit_convnn('vit_tiny_convnn_random_k16', pretrained, kwargs)


@register_model
def vit_tiny_convnn_spatial(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16, ConvNN attention over a regular grid of at most 128 candidates, K 9."""
    return _vit_convnn('vit_tiny_convnn_spatial', pretrained, kwargs)


@register_model
def vit_tiny_convnn_spatial_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16, ConvNN attention over a regular grid of at most 128 candidates, K 16."""
    return _vit_convnn('vit_tiny_convnn_spatial_k16', pretrained, kwargs)


@register_model
def vit_tiny_convnn_branch(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16, half of every head's channels ConvNN (all tokens, K 9), half softmax attention."""
    return _vit_convnn('vit_tiny_convnn_branch', pretrained, kwargs)


@register_model
def vit_small_convnn_all(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16, ConvNN attention over all tokens, K 9."""
    return _vit_convnn('vit_small_convnn_all', pretrained, kwargs)


@register_model
def vit_small_convnn_all_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16, ConvNN attention over all tokens, K 16."""
    return _vit_convnn('vit_small_convnn_all_k16', pretrained, kwargs)


@register_model
def vit_small_convnn_random(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16, ConvNN attention over 32 random candidates, K 9."""
    return _vit_convnn('vit_small_convnn_random', pretrained, kwargs)


@register_model
def vit_small_convnn_random_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16, ConvNN attention over 32 random candidates, K 16."""
    return _vit_convnn('vit_small_convnn_random_k16', pretrained, kwargs)


@register_model
def vit_small_convnn_spatial(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16, ConvNN attention over a regular grid of at most 128 candidates, K 9."""
    return _vit_convnn('vit_small_convnn_spatial', pretrained, kwargs)


@register_model
def vit_small_convnn_spatial_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16, ConvNN attention over a regular grid of at most 128 candidates, K 16."""
    return _vit_convnn('vit_small_convnn_spatial_k16', pretrained, kwargs)


@register_model
def vit_small_convnn_branch(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16, half of every head's channels ConvNN (all tokens, K 9), half softmax attention."""
    return _vit_convnn('vit_small_convnn_branch', pretrained, kwargs)


@register_model
def vit_base_convnn_all(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, ConvNN attention over all tokens, K 9."""
    return _vit_convnn('vit_base_convnn_all', pretrained, kwargs)


@register_model
def vit_base_convnn_all_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, ConvNN attention over all tokens, K 16 (the paper's best ImageNet setting)."""
    return _vit_convnn('vit_base_convnn_all_k16', pretrained, kwargs)


@register_model
def vit_base_convnn_random(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, ConvNN attention over 32 random candidates, K 9."""
    return _vit_convnn('vit_base_convnn_random', pretrained, kwargs)


@register_model
def vit_base_convnn_random_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, ConvNN attention over 32 random candidates, K 16."""
    return _vit_convnn('vit_base_convnn_random_k16', pretrained, kwargs)


@register_model
def vit_base_convnn_spatial(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, ConvNN attention over a regular grid of at most 128 candidates, K 9."""
    return _vit_convnn('vit_base_convnn_spatial', pretrained, kwargs)


@register_model
def vit_base_convnn_spatial_k16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, ConvNN attention over a regular grid of at most 128 candidates, K 16."""
    return _vit_convnn('vit_base_convnn_spatial_k16', pretrained, kwargs)


@register_model
def vit_base_convnn_branch(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, half of every head's channels ConvNN (all tokens, K 9), half softmax attention."""
    return _vit_convnn('vit_base_convnn_branch', pretrained, kwargs)
