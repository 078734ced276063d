""" Embedded real data: scikit-learn's digits (1,797 8x8 grey images of handwritten digits, 10 classes).

The split is fixed (stratified, 20 % validation, seed 0) so that every run, the demo and train.py on the ImageFolder
written by ``timm-convnn digits DIR`` see the same train / validation images.
"""
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ['digits_split', 'digits_tensors', 'write_digits_imagefolder']


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError('the digits data comes with scikit-learn: pip install "timm-convnn[demo]"') from e
    return load_digits()


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, val images, val labels); images uint8 (N, 8, 8) in 0..255."""
    digits = _load_digits()
    images = np.round(digits.images * (255. / 16.)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val[rng.choice(idx, size=int(round(val_fraction * len(idx))), replace=False)] = True
    return images[~val], labels[~val], images[val], labels[val]


def _resize(images: np.ndarray, img_size: int) -> torch.Tensor:
    if img_size < 1:
        raise ValueError(f'img_size must be a positive whole number of pixels, got {img_size!r}')
    x = torch.from_numpy(images).float().div_(255.).unsqueeze(1)
    return F.interpolate(x, size=(img_size, img_size), mode='bicubic', align_corners=False).clamp_(0, 1)


def digits_tensors(img_size: int = 32, val_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_val, y_val): float (N, 3, img_size, img_size) in [0, 1], int64 labels."""
    xt, yt, xv, yv = digits_split(val_fraction, seed)
    to3 = lambda x: _resize(x, img_size).expand(-1, 3, -1, -1).contiguous()  # noqa: E731
    return to3(xt), torch.from_numpy(yt), to3(xv), torch.from_numpy(yv)


def write_digits_imagefolder(root: Union[str, Path], img_size: int = 32, val_fraction: float = 0.2,
                             seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/validation/<class>/*.png`` (timm train.py's default splits)."""
    from PIL import Image
    root = Path(root)
    xt, yt, xv, yv = digits_split(val_fraction, seed)
    for split, images, labels in (('train', xt, yt), ('validation', xv, yv)):
        pixels = (_resize(images, img_size).squeeze(1).numpy() * 255.).round().astype(np.uint8)
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(pixels, labels)):
            Image.fromarray(img, mode='L').save(root / split / str(label) / f'{split}_{i:04d}.png')
    return root
