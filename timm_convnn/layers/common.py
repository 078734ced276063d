""" Pieces shared by the ConvNN modules: argument checking, the neighbour aggregation layer and the cache of fixed
candidate lists. """
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .functional import _check_int, _neighbor_aggregate
from .symbolic import capturing

__all__ = ['CANDIDATE_MODES', 'SIMILARITIES', 'WEIGHTINGS', 'AGGREGATIONS', 'COORD_MODES', 'NEIGHBOR_ORDERS',
           'check_convnn_args', 'NeighborAggregation', 'CandidateCache', 'refuse_fx_proxies']

CANDIDATE_MODES = ('all', 'random', 'spatial')
SIMILARITIES = ('cosine', 'dot', 'euclidean')
WEIGHTINGS = ('softmax', 'ones')
AGGREGATIONS = ('depthwise', 'standard')
COORD_MODES = ('none', 'append', 'only')
NEIGHBOR_ORDERS = ('rank', 'position')


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f'{name} must be one of {", ".join(repr(c) for c in choices)}; got {value!r}')


def check_convnn_args(
        num_neighbors: int,
        candidates: str,
        num_samples: int,
        similarity: str,
        weighting: str,
        aggregation: str,
        coords: str,
        neighbor_order: str,
        coord_scale: float = 1.0,
        sample_seed: int = 0,
) -> None:
    """Validate the ConvNN options; raises ValueError/TypeError naming the argument and the valid range."""
    _check_int('num_neighbors (K)', num_neighbors, 1)
    _check_int('sample_seed', sample_seed, None)
    _check_choice('candidates', candidates, CANDIDATE_MODES)
    if candidates != 'all':
        _check_int('num_samples (r)', num_samples, 1)
        if num_samples < num_neighbors:
            raise ValueError(
                f'num_samples (r) must be >= num_neighbors (K) for candidates={candidates!r}: '
                f'got r={num_samples} < K={num_neighbors}')
    _check_choice('similarity', similarity, SIMILARITIES)
    _check_choice('weighting', weighting, WEIGHTINGS)
    _check_choice('aggregation', aggregation, AGGREGATIONS)
    _check_choice('coords', coords, COORD_MODES)
    _check_choice('neighbor_order', neighbor_order, NEIGHBOR_ORDERS)
    if isinstance(coord_scale, bool) or not isinstance(coord_scale, (int, float)):
        raise TypeError(f'coord_scale must be a finite real number; got {type(coord_scale).__name__} {coord_scale!r}')
    if not math.isfinite(coord_scale):
        raise ValueError(f'coord_scale must be a finite real number; got {coord_scale}')


def refuse_fx_proxies(layer: str, *values) -> None:
    """A TypeError that says what to use instead when ``torch.fx.symbolic_trace`` traces into a ConvNN layer (its
    inputs are then FX proxies): its neighbour selection runs over data-dependent sizes, which FX cannot record."""
    if any(isinstance(v, torch.fx.Proxy) for v in values):
        raise TypeError(
            f'{layer} cannot be traced through by torch.fx.symbolic_trace (its neighbour selection runs over '
            'data-dependent sizes). timm\'s FX helpers keep ConvNN layers as leaf modules: '
            'timm.models.get_graph_node_names / create_feature_extractor, features_only=True with feature_cls=\'fx\', '
            'or a torch.fx.Tracer whose is_leaf_module is true for them; torch.export and torch.compile capture them')


class CandidateCache:
    """The candidate lists of a layer that are the same at every call: the spatial grid, and the fixed hashed draw of
    ``random`` candidates in eval (training draws afresh each call). Making one is a dozen small tensor ops (about
    60-85 us per layer on a CPU, as many kernel launches on a GPU) for a few hundred ids, so the layer makes each once
    per key (the layer's settings, the map size, the device) and reuses it.

    Not used while torch compiles, exports or traces the layer (the graph then computes the list, and folds it where
    it is constant), under TorchScript, or for sizes that are not plain ints. Lists made under
    ``torch.inference_mode`` are inference tensors, which autograd may not save, so the inference mode is part of the
    key."""
    max_entries = 16  # (e.g. a model run at several input sizes); more: start afresh

    def __init__(self) -> None:
        self.lists: Dict[Tuple, torch.Tensor] = {}

    @staticmethod
    def serves(candidates: str, training: bool, *sizes) -> bool:
        """Whether a layer's ``candidates`` list is the same at every call (spatial; random in eval) and is kept here
        for this call (map sizes ``sizes`` plain ints, not compiling or tracing)."""
        fixed = candidates == 'spatial' or (candidates == 'random' and not training)
        return fixed and all(type(n) is int for n in sizes) and not capturing()

    def get(self, key: Tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = key + (torch.is_inference_mode_enabled(),)
        ids = self.lists.get(key)
        if ids is None:
            if len(self.lists) >= self.max_entries:
                self.lists.clear()
            ids = self.lists[key] = make()
        return ids


class NeighborAggregation(nn.Module):
    """The paper's Conv1d(kernel K, stride K) over each query's neighbour sequence, without building that sequence.

    Parameters have exactly the shapes of the equivalent ``nn.Conv1d`` (``weight`` (out, in / conv_groups, K),
    optional ``bias``), where ``conv_groups`` is ``channels`` for depthwise and ``groups`` for standard
    aggregation; ``groups`` is the number of independent token groups (attention heads; 1 for images).

    Init ``'unit'``: depthwise weights 1 and standard weights the identity at every slot (so that ConvNN with K = n
    and softmax weights is attention); ``'default'``: ``nn.Conv1d``'s own init (for convolution-like use).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            num_neighbors: int,
            groups: int = 1,
            depthwise: bool = True,
            bias: bool = False,
            init: str = 'unit',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_int('in_channels', in_channels, 1)
        _check_int('out_channels', out_channels, 1)
        _check_int('num_neighbors (K)', num_neighbors, 1)
        _check_int('groups', groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f'in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})')
        if depthwise and in_channels != out_channels:
            raise ValueError(
                f'depthwise aggregation needs out_channels == in_channels; got in_channels={in_channels}, '
                f'out_channels={out_channels} (use aggregation="standard")')
        _check_choice('init', init, ('unit', 'default'))
        if init == 'unit' and in_channels != out_channels:
            raise ValueError(f'init="unit" needs out_channels == in_channels; got {in_channels} -> {out_channels}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_neighbors = num_neighbors
        self.groups = groups
        self.depthwise = depthwise
        self.init = init
        fan_in = 1 if depthwise else in_channels // groups
        self.weight = nn.Parameter(torch.empty(out_channels, fan_in, num_neighbors, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == 'unit':
            with torch.no_grad():
                if self.depthwise:
                    self.weight.fill_(1.)
                else:
                    g, c = self.groups, self.in_channels // self.groups
                    eye = torch.eye(c, device=self.weight.device, dtype=self.weight.dtype)
                    self.weight.copy_(eye.repeat(g, 1).unsqueeze(-1).expand_as(self.weight))
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                fan_in = self.weight.shape[1] * self.weight.shape[2]
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)

    def init_weights(self) -> None:
        # called by timm's ViT init (init_weights_vit_timm) instead of its Linear init
        self.reset_parameters()

    def forward(self, v: torch.Tensor, idx: torch.Tensor, rho: Optional[torch.Tensor]) -> torch.Tensor:
        """v (B, G, M, C_in / G), idx/rho (B, G, N, K') with K' <= K -> (B, G, N, C_out / G).

        The shapes are checked (ValueError naming them); the id values are not, as reading them back costs a host
        synchronisation on CUDA at every layer call: the layers' selections make them in [0, M). For ids from
        elsewhere, ``functional.neighbor_aggregate`` checks them."""
        if not torch.jit.is_scripting() and not capturing():
            self._check_call(v, idx, rho)
        g = self.groups
        k_eff = idx.shape[-1]
        if self.depthwise:
            weight = self.weight.view(g, self.in_channels // g, self.num_neighbors)[:, :, :k_eff]
        else:
            weight = self.weight.view(
                g, self.out_channels // g, self.in_channels // g, self.num_neighbors)[:, :, :, :k_eff]
        out = _neighbor_aggregate(v, idx, rho, weight, self.depthwise)
        if self.bias is not None:
            out = out + self.bias.view(g, 1, self.out_channels // g).to(out.dtype)
        return out

    @torch.jit.unused
    def _check_call(self, v: torch.Tensor, idx: torch.Tensor, rho: Optional[torch.Tensor]) -> None:
        g, c = self.groups, self.in_channels // self.groups
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f'NeighborAggregation: idx must be integer token ids; got {idx.dtype}')
        if (v.dim() != 4 or idx.dim() != 4 or v.shape[:2] != idx.shape[:2] or v.shape[1] != g or v.shape[3] != c
                or idx.shape[3] > self.num_neighbors or (rho is not None and rho.shape != idx.shape)):
            raise ValueError(
                f'NeighborAggregation({self.in_channels}, {self.out_channels}, num_neighbors={self.num_neighbors}, '
                f'groups={g}) takes v (B, {g}, M, {c}), idx (B, {g}, N, K\') with K\' <= {self.num_neighbors}'
                f'{" and rho shaped like idx" if rho is not None else ""}; got v {tuple(v.shape)}, idx '
                f'{tuple(idx.shape)}' + (f', rho {tuple(rho.shape)}' if rho is not None else ''))

    def extra_repr(self) -> str:
        kind = 'depthwise' if self.depthwise else 'standard'
        return (f'{self.in_channels}, {self.out_channels}, num_neighbors={self.num_neighbors}, groups={self.groups}, '
                f'{kind}, bias={self.bias is not None}')
