""" The demo: a ConvNN ViT and the same-size timm ViT trained side by side on real data (digits), on CPU.

Both models are built with ``timm.create_model`` and trained with timm's own optimizer, scheduler and loss factories
(AdamW, cosine with warm-up, label smoothing) on the embedded scikit-learn digits (fixed train / validation split,
upsampled to 32 x 32). It prints a table of validation accuracy, time and parameters measured in this run, exports
the ConvNN model in Hugging Face Hub format and reloads it with ``timm.create_model('local-dir:...')``, checking that
the reloaded model scores the same.
"""
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
import timm
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .data import digits_tensors

__all__ = ['DemoResult', 'run_demo']

MEAN, STD = 0.5, 0.5
# small ViT for 32 px digits: 8 x 8 patches of 4 px, 64 tokens + class token
MODEL_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)
MODELS = (
    ('ConvNN ViT', 'vit_tiny_convnn_random'),  # random candidates, r 32, K 9 (the paper's best CIFAR setting)
    ('timm ViT', 'vit_tiny_patch16_224'),  # timm's own ViT, same size and hyper-parameters
)


@dataclass
class DemoResult:
    label: str
    model: str
    top1: float
    seconds: float
    params: int


def _augment(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (no flips: digits are not mirror-symmetric)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return xp[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model((x[i:i + batch_size] - MEAN) / STD)
        correct += (logits.argmax(-1) == y[i:i + batch_size]).sum().item()
    return 100. * correct / len(x)


def _progress_mode(progress: Optional[bool]) -> str:
    """'bar' (a live tqdm bar), 'epochs' (one plain line per epoch) or 'none'.

    ``None`` picks the bar on a terminal and one line per epoch otherwise: a redirected tqdm bar writes a
    carriage-return update every 0.1 s, which floods CI logs and files with one unreadable line.
    """
    if progress is None:
        return 'bar' if sys.stderr.isatty() else 'epochs'
    return 'bar' if progress else 'none'


def train_model(model: torch.nn.Module, data, epochs: int, batch_size: int = 64, lr: float = 2e-3,
                warmup_epochs: int = 3, seed: int = 0, desc: str = '', progress: Optional[bool] = None) -> float:
    """Train with timm's AdamW, cosine schedule with warm-up and label smoothing; returns validation top-1.

    ``progress``: True for a tqdm bar, False for silence, None (default) for a bar on a terminal and one line per
    epoch otherwise.
    """
    from tqdm.auto import tqdm
    mode = _progress_mode(progress)
    label = desc.strip() or 'train'
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=min(warmup_epochs, epochs - 1),
        warmup_lr=lr * 0.01, min_lr=lr * 0.01, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=mode != 'bar', leave=True, unit='step')
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        loss_sum = 0.
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = loss_fn(model((_augment(x_train[idx]) - MEAN) / STD), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_value = loss.item()
            loss_sum += loss_value
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f'{loss_value:.3f}')
        if mode == 'epochs':
            print(f'{label}: epoch {epoch + 1}/{epochs}, mean loss {loss_sum / steps_per_epoch:.3f}, '
                  f'{time.perf_counter() - t0:.1f}s', flush=True)
    top1 = evaluate(model, x_val, y_val)
    bar.set_postfix(val_top1=f'{top1:.1f}%')
    bar.close()
    if mode == 'epochs':
        print(f'{label}: val top-1 {top1:.1f}%', flush=True)
    return top1


def run_demo(epochs: int = 15, quick: bool = False, out_dir: Optional[str] = None, seed: int = 0,
             progress: Optional[bool] = None) -> List[DemoResult]:
    if quick:
        epochs = min(epochs, 8)
    model_kwargs = dict(MODEL_KWARGS)
    if quick:
        model_kwargs.update(embed_dim=48, depth=2)
    data = digits_tensors(img_size=model_kwargs['img_size'])
    print(f'digits (scikit-learn): {len(data[0])} train / {len(data[2])} validation images, 10 classes, '
          f'upsampled to {model_kwargs["img_size"]} px; {epochs} epochs each, CPU threads: {torch.get_num_threads()}')
    results: List[DemoResult] = []
    trained: Dict[str, torch.nn.Module] = {}
    for label, name in MODELS:
        torch.manual_seed(seed)
        model = timm.create_model(name, **model_kwargs)
        t0 = time.perf_counter()
        top1 = train_model(model, data, epochs, seed=seed, desc=f'{label:<10}', progress=progress)
        seconds = time.perf_counter() - t0
        results.append(DemoResult(label, name, top1, seconds, sum(p.numel() for p in model.parameters())))
        trained[name] = model

    print(f'\n| {"model":<36} | {"val top-1":>9} | {"train time":>10} | {"params":>8} |')
    print(f'|{"-" * 38}|{"-" * 11}|{"-" * 12}|{"-" * 10}|')
    for r in results:
        print(f'| {r.label + " (" + r.model + ")":<36} | {r.top1:8.1f}% | {r.seconds:9.1f}s | {r.params / 1e6:7.3f}M |')

    # export the ConvNN model in Hugging Face Hub format and load it back the way a user would
    from .hub import save
    convnn_name = MODELS[0][1]
    export_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix='timm-convnn-demo-'))
    # the preprocessing the demo trained and evaluated with (digits_tensors: bicubic to img_size, pixels in [0, 1], no
    # normalisation, no crop), recorded so that timm's data config of the export reproduces it, not ImageNet's
    size = model_kwargs['img_size']
    preprocessing = dict(input_size=(3, size, size), interpolation='bicubic', mean=(0., 0., 0.), std=(1., 1., 1.),
                         crop_pct=1.0, crop_mode='center')
    save(trained[convnn_name], export_dir, dataset='digits (scikit-learn)', data_config=preprocessing)
    reloaded = timm.create_model(f'local-dir:{export_dir}', pretrained=True)
    data_val = data[2], data[3]
    top1_reloaded = evaluate(reloaded, *data_val)
    print(f'\nexported {convnn_name} to {export_dir} ({", ".join(sorted(p.name for p in export_dir.iterdir()))});'
          f'\nreloaded with timm.create_model("local-dir:{export_dir}"): val top-1 {top1_reloaded:.1f}% '
          f'({"identical" if top1_reloaded == results[0].top1 else "DIFFERENT"})')
    if top1_reloaded != results[0].top1:
        raise RuntimeError('the exported and reloaded ConvNN model does not reproduce its accuracy')
    return results
