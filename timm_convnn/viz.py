""" Neighbour maps as images (Pillow only, which torchvision already requires): one panel per ConvNN layer.

Each panel shows the model's input image, the query's cell on that layer's query grid (green outline) and the
cells of the neighbours it selected, tinted red by weight (summed over heads and normalised per panel; neighbours
weighted by ones all get the same tint). Class / register tokens and zero-padding neighbours have no cell; the panel
title counts them.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from .inspect import LayerNeighbors, neighbors

__all__ = ['sample_image', 'figure_size', 'render_neighbor_maps', 'model_input', 'neighbor_map', 'PANEL', 'TITLE',
           'PAD', 'COLUMNS']

PANEL = 224   # panel side in pixels
TITLE = 28    # title band above each panel
PAD = 8       # gap around panels
COLUMNS = 4   # panels per row (fewer when there are fewer layers)
QUERY_RGB = (0, 220, 0)
NEIGHBOR_RGB = (255, 0, 0)


def sample_image(size: int = 256) -> Image.Image:
    """A synthetic scene (sky, sun, hills, a striped field, a house), drawn here so the CLI works offline.

    Distinct regions of colour and texture make the neighbour choices easy to read.
    """
    s = size / 256.
    img = Image.new('RGB', (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):  # sky gradient
        t = y / max(size - 1, 1)
        d.line([(0, y), (size, y)], fill=(int(90 + 100 * t), int(150 + 80 * t), 255))
    d.ellipse([190 * s, 20 * s, 236 * s, 66 * s], fill=(255, 220, 60))  # sun
    d.polygon([(0, 150 * s), (70 * s, 95 * s), (140 * s, 150 * s)], fill=(70, 120, 70))  # hills
    d.polygon([(90 * s, 150 * s), (180 * s, 85 * s), (256 * s, 150 * s)], fill=(50, 100, 60))
    for i in range(0, 16):  # striped field
        y0 = (150 + i * 6.5) * s
        d.rectangle([0, y0, size, y0 + 6.5 * s], fill=(200, 170, 60) if i % 2 == 0 else (150, 120, 40))
    d.rectangle([30 * s, 120 * s, 100 * s, 190 * s], fill=(180, 60, 50))  # house
    d.polygon([(22 * s, 122 * s), (65 * s, 88 * s), (108 * s, 122 * s)], fill=(90, 40, 30))
    d.rectangle([55 * s, 155 * s, 75 * s, 190 * s], fill=(60, 40, 20))
    d.rectangle([38 * s, 132 * s, 52 * s, 146 * s], fill=(230, 240, 255))
    return img


def figure_size(num_panels: int, panel: int = PANEL, columns: int = COLUMNS) -> Tuple[int, int]:
    """(width, height) in pixels of the PNG for ``num_panels`` panels."""
    cols = max(1, min(columns, num_panels))
    rows = math.ceil(num_panels / cols)
    return cols * (panel + PAD) + PAD, rows * (panel + TITLE + PAD) + PAD


def _cell(row: int, col: int, grid: Tuple[int, int], side: int) -> Tuple[float, float, float, float]:
    gh, gw = grid
    return col * side / gw, row * side / gh, (col + 1) * side / gw, (row + 1) * side / gh


def _panel(image: Image.Image, rec: LayerNeighbors, query_xy: Tuple[float, float], batch_index: int,
           side: int) -> Tuple[Image.Image, str]:
    qh, qw = rec.query_grid
    x, y = query_xy  # fractions of the image width / height
    qr, qc = min(int(y * qh), qh - 1), min(int(x * qw), qw - 1)
    q = rec.query_index(qr, qc)
    idx = rec.indices[batch_index, :, q]  # (G, K')
    w = rec.weights[batch_index, :, q].float() if rec.weights is not None else torch.ones(idx.shape)
    rows, cols = (t[batch_index, :, q] for t in rec.positions())
    kh, kw = rec.key_grid
    inside = (rows >= 0) & (rows < kh) & (cols >= 0) & (cols < kw) & ~(idx < rec.num_prefix_tokens)
    heat = torch.zeros(kh * kw)
    heat.index_add_(0, (rows * kw + cols)[inside].long(), w[inside].cpu() / idx.shape[0])
    outside = float(w[~inside].sum() / idx.shape[0])

    base = image.resize((side, side), Image.BILINEAR).convert('RGBA')
    overlay = Image.new('RGBA', (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(overlay)
    peak = float(heat.max()) if heat.numel() else 0.
    for cell in torch.nonzero(heat > 0).flatten().tolist():
        alpha = int(70 + 150 * float(heat[cell]) / peak) if peak > 0 else 0
        d.rectangle(_cell(cell // kw, cell % kw, (kh, kw), side), fill=NEIGHBOR_RGB + (alpha,))
    d.rectangle(_cell(qr, qc, (qh, qw), side), outline=QUERY_RGB + (255,), width=2)
    panel = Image.alpha_composite(base, overlay).convert('RGB')
    title = f'{rec.name} K={rec.num_neighbors}'
    if rec.num_prefix_tokens:
        title += f' cls {outside:.2f}'  # weight on class / register tokens (no cell)
    elif rec.padding and outside > 0:
        title += f' pad {outside:.2f}'  # weight on zero-padding pixels
    return panel, title


def render_neighbor_maps(image: Image.Image, records: Dict[str, LayerNeighbors], query_xy: Tuple[float, float],
                         out_path: str, batch_index: int = 0, layers: Optional[Sequence[str]] = None,
                         panel: int = PANEL) -> Tuple[int, int]:
    """Write the PNG grid for one query and return its (width, height).

    ``image``: the model's input as seen by the model (after resize / crop, before normalisation). ``query_xy``:
    the query position as fractions (x, y) in [0, 1) of the image width and height (x to the right, y down).
    """
    names: List[str] = list(layers) if layers is not None else list(records)
    if not names:
        raise ValueError('no ConvNN layer to draw')
    size = figure_size(len(names), panel)
    sheet = Image.new('RGB', size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    cols = max(1, min(COLUMNS, len(names)))
    for i, name in enumerate(names):
        img, title = _panel(image, records[name], query_xy, batch_index, panel)
        r, c = divmod(i, cols)
        x0, y0 = PAD + c * (panel + PAD), PAD + r * (panel + TITLE + PAD)
        draw.text((x0, y0 + 4), title[:36], fill=(0, 0, 0))
        if len(title) > 36:
            draw.text((x0, y0 + 15), title[36:72], fill=(0, 0, 0))
        sheet.paste(img, (x0, y0 + TITLE))
    sheet.save(out_path)
    return size


def model_input(model: nn.Module, image: Optional[Image.Image] = None, img_size: Optional[int] = None):
    """``image`` (default: ``sample_image()``) through timm's eval transform for ``model`` ->
    (batch of one, the same image as the model sees it, before normalisation).

    The input size is ``img_size``, else the model's (a ViT built with ``img_size=N`` takes N); a model built for a
    fixed size other than ``img_size`` is a ValueError. The image becomes grayscale for a model with ``in_chans=1``.
    """
    import timm.data
    cfg = timm.data.resolve_input_data_config(model, dict(img_size=img_size) if img_size else {})
    channels = cfg['input_size'][0]
    if channels not in (1, 3):
        raise ValueError(f'the model takes {channels} input channels (in_chans={channels}); images convert to 3 '
                         f'(RGB) or 1 (grayscale) only')
    image = (image if image is not None else sample_image()).convert('RGB' if channels == 3 else 'L')
    x = timm.data.create_transform(**cfg)(image)
    mean = torch.tensor(cfg['mean']).view(-1, 1, 1)
    std = torch.tensor(cfg['std']).view(-1, 1, 1)
    shown = (x * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return x.unsqueeze(0), Image.fromarray(shown[..., 0] if channels == 1 else shown)


def neighbor_map(model: nn.Module, out_path: str, image: Optional[Image.Image] = None,
                 query: Optional[Tuple[int, int]] = None, layers: Optional[Sequence[str]] = None,
                 img_size: Optional[int] = None) -> Tuple[Tuple[int, int], Dict[str, LayerNeighbors], Tuple[int, int]]:
    """Run ``model`` (as it is: call ``.eval()`` first) on ``image`` and write its neighbour maps for the pixel
    ``query`` = (x, y) of the model input (default: the centre). Returns (PNG size, records, query)."""
    x, shown = model_input(model, image, img_size)
    h, w = x.shape[-2:]
    qx, qy = query if query is not None else (w // 2, h // 2)
    if not (0 <= qx < w and 0 <= qy < h):
        raise ValueError(f'query {qx},{qy} is outside the {w}x{h} model input: X must be in [0, {w - 1}] and Y in '
                         f'[0, {h - 1}] (pixels, origin top left)')
    records = neighbors(model, x)
    if layers:
        layers = list(dict.fromkeys(layers))  # (a name given twice: one panel)
        unknown = [n for n in layers if n not in records]
        if unknown:
            raise ValueError(f'no ConvNN layer named {unknown}; layers: {", ".join(records)}')
    size = render_neighbor_maps(shown, records, ((qx + 0.5) / w, (qy + 0.5) / h), out_path, layers=layers)
    return size, records, (qx, qy)
