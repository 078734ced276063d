"""The README's first command, in its reduced mode: real training on digits, a measured table, export + reload."""
import re
import subprocess
import sys

import pytest
import timm
import torch

import timm_convnn  # noqa: F401  (registers the models)
from timm_convnn.data import digits_split, digits_tensors
from timm_convnn.demo import train_model


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
    # output redirected (as in CI logs): one plain line per epoch, no tqdm carriage-return updates
    out = subprocess.run([sys.executable, '-m', 'timm_convnn', 'demo', '--quick', '--out-dir',
                          str(tmp_path / 'export')], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert '\r' not in out.stdout + out.stderr
    for label in ('ConvNN ViT', 'timm ViT'):
        epochs = re.findall(rf'^{label}: epoch (\d+)/8, mean loss [0-9.]+, [0-9.]+s$', text, flags=re.M)
        assert epochs == [str(e) for e in range(1, 9)], text
    rows = dict(re.findall(r'^\| (ConvNN ViT|timm ViT) \(\w+\) +\| +([0-9.]+)% \|', text, flags=re.M))
    assert set(rows) == {'ConvNN ViT', 'timm ViT'}, text
    # chance is 10 %: a ViT whose token mixing is broken cannot route the patches to the class token and stays
    # near it; this reduced run (8 epochs, 2 blocks of width 48) measured 34-46 % depending on float summation order
    assert float(rows['ConvNN ViT']) > 25.0, text
    assert re.search(r'val top-1 [0-9.]+% \(identical\)', text), text
    assert sorted(p.name for p in (tmp_path / 'export').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    # the export records the demo's preprocessing: timm's eval transform of its data config turns a validation image
    # (as 8-bit pixels) back into the tensor the demo evaluated, not an ImageNet-normalised centre crop of it
    import numpy as np
    from PIL import Image
    model = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True)
    config = timm.data.resolve_model_data_config(model)
    assert config['input_size'] == (3, 32, 32) and config['crop_pct'] == 1.0, config
    x = digits_tensors(img_size=32)[2][:4]
    transform = timm.data.create_transform(**config)
    pixels = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    seen = torch.stack([transform(Image.fromarray(p)) for p in pixels])
    assert seen.shape == x.shape and (seen - x).abs().max() <= 0.51 / 255, (seen - x).abs().max()


@pytest.mark.parametrize('progress', [None, False, True])
def test_train_model_progress_output(progress, capfd):
    # pytest's captured stdout / stderr are not terminals, so None means one line per epoch, as in a CI log
    torch.manual_seed(0)
    x, y = torch.rand(48, 3, 8, 8), torch.randint(0, 10, (48,))
    model = timm.create_model('vit_tiny_convnn_random', img_size=8, patch_size=4, embed_dim=16, depth=1,
                              num_heads=1, num_classes=10)
    top1 = train_model(model, (x, y, x[:16], y[:16]), epochs=2, batch_size=16, desc='tiny', progress=progress)
    assert 0 <= top1 <= 100
    out, err = capfd.readouterr()
    if progress is None:
        assert re.findall(r'^tiny: epoch (\d)/2, mean loss [0-9.]+, [0-9.]+s$', out, flags=re.M) == ['1', '2'], out
        assert re.search(r'^tiny: val top-1 [0-9.]+%$', out, flags=re.M), out
        assert err == ''
    elif progress:
        assert out == '' and '6/6' in err, err  # tqdm's bar: 2 epochs x 3 steps
    else:
        assert out == '' and err == ''


def test_digits_split_scales_the_16_grey_levels_to_0_255():
    import numpy as np
    xt, _, xv, _ = digits_split()
    levels = {int(round(v * 255 / 16)) for v in range(17)}  # scikit-learn's digits: integer levels 0..16
    values = set(np.unique(np.concatenate([xt.ravel(), xv.ravel()])).tolist())
    assert values <= levels and {0, 255} <= values and xt.dtype == np.uint8


def test_digits_split_seed_and_tensor_labels():
    _, yt, xv, yv = digits_split(seed=0)
    _, _, xv1, _ = digits_split(seed=1)
    assert not (xv.shape == xv1.shape and (xv == xv1).all())  # another seed, another validation draw
    x_train, y_train, x_val, y_val = digits_tensors(img_size=8)
    assert len(x_train) == len(y_train) and len(x_val) == len(y_val)
    assert torch.equal(y_train, torch.from_numpy(yt)) and torch.equal(y_val, torch.from_numpy(yv))


def test_train_model_prints_the_mean_step_loss_of_each_epoch(monkeypatch, capfd):
    from timm_convnn import demo
    monkeypatch.setattr(demo, 'LabelSmoothingCrossEntropy', lambda smoothing: lambda logits, y: logits.sum() * 0 + 1.5)
    x, y = torch.rand(48, 3, 8, 8), torch.randint(0, 10, (48,))
    model = timm.create_model('vit_tiny_convnn_random', img_size=8, patch_size=4, embed_dim=16, depth=1,
                              num_heads=1, num_classes=10)
    train_model(model, (x, y, x[:16], y[:16]), epochs=2, batch_size=16, desc='tiny', progress=None)
    out = capfd.readouterr().out
    assert re.findall(r'^tiny: epoch \d/2, mean loss ([0-9.]+),', out, flags=re.M) == ['1.500', '1.500'], out
