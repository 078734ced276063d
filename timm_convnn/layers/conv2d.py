""" ConvNN on feature maps: ``ConvNN2d`` (a Conv2d-like layer) and ``ConvNNBranch2d`` (the paper's hybrid). """
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .common import CandidateCache, NeighborAggregation, check_convnn_args, _check_int, refuse_fx_proxies
from .functional import (
    _gather_dot, _select_scored, coordinate_grid, grid_candidates, random_candidates, raster_ids, similarity_features,
    softmax_weights, split_raster)
from .func_support import transforms_active
from .symbolic import size_free

__all__ = ['ConvNN2d', 'ConvNNBranch2d', 'conv2d_weight_to_convnn']


def conv2d_weight_to_convnn(weight: torch.Tensor) -> torch.Tensor:
    """Map a (out, in, k, k) Conv2d kernel onto ConvNN slots: (out, in, k * k), tap (ky, kx) -> slot ky * k + kx.

    This is the slot order of a ``ConvNN2d`` with ``coords='only'``, ``similarity='euclidean'`` and
    ``neighbor_order='position'``, where the k * k selected neighbours of a pixel are its k x k window (k in 1, 3, 5)
    listed in raster order; see ``ConvNN2d.from_conv2d``.
    """
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f'expected a square (out, in, k, k) Conv2d weight, got shape {tuple(weight.shape)}')
    return weight.flatten(2)


@register_notrace_module
class ConvNN2d(nn.Module):
    """Convolutional nearest neighbours on a (B, C, H, W) map.

    Every pixel of the (strided) output grid is a query; its K most similar candidate pixels are aggregated by the
    paper's Conv1d(kernel K, stride K) (``standard``: a full (out, in) map per slot, like a KxK conv; ``depthwise``: one
    weight per channel and slot). Projections are identities (paper §6.1): similarity is computed on the input
    features, optionally with coordinate channels.

    Geometry: the output is ceil(H / stride) x ceil(W / stride) (queries at pixels 0, stride, 2 * stride, ..., the
    output grid of a KxK conv with "same" padding). ``padding`` adds a zero border whose pixels are extra candidates
    in ``'all'`` mode, as in the reference code; this is what makes coordinate ConvNN equal a zero-padded conv.
    ``'random'`` / ``'spatial'`` candidates are drawn from the real (unpadded) map, plus the query pixel itself.

    Args:
        in_channels, out_channels: as Conv2d.
        num_neighbors: K (9 ~ a 3x3 conv). Clamped to the number of candidates on small maps.
        stride: spatial stride of the query grid.
        padding: zero border width (candidates only).
        candidates: ``'all'``, ``'random'`` (num_samples random pixels; fresh in training, fixed in eval) or
            ``'spatial'`` (a regular grid of at most num_samples pixels).
        num_samples: r (>= K) for random / spatial; maps with at most r pixels use all of them.
        similarity: ``'cosine'`` (paper CNN default), ``'dot'`` or ``'euclidean'``.
        weighting: ``'ones'`` (paper CNN default) or ``'softmax'`` over the K kept scores.
        aggregation: ``'standard'`` or ``'depthwise'`` (needs out == in).
        coords: ``'none'``, ``'append'`` (x, y appended to the similarity features, the paper's "PE") or ``'only'``.
        coord_scale: multiplier of the coordinate channels.
        neighbor_order: ``'rank'`` (best first) or ``'position'`` (raster order); default ``'position'`` when
            ``coords='only'``, else ``'rank'``.
        bias: aggregation bias.
        sample_seed: key of the fixed eval-mode random draw.
    """
    __jit_ignored_attributes__ = ['_id_cache']  # read only outside TorchScript (_cached_candidate_ids)

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            num_neighbors: int = 9,
            stride: int = 1,
            padding: int = 0,
            candidates: str = 'all',
            num_samples: int = 64,
            similarity: str = 'cosine',
            weighting: str = 'ones',
            aggregation: str = 'standard',
            coords: str = 'none',
            coord_scale: float = 1.0,
            neighbor_order: Optional[str] = None,
            bias: bool = True,
            sample_seed: int = 0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if neighbor_order is None:
            neighbor_order = 'position' if coords == 'only' else 'rank'
        check_convnn_args(
            num_neighbors, candidates, num_samples, similarity, weighting, aggregation, coords, neighbor_order,
            coord_scale, sample_seed)
        _check_int('in_channels', in_channels, 1)
        _check_int('out_channels', out_channels, 1)
        _check_int('stride', stride, 1)
        _check_int('padding', padding, 0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_neighbors = num_neighbors
        self.stride = stride
        self.padding = padding
        self.candidates = candidates
        self.num_samples = num_samples
        self.similarity = similarity
        self.weighting = weighting
        self.aggregation = aggregation
        self.coords = coords
        self.coord_scale = coord_scale
        self.neighbor_order = neighbor_order
        self.sample_seed = sample_seed
        self._id_cache = CandidateCache()
        self.aggregate = NeighborAggregation(
            in_channels, out_channels, num_neighbors, groups=1, depthwise=aggregation == 'depthwise', bias=bias,
            init='unit' if aggregation == 'depthwise' else 'default', device=device, dtype=dtype)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> 'ConvNN2d':
        """The ConvNN2d that computes exactly what ``conv`` computes (weights copied).

        Coordinate-only euclidean similarity picks each pixel's k x k window, ``ones`` weighting and raster slot
        order make the aggregation the conv itself. Supports square odd kernels k in (1, 3, 5) (for larger k the
        k x k window is not a euclidean ball), padding k // 2 with zeros, no dilation or groups.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f'from_conv2d takes an nn.Conv2d; got {type(conv).__name__}')
        if isinstance(conv.weight, nn.parameter.UninitializedParameter):
            raise ValueError('from_conv2d needs an initialised conv: run a forward through the LazyConv2d first')
        if type(conv).forward is not nn.Conv2d.forward:  # (e.g. timm's StdConv2d standardises its weight first)
            raise TypeError(f'from_conv2d maps nn.Conv2d\'s own convolution; {type(conv).__name__} computes another')
        k = conv.kernel_size[0]
        if conv.kernel_size != (k, k) or k not in (1, 3, 5):
            raise ValueError(f'from_conv2d supports square kernels 1, 3 or 5; got kernel_size={conv.kernel_size}')
        padding = conv.padding
        if isinstance(padding, str):  # 'same': k // 2 on every side for odd k (at stride 1 only); 'valid': none
            padding = (k // 2, k // 2) if padding == 'same' else (0, 0)
        if padding != (k // 2, k // 2) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(
                f'from_conv2d needs padding={k // 2}, dilation=1, groups=1; got padding={conv.padding!r}, '
                f'dilation={conv.dilation}, groups={conv.groups}')
        if conv.stride[0] != conv.stride[1]:
            raise ValueError(f'from_conv2d needs equal strides; got stride={conv.stride}')
        if conv.padding_mode != 'zeros':  # ConvNN2d's border candidates are zero pixels
            raise ValueError(f"from_conv2d needs padding_mode='zeros'; got padding_mode={conv.padding_mode!r}")
        w = conv.weight
        m = cls(
            conv.in_channels, conv.out_channels, num_neighbors=k * k, stride=conv.stride[0], padding=k // 2,
            similarity='euclidean', weighting='ones', aggregation='standard', coords='only',
            bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.aggregate.weight.copy_(conv2d_weight_to_convnn(w))
            if conv.bias is not None:
                m.aggregate.bias.copy_(conv.bias)
        return m

    def _candidate_ids(self, height: int, width: int, device: torch.device) -> Optional[torch.Tensor]:
        """Candidate pixel ids in the padded raster, shared by all queries, or None for every padded pixel. Lists that
        are the same at every call (spatial; random in eval) are made once (``CandidateCache``)."""
        if self.candidates == 'all':
            return None
        if not torch.jit.is_scripting():
            if CandidateCache.serves(self.candidates, self.training, height, width):
                return self._cached_candidate_ids(height, width, device)
        return self._make_candidate_ids(height, width, device)

    @torch.jit.unused
    def _cached_candidate_ids(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (self.candidates, height, width, self.padding, self.num_samples, self.sample_seed, device)
        return self._id_cache.get(key, lambda: self._make_candidate_ids(height, width, device))

    def _make_candidate_ids(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        p = self.padding
        wp = width + 2 * p
        n = height * width
        if self.candidates == 'spatial' and (size_free(n) or self.num_samples < n):
            return grid_candidates(height, width, self.num_samples, wp, p * wp + p, device)
        if size_free(n) or self.num_samples < n:  # (exported for every size: min(r, n) ids, no guard on the size)
            flat = random_candidates(n, self.num_samples, 0, self.training, self.sample_seed, device)
        else:
            flat = torch.arange(n, device=device)
        row, col = split_raster(flat, width)
        return (row + p) * wp + col + p

    @torch.jit.unused
    def _refuse_fx(self, x: torch.Tensor) -> None:
        refuse_fx_proxies('ConvNN2d', x)

    @torch.jit.unused
    def _channels_last(self, x: torch.Tensor) -> bool:
        """Whether x is channels-last (and not also contiguous): the output keeps that memory format. Not under
        ``torch.func`` transforms, whose batched tensors cannot answer the query (the output is contiguous there)."""
        if transforms_active():
            return False
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    @torch.jit.unused
    def _check_operand(self, x: torch.Tensor) -> None:
        """x has the layer's device, and its dtype unless autocast decides the dtypes, as ``nn.Conv2d`` requires (the
        aggregation casts its weights to the values' dtype: an integer input gave integer zeros, a meta input on a
        CPU layer a CPU tensor of the bias)."""
        weight = self.aggregate.weight
        if x.device != weight.device:
            raise ValueError(f'ConvNN2d: input on {x.device}, weights on {weight.device}; move one of them')
        if not x.is_floating_point():
            raise TypeError(f'ConvNN2d expects floating-point input; got {x.dtype}')
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f'ConvNN2d: input {x.dtype} and weights {weight.dtype} should be the same dtype (as '
                            f'nn.Conv2d requires), or run under torch.autocast')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._refuse_fx(x)
            self._check_operand(x)
        if x.dim() != 4:
            raise ValueError('ConvNN2d expects (B, C, H, W) input, got a ' + str(x.dim()) + '-D tensor')
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError('ConvNN2d expects ' + str(self.in_channels) + ' input channels, got ' + str(C))
        if H < 1 or W < 1:  # (no candidate to take; nn.Conv2d refuses such maps too)
            raise ValueError('ConvNN2d expects a map of at least 1 x 1, got ' + str(H) + ' x ' + str(W))
        p, s = self.padding, self.stride
        if torch.jit.is_scripting():
            channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else:
            channels_last = self._channels_last(x)
        if p > 0:
            x = F.pad(x, (p, p, p, p))
        hp, wp = H + 2 * p, W + 2 * p
        tokens = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, Mp, C)
        ho, wo = (H + s - 1) // s, (W + s - 1) // s
        rows, cols = torch.arange(ho, device=x.device) * s + p, torch.arange(wo, device=x.device) * s + p
        query_index = raster_ids(rows, cols, wp)

        feat = tokens
        if self.coords != 'none':
            coord = coordinate_grid(hp, wp, x.device, x.dtype) * self.coord_scale
            coord = coord.view(1, 1, hp * wp, 2).expand(B, 1, hp * wp, 2)
            feat = coord if self.coords == 'only' else torch.cat([tokens, coord], dim=-1)
        qs, ks = similarity_features(feat.index_select(2, query_index), feat, self.similarity)

        cand = self._candidate_ids(H, W, x.device)
        idx, scores = _select_scored(
            qs, ks, self.num_neighbors, cand, query_index if cand is not None else None)
        if self.neighbor_order == 'position':
            idx, order = idx.sort(dim=-1)
            scores = scores.gather(-1, order)
        rho: Optional[torch.Tensor] = None
        if self.weighting == 'softmax':
            rho = softmax_weights(_gather_dot(qs, ks, idx, scores=scores))
        out = self.aggregate(tokens, idx, rho)  # (B, 1, Nq, out)
        out = out.view(B, ho, wo, self.out_channels).permute(0, 3, 1, 2)  # (channels-last strides)
        if channels_last:
            return out
        return out.contiguous()  # the input's memory format, as nn.Conv2d returns it (view(B, -1) works)

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, num_neighbors={self.num_neighbors}, stride={self.stride}, '
             f'padding={self.padding}, candidates={self.candidates!r}')
        if self.candidates != 'all':
            s += f', num_samples={self.num_samples}'
        s += f', similarity={self.similarity!r}, weighting={self.weighting!r}, aggregation={self.aggregation!r}'
        if self.coords != 'none':
            s += f', coords={self.coords!r}'
        return s


class ConvNNBranch2d(nn.Module):
    """The paper's hybrid branching layer (§4.2.3): ConvNN and Conv2d side by side, fused by a 1x1 conv.

    A fraction ``branch_ratio`` (lambda) of the output channels comes from ``ConvNN2d`` (``convnn``), the rest from a
    same-padded ``nn.Conv2d`` (``conv``); both see all input channels; outputs are concatenated ConvNN-first and fused
    by a 1x1 conv (``fuse``, kept at lambda 0 and 1 as in the paper). lambda = 0 builds no ConvNN path, lambda = 1 no
    conv path. ConvNN channels = round(lambda * out_channels). ``dilation`` applies to the conv path (padded to keep
    "same" geometry); both paths give a ceil(H / stride) x ceil(W / stride) output.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: int = 1,
            branch_ratio: float = 0.5,
            num_neighbors: int = 9,
            candidates: str = 'all',
            num_samples: int = 64,
            similarity: str = 'cosine',
            weighting: str = 'ones',
            aggregation: str = 'standard',
            coords: str = 'none',
            coord_scale: float = 1.0,
            neighbor_order: Optional[str] = None,
            bias: bool = True,
            sample_seed: int = 0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if isinstance(branch_ratio, bool) or not isinstance(branch_ratio, (int, float)):
            raise TypeError(f'branch_ratio (lambda) must be a float in [0, 1]; got {branch_ratio!r}')
        if not 0. <= branch_ratio <= 1.:
            raise ValueError(f'branch_ratio (lambda) must be in [0, 1]; got {branch_ratio}')
        _check_int('kernel_size', kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd (same padding); got {kernel_size}')
        _check_int('in_channels', in_channels, 1)
        _check_int('out_channels', out_channels, 1)
        _check_int('dilation', dilation, 1)
        _check_int('stride', stride, 1)
        # (checked here too: without ConvNN channels, at lambda 0 or one that rounds to none, no ConvNN2d is built)
        check_convnn_args(
            num_neighbors, candidates, num_samples, similarity, weighting, aggregation, coords,
            neighbor_order or 'rank', coord_scale, sample_seed)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.branch_ratio = float(branch_ratio)
        self.convnn_channels = int(round(branch_ratio * out_channels))
        self.conv_channels = out_channels - self.convnn_channels
        if aggregation == 'depthwise' and 0 < self.convnn_channels != in_channels:
            raise ValueError(
                f"aggregation='depthwise' needs the ConvNN branch's output channels, round(branch_ratio * "
                f'out_channels) = {self.convnn_channels}, to equal in_channels={in_channels} (use aggregation='
                f'"standard")')
        pad = kernel_size // 2
        self.convnn = ConvNN2d(
            in_channels, self.convnn_channels, num_neighbors=num_neighbors, stride=stride, padding=pad,
            candidates=candidates, num_samples=num_samples, similarity=similarity, weighting=weighting,
            aggregation=aggregation, coords=coords, coord_scale=coord_scale, neighbor_order=neighbor_order,
            bias=bias, sample_seed=sample_seed, **dd,
        ) if self.convnn_channels > 0 else None
        self.conv = nn.Conv2d(
            in_channels, self.conv_channels, kernel_size, stride=stride, padding=pad * dilation, dilation=dilation,
            bias=bias, **dd,
        ) if self.conv_channels > 0 else None
        self.fuse = nn.Conv2d(out_channels, out_channels, 1, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: List[torch.Tensor] = []
        if self.convnn is not None:
            outs.append(self.convnn(x))
        if self.conv is not None:
            outs.append(self.conv(x))
        x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.fuse(x)
