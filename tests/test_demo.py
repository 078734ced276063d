"""The README's first command, in its reduced mode: real training on digits, a measured table, export + reload."""
import re
import subprocess
import sys

import torch

from timm_convnn.data import digits_split, digits_tensors


def test_digits_split_is_fixed_and_stratified():
    xt, yt, xv, yv = digits_split()
    assert (len(xt), len(xv)) == (1438, 359)
    xt2, yt2, xv2, yv2 = digits_split()
    assert (xt == xt2).all() and (yv == yv2).all()
    counts = torch.bincount(torch.from_numpy(yv), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    x, y, _, _ = digits_tensors(img_size=32)
    assert x.shape == (1438, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_demo_quick_trains_exports_and_reloads(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'timm_convnn', 'demo', '--quick', '--no-progress', '--out-dir',
                          str(tmp_path / 'export')], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    rows = dict(re.findall(r'^\| (ConvNN ViT|timm ViT) \(\w+\) +\| +([0-9.]+)% \|', text, flags=re.M))
    assert set(rows) == {'ConvNN ViT', 'timm ViT'}, text
    # chance is 10 %: a ViT whose token mixing is broken cannot route the patches to the class token and stays
    # near it; this reduced run (8 epochs, 2 blocks of width 48) measured 34-46 % depending on float summation order
    assert float(rows['ConvNN ViT']) > 25.0, text
    assert re.search(r'val top-1 [0-9.]+% \(identical\)', text), text
    assert sorted(p.name for p in (tmp_path / 'export').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
