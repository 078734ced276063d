""" Operator self-check: the two identities ConvNN generalizes, measured on this machine, plus its speed vs SDPA.

Run with ``timm-convnn selfcheck`` (also what ``timm-convnn demo`` runs until the training demo lands). Every number
printed is computed here and now; the check fails (exit status 1) if an identity does not hold.
"""
import platform
from dataclasses import dataclass
from typing import Callable, List

import torch
import torch.nn as nn

from .layers import get_backend, triton_attention

__all__ = ['run_selfcheck']


@dataclass
class Check:
    name: str
    detail: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def _attention_identity(batch: int, tokens: int, dim: int, heads: int, dtype: torch.dtype) -> Check:
    from timm.layers import Attention
    from .layers import ConvNNAttention
    attn = Attention(dim, num_heads=heads, qkv_bias=True).eval()
    for p in attn.parameters():
        nn.init.normal_(p, std=dim ** -0.5)
    convnn = ConvNNAttention(dim, num_heads=heads, qkv_bias=True, num_neighbors=tokens, similarity='dot',
                             weighting='softmax', aggregation='depthwise').eval()
    convnn.load_state_dict(attn.state_dict(), strict=False)
    attn, convnn = attn.to(dtype), convnn.to(dtype)
    x = torch.randn(batch, tokens, dim, dtype=dtype)
    with torch.no_grad():
        err = (convnn(x) - attn(x)).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    return Check('attention identity', f'K=n={tokens}, {heads} heads, dim {dim}, {str(dtype)[6:]}', err, tol)


def _conv_identity(channels: int, size: int, stride: int, kernel: int, dtype: torch.dtype) -> Check:
    from .layers import ConvNN2d
    conv = nn.Conv2d(channels, 2 * channels, kernel, stride=stride, padding=kernel // 2).to(dtype)
    convnn = ConvNN2d.from_conv2d(conv)
    x = torch.randn(2, channels, size, size, dtype=dtype)
    with torch.no_grad():
        err = (convnn(x) - conv(x)).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    return Check('convolution identity', f'{kernel}x{kernel} conv, stride {stride}, {size}x{size}, '
                                         f'{str(dtype)[6:]}', err, tol)


def _time_ms(fn: Callable[[], None], repeats: int) -> float:
    """Median ms after one warm-up call (the benchmark harness's timer)."""
    from .bench import measure
    return measure(fn, torch.device('cpu'), warmup=1, iters=repeats, memory=False)['ms']


def _speed(batch: int, tokens: int, dim: int, heads: int, k: int, candidates: str, repeats: int) -> List[str]:
    from timm.layers import Attention
    from .layers import ConvNNAttention
    attn = Attention(dim, num_heads=heads)
    convnn = ConvNNAttention(dim, num_heads=heads, num_neighbors=k, candidates=candidates, num_samples=64)
    x = torch.randn(batch, tokens, dim, requires_grad=True)

    def step(m):
        def run():
            m(x).sum().backward()
        return run

    t_attn, t_nn = _time_ms(step(attn), repeats), _time_ms(step(convnn), repeats)
    return [f'{candidates:>7} K={k:<3}', f'{t_nn:8.1f} ms', f'{t_attn:8.1f} ms', f'{t_nn / t_attn:6.2f}x']


def fused_kernels_status() -> str:
    """Whether ConvNN attention on a CUDA GPU can use the fused Triton kernels here, and if not, why."""
    reason = triton_attention.triton_unavailable_reason(torch.device('cuda'))
    if reason is not None:
        return f'fused GPU kernels: off, the PyTorch path runs: {reason}'
    version = triton_attention.triton.__version__
    if not torch.cuda.is_available():
        return (f'fused GPU kernels: not used here, no CUDA GPU on this machine (triton {version} can run them on an '
                f'NVIDIA GPU of compute capability {triton_attention.MIN_CAPABILITY[0]}.'
                f'{triton_attention.MIN_CAPABILITY[1]} or newer)')
    return (f'fused GPU kernels: available with triton {version} on {torch.cuda.get_device_name()} '
            f'(backend {get_backend()})')


def run_selfcheck(quick: bool = False) -> int:
    torch.manual_seed(0)
    print(f'timm-convnn self-check | torch {torch.__version__} | {platform.machine()} | '
          f'{torch.get_num_threads()} threads')
    print(fused_kernels_status())
    checks = [
        _attention_identity(2, 197, 192, 3, torch.float32),
        _attention_identity(2, 50, 64, 4, torch.float32),
        _attention_identity(1, 65, 384, 6, torch.float64),
        _conv_identity(16, 14, 1, 3, torch.float32),
        _conv_identity(16, 15, 2, 3, torch.float32),
        _conv_identity(8, 12, 1, 5, torch.float64),
    ]
    print(f'\n{"check":<22} {"case":<44} {"max |diff|":>11} {"tolerance":>10}  result')
    for c in checks:
        print(f'{c.name:<22} {c.detail:<44} {c.error:11.2e} {c.tolerance:10.0e}  {"ok" if c.ok else "FAIL"}')

    batch = 2 if quick else 8
    repeats = 3 if quick else 10
    print(f'\nspeed, forward+backward, ViT-S layer shape (batch {batch}, 197 tokens, dim 384, 6 heads), CPU:')
    print(f'{"ConvNN":<13} {"ConvNN":>11} {"SDPA attn":>11} {"ratio":>7}')
    for candidates, k in (('all', 16), ('random', 16)):
        print(' '.join(_speed(batch, 197, 384, 6, k, candidates, repeats)))
    failed = [c for c in checks if not c.ok]
    print('\nall identities hold' if not failed else f'\n{len(failed)} identity check(s) FAILED')
    return 1 if failed else 0
