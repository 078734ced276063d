""" Which neighbours ConvNN picks: every ConvNN layer's selected neighbour indices and weights, via forward hooks.

    from timm_convnn.inspect import neighbors
    maps = neighbors(model, images)        # {layer name: LayerNeighbors}, in forward order
    m = maps['blocks.0.attn']
    m.indices, m.weights                   # (B, G, Nq, K'): candidate ids and their weights (None for 'ones')
    rows, cols = m.positions()             # candidate positions on the layer's input map

The hooks read what the layer itself selected (the inputs of its ``aggregate`` Conv1d), so the model's outputs are
unchanged and nothing is recomputed. Eval mode is deterministic (random candidates are a fixed hashed draw there);
in training mode random candidates are fresh on every forward and the record shows that forward's draw.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from .layers import ConvNN2d, ConvNNAttention

__all__ = ['LayerNeighbors', 'neighbors', 'record_neighbors', 'convnn_layers']


@dataclass
class LayerNeighbors:
    """The neighbours one ConvNN layer selected in one forward.

    ``indices`` / ``weights``: (B, G, Nq, K') with G heads (ViT; 1 for CNN layers), Nq queries and K' = min(K,
    candidates) slots. ViT: queries and candidates are token indices, the ``num_prefix_tokens`` class / register
    tokens first, then the patch tokens in raster order over ``query_grid``. CNN: queries are the output pixels in
    raster order over ``query_grid``; candidates are pixel indices of the zero-padded input map
    (``key_grid`` plus ``padding`` on each side), so neighbours in the padding are visible as such.
    ``weights`` is None when the layer weights its neighbours by ones.
    """
    name: str
    layer: str
    indices: torch.Tensor
    weights: Optional[torch.Tensor]
    query_grid: Tuple[int, int]
    key_grid: Tuple[int, int]
    num_prefix_tokens: int = 0
    padding: int = 0
    stride: int = 1

    @property
    def num_neighbors(self) -> int:
        return self.indices.shape[-1]

    def query_index(self, row: int, col: int) -> int:
        """Index into the query axis of the query at (row, col) of ``query_grid``."""
        qh, qw = self.query_grid
        if not (0 <= row < qh and 0 <= col < qw):
            raise ValueError(f'{self.name}: query (row {row}, col {col}) is outside its {qh} x {qw} query grid')
        return self.num_prefix_tokens + row * qw + col

    def positions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of every selected candidate on the layer's input map (``key_grid``), shaped like ``indices``.

        CNN: zero-padding candidates lie outside the map (row or col -1 .. -padding, or >= the map size). ViT: prefix
        tokens (class, registers) have no position and get (-1, -1); see ``is_prefix``.
        """
        kh, kw = self.key_grid
        if self.num_prefix_tokens or self.padding == 0:
            j = self.indices - self.num_prefix_tokens
            prefix = j < 0
            rows = torch.where(prefix, torch.full_like(j, -1), torch.div(j, kw, rounding_mode='floor'))
            cols = torch.where(prefix, torch.full_like(j, -1), j % kw)
            return rows, cols
        wp = kw + 2 * self.padding
        return (torch.div(self.indices, wp, rounding_mode='floor') - self.padding,
                self.indices % wp - self.padding)

    def is_prefix(self) -> torch.Tensor:
        return self.indices < self.num_prefix_tokens


def convnn_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Named ConvNN layers of ``model`` (``ConvNNAttention`` and subclasses, ``ConvNN2d``), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (ConvNNAttention, ConvNN2d))}


def _grid_of_tokens(layer: ConvNNAttention, num_tokens: int) -> Tuple[int, int]:
    return layer._patch_grid(num_tokens - min(layer.num_prefix_tokens, num_tokens))


@contextmanager
def record_neighbors(model: nn.Module) -> Iterator[Dict[str, LayerNeighbors]]:
    """Record the neighbours of every ConvNN layer during the forwards run inside the block.

    Yields a dict filled as the layers run (name -> LayerNeighbors; a layer called again in the block is recorded
    again as ``name#2``, ...). The hooks are removed on exit.
    """
    layers = convnn_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no ConvNN layer (ConvNNAttention / ConvNN2d) to inspect')
    records: Dict[str, LayerNeighbors] = {}
    handles = []

    def watch(name: str, layer: nn.Module):
        shape: Dict[str, Tuple[int, ...]] = {}

        def before(module, args):
            shape['x'] = tuple(args[0].shape)

        def after(module, args, out):
            idx, rho = args[1], args[2]
            if isinstance(layer, ConvNNAttention):
                n = shape['x'][1]
                grid = _grid_of_tokens(layer, n)
                rec = LayerNeighbors(name, type(layer).__name__, idx.detach(), None if rho is None else rho.detach(),
                                     grid, grid, num_prefix_tokens=min(layer.num_prefix_tokens, n))
            else:
                h, w = shape['x'][2], shape['x'][3]
                s = layer.stride
                rec = LayerNeighbors(name, type(layer).__name__, idx.detach(), None if rho is None else rho.detach(),
                                     (-(-h // s), -(-w // s)), (h, w), padding=layer.padding, stride=s)
            key, n = name, 1
            while key in records:
                n += 1
                key = f'{name}#{n}'
            records[key] = rec

        handles.append(layer.register_forward_pre_hook(before))
        handles.append(layer.aggregate.register_forward_hook(after))

    for name, layer in layers.items():
        watch(name, layer)
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def neighbors(model: nn.Module, images: torch.Tensor) -> Dict[str, LayerNeighbors]:
    """Run ``model`` on ``images`` (B, C, H, W) without grad and return every ConvNN layer's neighbours.

    The model's mode is left as it is (call ``model.eval()`` for deterministic random candidates).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = f'a {images.dim()}-D tensor' if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f'images must be a (B, C, H, W) tensor; got {got}')
    with torch.no_grad(), record_neighbors(model) as records:
        model(images)
    return records
