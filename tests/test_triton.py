"""The fused Triton path: backend dispatch (every machine) and the kernels themselves, run by Triton's CPU interpreter
against the PyTorch path (forward, gradients, the custom op's fake / autograd registrations).

On a CUDA machine the same comparison runs on the GPU (bf16 included) in ``test_fused_matches_torch_on_cuda``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from timm_convnn.inspect import neighbors
from timm_convnn.layers import ConvNNAttention, get_backend, set_backend
from timm_convnn.layers import triton_attention


@pytest.fixture
def backend():
    saved = get_backend()
    yield set_backend
    set_backend(saved)


def _layer(**kw):
    torch.manual_seed(0)
    return ConvNNAttention(32, num_heads=2, num_neighbors=6, num_prefix_tokens=1, grid_size=(7, 7), **kw)


def test_backend_switch_and_dispatch_on_cpu(backend, monkeypatch):
    with pytest.raises(ValueError, match="must be one of auto, torch, triton; got 'cuda'"):
        set_backend('cuda')
    calls = []
    monkeypatch.setattr(triton_attention, 'fused_attention', lambda *a: calls.append(a))
    x = torch.randn(2, 50, 32)
    backend('auto')
    _layer()(x)  # CPU tensors: the PyTorch path
    assert calls == [] and get_backend() == 'auto'
    if not triton_attention.interpreting():
        backend('triton')
        if triton_attention.triton is None:
            match = 'Triton cannot run on cpu tensors'
        else:
            match = r'Triton cannot run on cpu tensors \(CUDA, or CPU under TRITON_INTERPRET=1\)'
        with pytest.raises(RuntimeError, match=match):
            _layer()(x)
        # unsupported layers never reach the kernels, whatever the backend
        _layer(candidates='random', num_samples=16)(x)
        _layer(weighting='ones')(x)
        assert calls == []


_INTERPRETED = r'''
import json, sys, torch
import timm, timm_convnn
from timm_convnn.layers import ConvNNAttention, ConvNNBranchAttention, set_backend, triton_attention
from timm_convnn.inspect import neighbors
calls = []
real = triton_attention.fused_attention
triton_attention.fused_attention = lambda *a: calls.append(1) or real(*a)
results = {}

def compare(name, make, x):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if 'aggregate' in n:
                p.normal_()
    g = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(1))
    outs = {}
    for b in ('torch', 'triton'):
        set_backend(b)
        before = len(calls)
        xx = x.detach().requires_grad_()
        y = layer(xx)
        grads = torch.autograd.grad(y, [xx] + list(layer.parameters()), g.to(y.dtype))
        outs[b] = (y.float(), [t.float() for t in grads], len(calls) - before)
    (y0, g0, c0), (y1, g1, c1) = outs['torch'], outs['triton']
    results[name] = dict(out=(y0 - y1).abs().max().item(), scale=y0.abs().max().item(),
                         grad=max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() for a, b in zip(g0, g1)),
                         torch_calls=c0, triton_calls=c1)

x = torch.randn(2, 50, 32)
compare('dot', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, num_prefix_tokens=1, grid_size=(7, 7)), x)
compare('cosine_coords_qknorm', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=9, similarity='cosine',
        coords='append', qk_norm=True, norm_layer=torch.nn.LayerNorm, num_prefix_tokens=1, grid_size=(7, 7)), x)
compare('euclidean_k_clamped', lambda: ConvNNAttention(32, num_heads=4, num_neighbors=64, similarity='euclidean'),
        torch.randn(1, 20, 32))
compare('branch', lambda: ConvNNBranchAttention(32, num_heads=2, branch_ratio=0.5, num_neighbors=5), x)
compare('bf16', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6).to(torch.bfloat16), x.to(torch.bfloat16))

# the custom op's schema, fake (meta) and autograd registrations, as torch.library checks them
qs, ks, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
w = torch.randn(32, 1, 5, requires_grad=True)
torch.library.opcheck(torch.ops.timm_convnn.convnn_attention.default, (qs, ks, v, w, 5),
                      test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))
# a model end to end, and inspection (hooks) falling back to the PyTorch path with the same neighbours
set_backend('triton')
model = timm.create_model('vit_tiny_convnn_all', img_size=32, patch_size=8, depth=2, num_classes=3).eval()
img = torch.randn(2, 3, 32, 32)
before = len(calls)
with torch.no_grad():
    fused = model(img)
results['model_calls'] = len(calls) - before
set_backend('torch')
with torch.no_grad():
    results['model'] = (fused - model(img)).abs().max().item()
set_backend('triton')
before = len(calls)
maps = neighbors(model, img)
results['inspect_calls'] = len(calls) - before
print('RESULT ' + json.dumps(results))
'''


def test_kernels_under_the_triton_interpreter_match_the_pytorch_path(tmp_path):
    if triton_attention.triton is None:
        pytest.fail('triton is not installed: the fused kernels cannot be checked (pip install triton)')
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='2')
    out = subprocess.run([sys.executable, '-c', _INTERPRETED], env=env, capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    r = json.loads(out.stdout.split('RESULT ', 1)[1])
    for case in ('dot', 'cosine_coords_qknorm', 'euclidean_k_clamped', 'branch', 'bf16'):
        c = r[case]
        assert c['torch_calls'] == 0 and c['triton_calls'] == 1, (case, c)  # each path really ran
        tol = (3e-2, 3e-2) if case == 'bf16' else (1e-5, 1e-4)
        assert c['out'] <= tol[0] * max(1., c['scale']), (case, c)
        assert c['grad'] <= tol[1], (case, c)
    assert r['model_calls'] == 2 and r['model'] < 1e-5  # one fused call per block
    assert r['inspect_calls'] == 0  # hooked aggregation: the PyTorch path, so the records are what ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (the CPU interpreter test covers the '
                                                          'kernel logic on every machine)')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_matches_torch_on_cuda(dtype, backend):
    torch.manual_seed(0)
    layer = ConvNNAttention(384, num_heads=6, num_neighbors=16, num_prefix_tokens=1, grid_size=(14, 14)).cuda()
    x = torch.randn(8, 197, 384, device='cuda', dtype=dtype, requires_grad=True)
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        backend('torch')
        y0 = layer(x)
        g0 = torch.autograd.grad(y0.float().sum(), [x] + list(layer.parameters()))
        backend('auto')
        y1 = layer(x)
        g1 = torch.autograd.grad(y1.float().sum(), [x] + list(layer.parameters()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (y0.float() - y1.float()).abs().max() <= tol * y0.float().abs().max()
    for a, b in zip(g0, g1):
        assert (a.float() - b.float()).abs().max() <= 10 * tol * a.float().abs().max()
