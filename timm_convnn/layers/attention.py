""" ConvNN attention: a drop-in replacement for ``timm.layers.Attention``.

Same constructor arguments, same parameter names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``) and
the same forward signature as timm's ``Attention``, so timm ViT weights load unchanged; the only new parameter is
``aggregate.weight``, the per-channel, per-slot weights of the paper's depthwise Conv1d (init 1).

Per head, token i keeps its top-K candidates by similarity of q_i and k_j, weights them by a softmax over the K
kept scores (or ones) and aggregates their values. With K = n, ``dot`` similarity, softmax and unit depthwise
weights this is exactly multi-head attention (tested against timm's ``Attention``).

Fixes relative to the authors' code (``shared/reference/convnn_spec.md`` §8): q projects queries and k projects
candidates (the reference swaps the names); heads are split and merged like timm's attention (the reference
scrambles tokens for more than one head); softmax is over the K slots; random candidates are fresh in training and
a fixed hashed draw in eval (deterministic); the query token and the prefix (class / register) tokens are always
candidates; depthwise weights are per channel (not shared across heads).
"""
import inspect
import numbers
import warnings
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, register_notrace_module

from . import triton_attention
from .common import CandidateCache, NeighborAggregation, _check_int, check_convnn_args, refuse_fx_proxies
from .functional import (
    _gather_dot, _select_scored, coordinate_grid, dot_scale, grid_candidates, random_candidates, similarity_features,
    softmax_weights)
from .symbolic import size_free

__all__ = ['ConvNNAttention', 'ConvNNBranchAttention', 'TokenGrid', 'record_token_grid']


class TokenGrid:
    """The (rows, cols) patch grid of the forward in progress, shared by a ViT's patch embedding, whose forward hook
    ``record_token_grid`` writes it, and the model's ConvNN layers, which read it (spatial candidates, coordinates).

    For ``dynamic_img_size`` models: every input size gives another grid, and the token count alone does not tell
    which (144 patches: 12 x 12, or 9 x 16 from a 144 x 256 image).
    """

    def __init__(self) -> None:
        self.hw: Optional[Tuple[int, int]] = None


def record_token_grid(module: nn.Module, args: Tuple[torch.Tensor], output: torch.Tensor) -> None:
    """Forward hook of a patch embedding with NHWC output (timm's ViT under ``dynamic_img_size``): records its
    (H, W) in the embedding's ``token_grid`` (a ``TokenGrid``). Under TorchScript nothing is recorded and the layers
    fall back to their ``grid_size`` / a square map."""
    if not torch.jit.is_scripting():
        _record_grid(module, output)


@torch.jit.unused
def _record_grid(module: nn.Module, output: torch.Tensor) -> None:
    if output.dim() == 4:
        h, w = output.shape[1], output.shape[2]
        if not isinstance(h, torch.SymInt):  # (symbolic under torch.export with a dynamic image size: kept so)
            h, w = int(h), int(w)
        module.token_grid.hw = (h, w)


@register_notrace_module
class ConvNNAttention(nn.Module):
    """Multi-head ConvNN token mixer with timm ``Attention``'s interface.

    Args (beyond timm ``Attention``'s):
        num_neighbors: K, neighbours kept per query (clamped to the number of candidates).
        candidates: ``'all'`` tokens, a ``'random'`` subset of ``num_samples`` patch tokens, or a ``'spatial'`` regular
            grid of at most ``num_samples`` points on the 2-D patch map. Prefix tokens and the query itself are always
            candidates; when ``num_samples`` >= the number of patch tokens all tokens are used.
        num_samples: r, candidate count for ``random`` / ``spatial`` (must be >= K).
        similarity: ``'dot'`` (scaled by 1/sqrt(d)), ``'cosine'`` or ``'euclidean'`` (negative squared distance).
        weighting: ``'softmax'`` over the K kept scores, or ``'ones'``.
        aggregation: ``'depthwise'`` (one weight per channel and slot, init 1) or ``'standard'`` (a full d x d map per
            head and slot, init identity).
        coords: ``'none'``, ``'append'`` (normalised x, y of each patch appended to q and k for similarity only) or
            ``'only'`` (similarity from coordinates alone). Prefix tokens sit at the map centre.
        coord_scale: multiplier of the coordinate channels.
        neighbor_order: slot order fed to the aggregation: ``'rank'`` (best first) or ``'position'`` (token order).
        num_prefix_tokens: leading non-patch tokens (class, registers); set by the model.
        grid_size: (rows, cols) of the patch map, used when it matches the token count; otherwise a square map is
            assumed, or a single raster row (with a warning) when the count is not square. A ``token_grid``
            (``TokenGrid``) attribute, which ViT models with ``dynamic_img_size`` share with their patch embedding,
            takes precedence.
        sample_seed: key of the fixed eval-mode random draw (models give each layer its own).
    """
    grid_size: Optional[Tuple[int, int]]
    dynamic_grid: bool
    # read only outside TorchScript (_recorded_grid, _cached_candidate_ids)
    __jit_ignored_attributes__ = ['token_grid', '_id_cache']

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_head_dim: Optional[int] = None,
            dim_out: Optional[int] = None,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            gated: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            num_neighbors: int = 9,
            candidates: str = 'all',
            num_samples: int = 32,
            similarity: str = 'dot',
            weighting: str = 'softmax',
            aggregation: str = 'depthwise',
            coords: str = 'none',
            coord_scale: float = 1.0,
            neighbor_order: str = 'rank',
            num_prefix_tokens: int = 0,
            grid_size: Optional[Tuple[int, int]] = None,
            sample_seed: int = 0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_convnn_args(
            num_neighbors, candidates, num_samples, similarity, weighting, aggregation, coords, neighbor_order,
            coord_scale, sample_seed)
        _check_int('num_prefix_tokens', num_prefix_tokens, 0)
        _check_int('dim', dim, 1)
        if dim_out is not None:
            _check_int('dim_out', dim_out, 1)
        if grid_size is not None:
            if not (isinstance(grid_size, (tuple, list)) and len(grid_size) == 2
                    and all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in grid_size)):
                raise TypeError(f'grid_size must be None or (rows, cols), two positive ints; got {grid_size!r}')
            if min(grid_size) < 1:
                raise ValueError(f'grid_size must be None or (rows, cols), two positive ints; got {grid_size!r}')
        _check_int('num_heads', num_heads, 1 if attn_head_dim is not None else None)
        if attn_head_dim is not None:  # (heads of their own width: any number of them)
            _check_int('attn_head_dim', attn_head_dim, 1)
        else:
            if num_heads < 1 or dim % num_heads:
                raise ValueError(f'num_heads must be a positive divisor of dim={dim}; got num_heads={num_heads}')
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError('norm_layer must be provided if qk_norm or scale_norm is True')
        dim_out = dim_out or dim

        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.num_neighbors = num_neighbors
        self.candidates = candidates
        self.num_samples = num_samples
        self.similarity = similarity
        self.weighting = weighting
        self.aggregation = aggregation
        self.coords = coords
        self.coord_scale = coord_scale
        self.neighbor_order = neighbor_order
        self.num_prefix_tokens = num_prefix_tokens
        self.sample_seed = sample_seed
        self.grid_size = (int(grid_size[0]), int(grid_size[1])) if grid_size is not None else None
        self.token_grid = None  # a TokenGrid: the grid of the forward in progress, when a model records it
        self.dynamic_grid = False  # whether the model's inputs change size (it records their grids; TorchScript can't)
        self._id_cache = CandidateCache()

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.convnn_dim = self._convnn_channels()
        self.aggregate = NeighborAggregation(
            self.convnn_dim, self.convnn_dim, num_neighbors, groups=num_heads,
            depthwise=aggregation == 'depthwise', bias=False, init='unit', **dd)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def with_options(cls, **options: Any) -> Type['ConvNNAttention']:
        """This layer class with other defaults for its ConvNN arguments, as a class: for model constructors that
        take the attention layer as a class and build it with their own arguments (dim, num_heads, qkv_bias, ...).
        timm's ``VisionTransformer(attn_layer=...)`` is one, and it calls ``issubclass`` on it, so a
        ``functools.partial`` fails there::

            attn_layer = ConvNNAttention.with_options(
                num_neighbors=9, candidates='spatial', num_samples=64, num_prefix_tokens=1, grid_size=(14, 14))
            vit = timm.models.VisionTransformer(img_size=224, attn_layer=attn_layer)

        ``options`` are the arguments this class adds to timm's ``Attention`` (K, candidates, similarity, ...,
        ``num_prefix_tokens``, ``grid_size``; ``branch_ratio`` for the branch layer); the ones the model passes are
        the model's to set, and a name that is not one of them raises a ``TypeError`` naming the valid ones. The
        values are checked here too. Instances pickle and deep-copy (they are rebuilt through this method); the
        class itself is local and does not pickle."""
        valid = _convnn_options(cls)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(
                f'{cls.__name__}.with_options() takes the ConvNN arguments {", ".join(valid)}; got '
                f'{", ".join(unknown)} (the model passes dim, num_heads, qkv_bias, norms, dropouts itself)')
        base = cls

        class Configured(base):
            def __init__(self, dim: int, *args, **kwargs) -> None:
                given = sorted(set(options) & set(kwargs))
                if given:
                    raise TypeError(f'{base.__name__}.with_options() set {", ".join(given)} already')
                super().__init__(dim, *args, **options, **kwargs)

            def __reduce_ex__(self, protocol):
                return _configured_instance, (base, dict(options)), dict(self.__dict__)

        Configured.__name__ = base.__name__  # (module reprs read ConvNNAttention(...); the qualname stays local)
        Configured.__doc__ = f'{base.__name__}.with_options({", ".join(f"{k}={v!r}" for k, v in options.items())})'
        Configured(512, num_heads=8, device='meta')  # the values, checked where they are given (no memory)
        return Configured

    def _patch_grid(self, num_patches: int) -> Tuple[int, int]:
        if not torch.jit.is_scripting():
            recorded = self._recorded_grid(num_patches)
            if recorded is not None:
                return recorded
        grid = self.grid_size
        if grid is not None and grid[0] * grid[1] == num_patches:
            return grid[0], grid[1]
        if torch.jit.is_scripting() and self.dynamic_grid:
            # (TorchScript runs no forward hook: the grid of this image size is unknown, and a square token count
            # need not be a square map: 64 patches are 8 x 8 or 4 x 16)
            warnings.warn(
                'ConvNNAttention under TorchScript cannot see the patch grid of an input of another size ('
                + str(num_patches) + ' patches; built for ' + str(grid) + '): spatial candidates and coordinates '
                'assume a square map (or one raster row), which differs from eager for non-square inputs. Use '
                'eager mode, torch.compile or torch.export with dynamic_img_size.')
        side = int(round(num_patches ** 0.5))
        if side * side == num_patches:
            return side, side
        if not torch.jit.is_scripting():
            self._warn_unknown_grid(num_patches)
        return 1, num_patches  # unknown layout: a single raster row

    @torch.jit.unused
    def _warn_unknown_grid(self, num_patches: int) -> None:
        # (e.g. timm's own VisionTransformer with attn_layer=ConvNNAttention: 197 tokens, of which the layer does not
        # know that one is a class token; timm_convnn's ViT models give their layers both numbers)
        if not torch.compiler.is_compiling():
            warnings.warn(
                f'ConvNNAttention cannot tell the patch grid of {num_patches} tokens (num_prefix_tokens='
                f'{self.num_prefix_tokens}, grid_size={self.grid_size}, and {num_patches} is not a square): spatial '
                'candidates and coordinates take them as one raster row. Pass grid_size=(rows, cols) and '
                'num_prefix_tokens (class + register tokens) to the layer.', stacklevel=2)

    @torch.jit.unused
    def _recorded_grid(self, num_patches: int) -> Optional[Tuple[int, int]]:
        """The grid the model's patch embedding recorded for this forward (``TokenGrid``), if it fits the count."""
        hw = self.token_grid.hw if self.token_grid is not None else None
        return hw if hw is not None and hw[0] * hw[1] == num_patches else None

    def _token_coords(self, num_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        num_prefix = min(self.num_prefix_tokens, num_tokens)
        gh, gw = self._patch_grid(num_tokens - num_prefix)
        grid = coordinate_grid(gh, gw, device, dtype)
        if num_prefix > 0:
            grid = torch.cat([torch.zeros(num_prefix, 2, device=device, dtype=grid.dtype), grid], dim=0)
        return grid * self.coord_scale

    def _every_token(self, num_tokens: int) -> bool:
        """Every token is a candidate: ``all``, or r samples that cover all the patch tokens. (A graph exported for
        every image size lists them instead, as random ids or the grid: the same candidates, no guard on the size.)"""
        if self.candidates == 'all':
            return True
        if size_free(num_tokens):
            return False
        return self.num_samples >= num_tokens - min(self.num_prefix_tokens, num_tokens)

    def _candidate_ids(self, num_tokens: int, device: torch.device) -> Optional[torch.Tensor]:
        """Token ids shared by all queries, or None for all tokens. Lists that are the same at every call (spatial;
        random in eval) are made once (``CandidateCache``)."""
        if self._every_token(num_tokens):
            return None
        if not torch.jit.is_scripting():
            if CandidateCache.serves(self.candidates, self.training, num_tokens):
                return self._cached_candidate_ids(num_tokens, device)
        return self._make_candidate_ids(num_tokens, device)

    @torch.jit.unused
    def _cached_candidate_ids(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        num_prefix = min(self.num_prefix_tokens, num_tokens)
        grid = self._patch_grid(num_tokens - num_prefix) if self.candidates == 'spatial' else None
        key = (self.candidates, num_tokens, self.num_samples, num_prefix, self.sample_seed, grid, device)
        return self._id_cache.get(key, lambda: self._make_candidate_ids(num_tokens, device))

    def _make_candidate_ids(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        num_prefix = min(self.num_prefix_tokens, num_tokens)
        num_patches = num_tokens - num_prefix
        if self.candidates == 'random':
            ids = random_candidates(
                num_patches, self.num_samples, num_prefix, self.training, self.sample_seed, device)
        else:
            gh, gw = self._patch_grid(num_patches)
            ids = grid_candidates(gh, gw, self.num_samples, gw, num_prefix, device)
        if num_prefix > 0:
            ids = torch.cat([torch.arange(num_prefix, device=device, dtype=ids.dtype), ids])
        return ids

    def _convnn_channels(self) -> int:
        """Channels of q, k, v mixed by ConvNN (all of them here; a part in the branch variant)."""
        return self.attn_dim

    def _check_input(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
        if not torch.jit.is_scripting():
            self._refuse_fx(x, attn_mask)
        if attn_mask is not None or is_causal:
            raise ValueError('ConvNNAttention selects neighbours itself; attn_mask and is_causal are not supported')
        if x.dim() != 3:
            raise ValueError('ConvNNAttention expects (B, N, C) input, got a ' + str(x.dim()) + '-D tensor')
        if x.shape[-1] != self.dim:
            raise ValueError(
                'ConvNNAttention expects ' + str(self.dim) + ' input channels, got ' + str(x.shape[-1]))

    @torch.jit.unused
    def _refuse_fx(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> None:
        refuse_fx_proxies(type(self).__name__, x, attn_mask)  # (timm's ViT hands its attn_mask input on: a proxy)

    def convnn_mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ConvNN token mixing of per-head (B, H, N, d) q, k, v -> (B, H, N, d)."""
        B, H, N = q.shape[0], q.shape[1], q.shape[2]
        if self.coords != 'none':
            coord = self._token_coords(N, q.device, q.dtype).view(1, 1, N, 2).expand(B, H, N, 2)
            if self.coords == 'only':
                q, k = coord, coord
            else:
                q, k = torch.cat([q, coord], dim=-1), torch.cat([k, coord], dim=-1)
        cand = self._candidate_ids(N, q.device)
        if not torch.jit.is_scripting():
            # (the similarity features keep q's dtype family: fp64 stays fp64, half / bf16 / fp32 stay kernel dtypes)
            if self._fused_supported(N, q.device, torch.promote_types(q.dtype, v.dtype)):
                return self._fused(q, k, v, cand)
        qs, ks = similarity_features(q, k, self.similarity)
        query_index = torch.arange(N, device=q.device) if cand is not None else None
        idx, scores = _select_scored(qs, ks, self.num_neighbors, cand, query_index)
        if self.neighbor_order == 'position':
            idx, order = idx.sort(dim=-1)
            scores = scores.gather(-1, order)

        rho: Optional[torch.Tensor] = None
        if self.weighting == 'softmax':
            rho = self.attn_drop(softmax_weights(_gather_dot(qs, ks, idx, scores=scores)))
        return self.aggregate(v, idx, rho)

    @torch.jit.unused
    def _fused_supported(self, num_tokens: int, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
        """Whether this call (``dtype`` q / k / v) runs the fused Triton kernels (see ``timm_convnn.layers.backend``).
        fp64 stays on the PyTorch path: the kernels compute in fp32."""
        supported = (
            dtype in (torch.float32, torch.float16, torch.bfloat16)
            and self.weighting == 'softmax' and self.aggregation == 'depthwise' and self.neighbor_order == 'rank'
            and num_tokens <= triton_attention.MAX_TOKENS and self.num_neighbors <= triton_attention.MAX_NEIGHBORS
            and (type(self.attn_drop) is nn.Dropout or not self.attn_drop.training)  # dropout: its noise goes in
            and not torch.are_deterministic_algorithms_enabled()  # the fused backward accumulates with atomics
            and not self._aggregate_hooked())
        return triton_attention.use_fused(supported, device)

    @torch.jit.unused
    def _aggregate_hooked(self) -> bool:
        """Hooks on the aggregation (``inspect`` records neighbours with one): they see its module called, which the
        fused kernels do not do, so the layer runs the PyTorch path. (Global module hooks are not looked at: one on
        every module would take every ConvNN layer off the kernels.)"""
        agg = self.aggregate
        return bool(agg._forward_hooks or agg._forward_pre_hooks or agg._backward_hooks or agg._backward_pre_hooks)

    @torch.jit.unused
    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               candidates: Optional[torch.Tensor]) -> torch.Tensor:
        """The fused kernels on per-head q, k, v. The dot similarity's scale is applied inside them: q goes in as the
        view of timm's qkv buffer that it is, with no scaled copy made in the forward or kept for the backward.
        Attention dropout in training: the kernels multiply the softmax weights by the dropout's noise, drawn here as
        the PyTorch path draws it (``attn_drop`` of a (B, heads, N, K) block, the same RNG calls)."""
        if self.similarity == 'dot':
            qs, ks, q_scale = q, k, dot_scale(q.shape[-1])
        else:
            (qs, ks), q_scale = similarity_features(q, k, self.similarity), 1.0
        noise: Optional[torch.Tensor] = None
        if self.attn_drop.training and self.attn_drop.p > 0:  # (its own mode, as on the PyTorch path: MC dropout)
            kept = triton_attention.kept_neighbors(self.num_neighbors, k.shape[2], candidates)
            noise = self.attn_drop(torch.ones(q.shape[0], q.shape[1], q.shape[2], kept, device=q.device,
                                              dtype=torch.float32))
        out, _, _ = triton_attention.fused_attention(qs, ks, v, self.aggregate.weight, self.num_neighbors,
                                                     candidates, q_scale, noise)
        return out

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        q, k, v, gate = self._project(x, attn_mask, is_causal)
        return self._output(self.convnn_mix(q, k, v), gate)

    def _project(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Checked input -> per-head (B, H, N, d) q, k, v (as timm's Attention computes them) and the gate."""
        self._check_input(x, attn_mask, is_causal)
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, gate

    def _output(self, out: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        B, N = out.shape[0], out.shape[2]
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj(out)
        out = self.proj_drop(out)
        return out

    def extra_repr(self) -> str:
        s = f'num_heads={self.num_heads}, num_neighbors={self.num_neighbors}, candidates={self.candidates!r}'
        if self.candidates != 'all':
            s += f', num_samples={self.num_samples}'
        s += f', similarity={self.similarity!r}, weighting={self.weighting!r}, aggregation={self.aggregation!r}'
        if self.coords != 'none':
            s += f', coords={self.coords!r}'
        return s


def _convnn_options(cls: type) -> Tuple[str, ...]:
    """The constructor arguments of ``cls`` (a ConvNNAttention class) that timm's ``Attention`` does not take."""
    timm_args = set(inspect.signature(Attention.__init__).parameters) | {'self', 'dim', 'device', 'dtype'}
    names: Dict[str, None] = {}
    for klass in cls.__mro__:
        if klass is ConvNNAttention.__mro__[1]:
            break
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name not in timm_args and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                names[name] = None
    return tuple(names)


def _configured_instance(base: Type[ConvNNAttention], options: Dict[str, Any]) -> ConvNNAttention:
    """An empty instance of ``base.with_options(**options)`` for pickle / deepcopy to fill with the state."""
    cls = base.with_options(**options)
    return cls.__new__(cls)


@register_notrace_module
class ConvNNBranchAttention(ConvNNAttention):
    """Hybrid token mixer: per head, a fraction ``branch_ratio`` of the channels of q, k, v is mixed by ConvNN and the
    rest by softmax attention; the two results are concatenated per head and projected by ``proj``.

    The ViT counterpart of the paper's branching layer (the reference splits the width the same way, giving each
    branch all heads at a reduced head size). Parameters are timm ``Attention``'s (``qkv``, ``proj``, norms) plus
    ``aggregate.weight`` for the ConvNN channels, so timm ViT weights load unchanged. ``branch_ratio`` must be in
    (0, 1]: 0 would be plain attention (use timm's ``Attention``), 1 is ``ConvNNAttention``.
    """

    def __init__(self, dim: int, num_heads: int = 8, branch_ratio: float = 0.5, **kwargs) -> None:
        if isinstance(branch_ratio, bool) or not isinstance(branch_ratio, (int, float)):
            raise TypeError(f'branch_ratio (lambda) must be a float in (0, 1]; got {branch_ratio!r}')
        if not 0. < branch_ratio <= 1.:
            raise ValueError(f'branch_ratio (lambda) must be in (0, 1] (0 is plain attention); got {branch_ratio}')
        self.branch_ratio = float(branch_ratio)
        super().__init__(dim, num_heads, **kwargs)
        self.attn_head_channels = self.head_dim - self.convnn_head_channels

    def _convnn_channels(self) -> int:
        self.convnn_head_channels = int(round(self.branch_ratio * self.head_dim))
        if self.convnn_head_channels < 1:
            raise ValueError(
                f'branch_ratio={self.branch_ratio} leaves no ConvNN channel in a head of {self.head_dim} channels')
        return self.num_heads * self.convnn_head_channels

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        q, k, v, gate = self._project(x, attn_mask, is_causal)
        c = self.convnn_head_channels
        out = self.convnn_mix(q[..., :c], k[..., :c], v[..., :c])
        if self.attn_head_channels > 0:
            attn_out = F.scaled_dot_product_attention(
                q[..., c:], k[..., c:], v[..., c:], dropout_p=self.attn_drop.p if self.training else 0.)
            out = torch.cat([out, attn_out], dim=-1)
        return self._output(out, gate)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', branch_ratio={self.branch_ratio}'
