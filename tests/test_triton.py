"""The fused Triton path: backend dispatch (every machine) and the kernels themselves, run by Triton's CPU interpreter
against the PyTorch path (forward, gradients, the custom op's fake / autograd registrations).

On a CUDA machine the same comparison runs on the GPU (bf16 included) in ``test_fused_matches_torch_on_cuda``.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from timm_convnn.inspect import neighbors
from timm_convnn.layers import ConvNN2d, ConvNNAttention, get_backend, set_backend
from timm_convnn.layers import triton_attention
from timm_convnn.layers.functional import select_scored_neighbors


@pytest.fixture
def backend():
    saved = get_backend()
    yield set_backend
    set_backend(saved)


def _require_kernels(what: str) -> None:
    """Fail without triton (CI installs torch, which brings it); skip with a triton too old for the kernels, where the
    fused path is off (``test_fused_path_needs_a_recent_triton``)."""
    if triton_attention.triton is None:
        pytest.fail(f'triton is not installed: the fused kernels cannot be {what} (pip install triton)')
    reason = triton_attention.triton_unavailable_reason(torch.device('cuda'))
    if reason is not None:
        pytest.skip(reason)


def _layer(**kw):
    torch.manual_seed(0)
    return ConvNNAttention(32, num_heads=2, num_neighbors=6, num_prefix_tokens=1, grid_size=(7, 7), **kw)


def test_backend_switch_and_dispatch_on_cpu(backend, monkeypatch):
    with pytest.raises(ValueError, match="must be one of auto, torch, triton; got 'cuda'"):
        set_backend('cuda')
    calls = []
    monkeypatch.setattr(triton_attention, 'fused_attention', lambda *a: calls.append(a))
    monkeypatch.setattr(triton_attention, 'fused_select', lambda *a: calls.append(a))
    x, img = torch.randn(2, 50, 32), torch.randn(1, 8, 6, 6)
    backend('auto')
    _layer()(x)  # CPU tensors: the PyTorch path
    _layer(weighting='ones')(x)
    ConvNN2d(8, 8)(img)
    assert calls == [] and get_backend() == 'auto'
    if not triton_attention.interpreting():
        # TRITON_INTERPRET set after the kernels were decorated (compiled ones): still no CPU path, the clear error
        monkeypatch.setenv('TRITON_INTERPRET', '1')
        backend('triton')
        reason = triton_attention.triton_unavailable_reason(x.device)  # no triton, too old a triton, or this:
        if triton_attention.triton_available(torch.device('cuda')):
            assert reason == ('the fused ConvNN kernels run on CUDA tensors (or on CPU tensors under '
                              'TRITON_INTERPRET=1); got cpu tensors')
        match = 'set_backend is "triton" but ' + re.escape(reason)
        with pytest.raises(RuntimeError, match=match):
            _layer()(x)
        with pytest.raises(RuntimeError, match=match):  # sampled candidates: fused under 'triton'
            _layer(candidates='random', num_samples=16)(x)
        # layers the fused forward does not cover select their neighbours with the fused selection kernel, sampled
        # candidates included
        for run in (lambda: _layer(weighting='ones')(x), lambda: _layer(neighbor_order='position')(x),
                    lambda: ConvNN2d(8, 8)(img),
                    lambda: _layer(weighting='ones', candidates='random', num_samples=16)(x),
                    lambda: ConvNN2d(8, 8, candidates='spatial', num_samples=9)(img)):
            with pytest.raises(RuntimeError, match=match):
                run()
        # and fp64 reaches no kernel, whatever the backend (they compute in fp32)
        _layer(weighting='ones').double()(x.double())
        ConvNN2d(8, 8).double()(img.double())
        assert calls == []


def test_fused_select_rejects_bad_input():
    x, wide = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 130)
    with pytest.raises(ValueError, match=r'expects \(B, G, N, D\) and \(B, G, M, D\) features; got \(5, 4\) and'):
        triton_attention.fused_select(x[0, 0], x[0, 0], 3)
    with pytest.raises(ValueError, match=r'got \(1, 1, 5, 4\) and \(1, 1, 5, 130\)'):
        triton_attention.fused_select(x, wide, 3)
    with pytest.raises(ValueError, match=r'at most 128 channels and 1 <= K <= 64 \(K is clamped to the token count\); '
                                         r'got 4 channels, K 0, 5 tokens'):
        triton_attention.fused_select(x, x, 0)
    with pytest.raises(ValueError, match='got 130 channels, K 3, 5 tokens'):
        triton_attention.fused_select(wide, wide, 3)
    with pytest.raises(ValueError, match=r'takes fp32 / half / bf16 features \(it computes in fp32\); got '
                                         r'torch.float64 and torch.float64'):
        triton_attention.fused_select(x.double(), x.double(), 3)
    big = torch.randn(1, 1, 100, 4)
    with pytest.raises(ValueError, match='got 4 channels, K 65, 100 tokens'):
        triton_attention.fused_select(big, big, 65)
    # a candidate list: (r,) token ids, with the (N,) token id of every query; K is clamped to r
    cand, qid = torch.tensor([0, 2, 4]), torch.arange(5)
    with pytest.raises(ValueError, match=r'takes a candidate list as \(r,\) token ids with the \(N,\) = \(5,\) token '
                                         r'ids of the queries; got candidates \(3,\) and query_index None'):
        triton_attention.fused_select(x, x, 3, cand)
    with pytest.raises(ValueError, match=r'got candidates \(3,\) and query_index \(4,\)'):
        triton_attention.fused_select(x, x, 3, cand, qid[:4])
    with pytest.raises(ValueError, match=r'got candidates \(1, 3\) and query_index \(5,\)'):
        triton_attention.fused_select(x, x, 3, cand[None], qid)
    with pytest.raises(ValueError, match='takes integer token ids; got torch.float32 and torch.int64'):
        triton_attention.fused_select(x, x, 3, cand.float(), qid)
    with pytest.raises(ValueError, match=r'\(K is clamped to the candidate count\); got 4 channels, K 3, 0 candidates'):
        triton_attention.fused_select(x, x, 3, cand[:0], qid)
    with pytest.raises(ValueError, match=r"takes token ids on the features' device \(cpu\); got meta and cpu"):
        triton_attention.fused_select(x, x, 3, cand.to('meta'), qid)
    if not triton_attention.interpreting():  # well-formed: then whether Triton runs on these tensors
        with pytest.raises(RuntimeError, match=re.escape(triton_attention.triton_unavailable_reason(x.device))):
            triton_attention.fused_select(x, x, 3)


def test_fused_selection_covers_what_the_kernel_takes():
    # what functional.select_scored_neighbors hands to the selection kernel (the backend decides the rest)
    def supported(qs, ks, k, candidates=None, query_index=None):
        return triton_attention.select_unsupported(qs, ks, k, candidates, query_index) is None

    def feats(n, d=64, dtype=torch.bfloat16):
        return torch.empty(2, 1, n, d, device='meta', dtype=dtype)

    assert supported(feats(3136), feats(3364), 9)  # a ResNet stage-1 map (queries, padded candidates)
    assert supported(feats(49, 66, torch.float32), feats(81, 66, torch.float32), 9)  # coordinates appended
    assert supported(feats(50), feats(50), 100)  # K clamps to the 50 tokens
    assert not supported(feats(100), feats(100), 100)  # K 100 > MAX_NEIGHBORS
    assert not supported(feats(10, dtype=torch.float64), feats(10, dtype=torch.float64), 3)  # fp64: in fp64
    assert not supported(feats(10, 130), feats(10, 130), 3)  # wider than MAX_SELECT_DIM
    assert not supported(feats(10), feats(0), 3)  # no candidates
    assert not supported(feats(10)[0], feats(10)[0], 3)  # not (B, G, N, D)
    # sampled candidates: a ResNet stage-1 layer with 64 random candidates on the padded map, K clamped to r
    cand, qid = torch.arange(64, device='meta'), torch.arange(3136, device='meta')
    assert supported(feats(3136), feats(3364), 9, cand, qid)
    assert not supported(feats(3136), feats(3364), 9, torch.arange(64), qid)  # ids on another device
    assert supported(feats(3136), feats(3364), 100, cand, qid)  # K 100 clamps to the 64 candidates
    assert not supported(feats(3136), feats(3364), 9, cand, None)  # the queries' own tokens are needed
    assert not supported(feats(3136), feats(3364), 9, cand[:0], qid)  # no candidates


# (shared by the interpreted scripts below)
_RANDOMIZED_LAYER = r'''
import torch

def randomized(make, x):
    """make()'s layer with normal aggregation weights (unit ones would hide a slot-order bug) and a fixed incoming
    gradient for its output on x."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if 'aggregate' in n:
                p.normal_()
    return layer, torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(1))
'''

# (shared by the interpreted scripts below: the fused op's output against a selection from the definition)
_REFERENCE = r'''
import torch

def against_reference(fused, v, w, order, val):
    """The fused op's (out, idx, p) for 2 heads of 16 value channels against the selection ``order`` (token ids) with
    scores ``val``: softmax weights, and the depthwise-weighted sum of the selected value rows."""
    out, idx, p = fused
    n, kk = v.shape[2], order.shape[-1]
    rows = torch.gather(v.double().unsqueeze(2).expand(1, 2, n, n, 16), 3,
                        order.unsqueeze(-1).expand(-1, -1, -1, -1, 16))
    weights = w.double().view(2, 16, kk).transpose(1, 2).view(1, 2, 1, kk, 16)
    ref = (rows * val.softmax(-1).unsqueeze(-1) * weights).sum(3)
    return dict(ids_equal=bool((idx.long() == order).all()), out=(out.double() - ref).abs().max().item(),
                p=(p.double() - val.softmax(-1)).abs().max().item())
'''

_INTERPRETED = _RANDOMIZED_LAYER + _REFERENCE + r'''
import json, sys, torch
import timm, timm_convnn
from timm_convnn.layers import ConvNN2d, ConvNNAttention, ConvNNBranchAttention, set_backend, triton_attention
from timm_convnn.inspect import neighbors
from timm_convnn.layers import attention as convnn_attention, conv2d as convnn_conv2d
torch.manual_seed(0)  # torch seeds its default generator at random in every process
calls, sel_calls = [], []  # fused forwards; fused selections alone
real, real_select = triton_attention.fused_attention, triton_attention.fused_select
triton_attention.fused_attention = lambda *a: calls.append(1) or real(*a)
triton_attention.fused_select = lambda *a: sel_calls.append(1) or real_select(*a)
results = {}

# The selection margin of a PyTorch-path forward: the smallest gap between consecutive scores among the K + 1 best of
# a query (fp64; relative to the largest of them in that row). Ranking by fp32 sums in another order (the
# interpreter's numpy dot against torch's matmul) can only flip gaps near fp32 rounding, so every comparison below
# states a margin well above it: the fused and PyTorch paths must then keep the same neighbours in the same order.
margins = []
select = convnn_attention._select_scored

def recording_select(qs, ks, k, candidates=None, query_index=None):
    top = select(qs.double(), ks.double(), k + 1, candidates, query_index)[1]
    if top.shape[-1] > 1:
        scale = top.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        margins.append(((top[..., :-1] - top[..., 1:]) / scale).min().item())
    return select(qs, ks, k, candidates, query_index)

def margin_of(run):
    """run() on the PyTorch path -> its smallest selection margin."""
    set_backend('torch')
    del margins[:]
    convnn_attention._select_scored = convnn_conv2d._select_scored = recording_select
    try:
        with torch.no_grad():
            run()
    finally:
        convnn_attention._select_scored = convnn_conv2d._select_scored = select
    return min(margins)

def compare(name, make, x):
    layer, g = randomized(make, x)
    outs = {}
    for b in ('torch', 'triton'):
        set_backend(b)
        before, before_sel = len(calls), len(sel_calls)
        xx = x.detach().requires_grad_()
        y = layer(xx)
        grads = torch.autograd.grad(y, [xx] + list(layer.parameters()), g.to(y.dtype))
        outs[b] = (y.float(), [t.float() for t in grads], len(calls) - before, len(sel_calls) - before_sel)
    (y0, g0, c0, s0), (y1, g1, c1, s1) = outs['torch'], outs['triton']
    results[name] = dict(out=(y0 - y1).abs().max().item(), scale=y0.abs().max().item(),
                         grad=max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
                                  for a, b in zip(g0, g1)),
                         torch_calls=c0 + s0, triton_calls=c1, select_calls=s1, margin=margin_of(lambda: layer(x)))

x = torch.randn(2, 50, 32)
compare('dot', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, num_prefix_tokens=1, grid_size=(7, 7)), x)
# head dim 24: a dot scale (24 ** -0.5) that is not a power of two, applied inside the kernels
compare('dot_d24', lambda: ConvNNAttention(48, num_heads=2, num_neighbors=6),
        torch.randn(2, 50, 48, generator=torch.Generator().manual_seed(2)))


def saved_qkv_storages():
    # the dot similarity's scale is applied inside the kernels: autograd keeps q, k and v as the views of timm's
    # qkv buffer that they are, no scaled copy of q
    set_backend('triton')
    layer = ConvNNAttention(32, num_heads=2, num_neighbors=6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 50, 32, requires_grad=True))
    feats = [t for t in saved if t.shape == (2, 2, 50, 16)]
    return dict(features=len(feats), storages=len({t.untyped_storage().data_ptr() for t in feats}))

results['saved_qkv'] = saved_qkv_storages()
compare('cosine_coords_qknorm', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=9, similarity='cosine',
        coords='append', qk_norm=True, norm_layer=torch.nn.LayerNorm, num_prefix_tokens=1, grid_size=(7, 7)), x)
compare('euclidean_k_clamped', lambda: ConvNNAttention(32, num_heads=4, num_neighbors=64, similarity='euclidean'),
        torch.randn(1, 20, 32))
compare('branch', lambda: ConvNNBranchAttention(32, num_heads=2, branch_ratio=0.5, num_neighbors=5), x)
compare('bf16', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6).to(torch.bfloat16), x.to(torch.bfloat16))
compare('fp16', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6).to(torch.float16), x.to(torch.float16))
# more than ROW_TOKENS tokens: the streaming forward (key tiles through a running top-K buffer)
compare('stream', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=9, num_prefix_tokens=1, grid_size=(17, 17)),
        torch.randn(1, 290, 32))
# 64 queries per program: the streaming kernel's built-in block for half / bf16 inputs on a GPU
triton_attention.CONFIG['fwd_block_m'] = 64
compare('stream_64', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=9, num_prefix_tokens=1,
        grid_size=(17, 17)), torch.randn(1, 290, 32))
triton_attention.CONFIG['fwd_block_m'] = None
# the backward on 8 queries per program and one warp (built in for half / bf16 inputs at n <= ROW_TOKENS, K <= 16)
triton_attention.CONFIG.update(bwd_block_m=8, bwd_warps=1)
compare('bwd_8', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, num_prefix_tokens=1, grid_size=(7, 7)), x)
triton_attention.CONFIG.update(bwd_block_m=None, bwd_warps=None)

def sampled(mode, k, r, dtype=torch.float32):
    # sampled candidates on a 7 x 7 patch grid plus a class token, in eval (the same candidates for both paths)
    return lambda: ConvNNAttention(32, num_heads=2, num_neighbors=k, candidates=mode, num_samples=r,
                                   num_prefix_tokens=1, grid_size=(7, 7)).eval().to(dtype)

# sampled candidates, the query itself always a candidate
compare('random', sampled('random', 9, 20), x)
# the list ranked as one score row (CONFIG fwd_listed='row': the r listed tokens and each query's own token)
triton_attention.CONFIG['fwd_listed'] = 'row'
compare('random_row', sampled('random', 9, 20), x)
compare('spatial_row', sampled('spatial', 6, 16), x)
compare('random_row_k_is_r', sampled('random', 12, 12), x)
# and the backward's dk / dv summed per listed token first (CONFIG bwd_listed='dense'), with either forward
triton_attention.CONFIG['bwd_listed'] = 'dense'
compare('spatial_row_dense', sampled('spatial', 6, 16), x)
triton_attention.CONFIG['fwd_listed'] = None
# 16 list positions at a time: the 20 listed tokens in two tiles, the second part masked (the built-in 64: one)
triton_attention.CONFIG['bwd_block_c'] = 16
compare('random_dense', sampled('random', 9, 20), x)
triton_attention.CONFIG['bwd_block_c'] = None
# bf16 inputs: the half / bf16 launch (32 queries, 64 list positions at a time; fp32 ones take 16 queries)
compare('random_dense_bf16', sampled('random', 9, 20, torch.bfloat16),
        torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))


def dense_op_case():
    # the op itself: the dense sums equal the per-pair atomics, and they do read the list (a shorter list drops the
    # terms of the tokens it leaves out), with 29 % of the queries keeping their own token
    g = torch.Generator().manual_seed(0)
    qs, ks, v, go = (torch.randn(2, 2, 50, 16, generator=g) for _ in range(4))
    w = torch.randn(32, 1, 6, generator=g)
    cand = torch.randperm(50, generator=g)[:20]
    _, idx, p = triton_attention._convnn_attention(qs, ks, v, w, 6, cand)
    grads = {}
    for name, dense, listed in (('atomic', None, cand), ('dense', 'dense', cand), ('short', 'dense', cand[:10])):
        triton_attention.CONFIG['bwd_listed'] = dense
        grads[name] = triton_attention._convnn_attention_backward(go, qs, ks, v, w, idx, p, listed)
    own = (idx == torch.arange(50).view(1, 1, 50, 1)).any(-1).float().mean().item()
    return dict(diff=max((a - b).abs().max().item() for a, b in zip(grads['atomic'], grads['dense'])),
                short=min((grads['atomic'][i] - grads['short'][i]).abs().max().item() for i in (1, 2)), own=own)

results['dense_op'] = dense_op_case()
triton_attention.CONFIG['bwd_listed'] = None
# the backward's dk / dv spread over copies (CONFIG bwd_row_copies), summed after the kernel
triton_attention.CONFIG['bwd_row_copies'] = 4
compare('random_row_copies', sampled('random', 9, 20), x)
triton_attention.CONFIG['bwd_row_copies'] = None
compare('spatial', sampled('spatial', 6, 16), x)
compare('random_k_is_r', sampled('random', 12, 12), x)
# fp32 heads of more than 64 channels: the query's own token enters the buffer after the candidates, not first
compare('random_wide', lambda: ConvNNAttention(160, num_heads=2, num_neighbors=9, candidates='random', num_samples=20,
        num_prefix_tokens=1, grid_size=(7, 7)).eval(),
        torch.randn(2, 50, 160, generator=torch.Generator().manual_seed(0)))

# exact ties (small integer vectors: exact fp32 dot products in any order): both forwards keep the K best by
# (score descending, token id ascending), as a stable sort does
def tie_case(n, kk):
    g = torch.Generator().manual_seed(n)
    qs, ks = (torch.randint(-2, 3, (1, 2, n, 16), generator=g).float() for _ in range(2))
    v, w = torch.randn(1, 2, n, 16, generator=g), torch.randn(32, 1, kk, generator=g)
    s = qs.double() @ ks.double().transpose(-1, -2)
    order = torch.sort(-s, dim=-1, stable=True).indices[..., :kk]
    ties = int((s.unsqueeze(-1) == s.unsqueeze(-2)).sum() - s.numel())
    return dict(against_reference(triton_attention._convnn_attention(qs, ks, v, w, kk), v, w, order,
                                  s.gather(-1, order)), ties=ties)

results['ties_row'] = tie_case(40, 5)
results['ties_stream'] = tie_case(triton_attention.ROW_TOKENS + 14, 16)

# the row kernel's bitonic selection variant (CONFIG fwd_select='topk'): same neighbours, same ties
triton_attention.CONFIG['fwd_select'] = 'topk'
compare('dot_topk', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, num_prefix_tokens=1, grid_size=(7, 7)),
        x)
compare('euclidean_k_clamped_topk', lambda: ConvNNAttention(32, num_heads=4, num_neighbors=64,
        similarity='euclidean'), torch.randn(1, 20, 32))
results['ties_row_topk'] = tie_case(40, 5)
triton_attention.CONFIG['fwd_select'] = None

# packed int32 keys (CONFIG fwd_keys='packed'): the ranking and the softmax weights are those of the scores with
# their last log2(BLOCK_N) ordered bits dropped, ties (now also scores that differ only in those bits) to the
# smallest id. One similarity channel and power-of-two query scales make every fp32 score exact, so the reference is
# computed from the definition; every odd key copies the key before it up to its two lowest bits (a packed tie).
def packed_case(n, kk):
    g = torch.Generator().manual_seed(n)
    ks = torch.randn(1, 2, n, 1, generator=g)
    bits = ks.view(torch.int32)
    bits[:, :, 1::2] = bits[:, :, 0:n - 1:2] ^ 3
    sign = torch.randint(0, 2, (1, 2, n, 1), generator=g) * 2. - 1
    qs = torch.randint(-1, 2, (1, 2, n, 1), generator=g).float().exp2() * sign
    v, w = torch.randn(1, 2, n, 16, generator=g), torch.randn(32, 1, kk, generator=g)
    s = qs * ks.transpose(-1, -2)  # exact
    b = s.view(torch.int32).long()
    ordered = torch.where(b >= 0, b, b ^ 0x7FFFFFFF)
    hi = ordered & -triton_attention._pow2(n)
    order = torch.sort(-hi, dim=-1, stable=True).indices[..., :kk]
    h = hi.gather(-1, order)
    val = torch.where(h >= 0, h, h ^ 0x7FFFFFFF).int().view(torch.float32).double()
    exact = torch.sort(-s.double(), dim=-1, stable=True).indices[..., :kk]
    return dict(against_reference(triton_attention._convnn_attention(qs, ks, v, w, kk), v, w, order, val),
                rows_unlike_exact=int((order != exact).any(-1).sum()))

triton_attention.CONFIG['fwd_keys'] = 'packed'
results['packed_row'] = packed_case(40, 6)
# 64 queries per program (two blocks, the second partial), the launch kernel_sweep.py times against the bitonic one
triton_attention.CONFIG['fwd_block_m'] = 64
results['packed_row_64'] = packed_case(100, 6)
triton_attention.CONFIG['fwd_block_m'] = None
# a layer on random fp32 input: the same neighbours as the exact PyTorch path only where no two of a query's K + 1 best
# scores share a packed bucket (at most 2**-17 of the score at 64 columns), so the input is the first of a fixed
# series whose selection margin is 4x that (near-ties that close occur in about 1 random input in 100)
def compare_packed(name, make):
    for seed in range(100):
        x_packed = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(0)
        layer = make()
        if margin_of(lambda: layer(x_packed)) > 2 ** -15:
            break
    compare(name, make, x_packed)

compare_packed('dot_packed', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, num_prefix_tokens=1,
                                                     grid_size=(7, 7)))
# a candidate list ranked as one row (CONFIG fwd_listed='row') on packed keys: the list's columns, then the query's own
triton_attention.CONFIG['fwd_listed'] = 'row'
compare_packed('random_row_packed', sampled('random', 9, 20))
triton_attention.CONFIG['fwd_listed'] = None
# rounds that take two keys at a time (CONFIG fwd_select='pairs'), K even and odd, and on a listed row
triton_attention.CONFIG['fwd_select'] = 'pairs'
results['packed_row_pairs'] = packed_case(40, 6)
results['packed_row_pairs_odd_k'] = packed_case(40, 5)
triton_attention.CONFIG['fwd_listed'] = 'row'
compare_packed('random_row_packed_pairs', sampled('random', 9, 20))
triton_attention.CONFIG['fwd_listed'] = None
triton_attention.CONFIG['fwd_select'] = 'topk'
results['packed_row_topk'] = packed_case(40, 6)
# 64 queries per program (two blocks, the second partial): the bitonic packed launch timed fastest at B 256 on the H200
triton_attention.CONFIG['fwd_block_m'] = 64
results['packed_row_topk_64'] = packed_case(100, 6)
triton_attention.CONFIG['fwd_block_m'] = None
results['ties_row_topk_packed'] = tie_case(40, 5)
triton_attention.CONFIG.update(fwd_select=None, fwd_keys=None)

# selection alone (fused_select): the layers the fused forward does not cover take the kernel's neighbours and
# aggregate in PyTorch. ConvNN2d: queries on the (strided) map, candidates on the zero-padded one (more than
# ROW_TOKENS of them in the last case)
img = torch.randn(2, 8, 9, 9)
compare('cnn', lambda: ConvNN2d(8, 6, num_neighbors=9, padding=1), img)
# (no padding here: zero pixels at mirror-image coordinates would tie exactly)
compare('cnn_strided_euclidean_coords_softmax', lambda: ConvNN2d(8, 6, num_neighbors=9, stride=2,
        similarity='euclidean', coords='append', weighting='softmax'), img)
compare('cnn_depthwise_position', lambda: ConvNN2d(8, 8, num_neighbors=16, similarity='dot', aggregation='depthwise',
        neighbor_order='position'), torch.randn(1, 8, 17, 17))
compare('attention_ones', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, weighting='ones',
        num_prefix_tokens=1, grid_size=(7, 7)), x)
# sampled candidates, the selection alone: candidates and each query's own pixel on the padded map (two key tiles in
# the first case), a strided grid, and attention with ones weights
compare('cnn_random', lambda: ConvNN2d(8, 6, num_neighbors=9, padding=1, candidates='random', num_samples=100).eval(),
        torch.randn(1, 8, 17, 17))
compare('cnn_spatial_strided_softmax', lambda: ConvNN2d(8, 6, num_neighbors=6, stride=2, padding=1,
        candidates='spatial', num_samples=16, weighting='softmax').eval(), img)
compare('attention_ones_random', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, weighting='ones',
        candidates='random', num_samples=20, num_prefix_tokens=1, grid_size=(7, 7)).eval(), x)
# fp32 features of more than 64 channels: the query's own token enters the buffer after the candidates, not first
# (an input whose selection margin is well above fp32 rounding: 9e-5)
compare('cnn_random_wide', lambda: ConvNN2d(80, 6, num_neighbors=9, padding=1, candidates='random',
        num_samples=40).eval(), torch.randn(1, 80, 9, 9, generator=torch.Generator().manual_seed(2)))
# the conv identity through the kernel: coordinate-only euclidean ConvNN2d picks each pixel's 3 x 3 window
set_backend('triton')
conv = torch.nn.Conv2d(8, 5, 3, padding=1)
before = len(sel_calls)
with torch.no_grad():
    results['conv_identity'] = dict(err=(ConvNN2d.from_conv2d(conv)(img) - conv(img)).abs().max().item(),
                                    select_calls=len(sel_calls) - before)

# exact ties, as for the fused forward: the K best by (score descending, token id ascending)
def select_tie_case(n, m, kk):
    g = torch.Generator().manual_seed(m)
    qs = torch.randint(-2, 3, (2, 1, n, 16), generator=g).float()
    ks = torch.randint(-2, 3, (2, 1, m, 16), generator=g).float()
    s = qs.double() @ ks.double().transpose(-1, -2)
    order = torch.sort(-s, dim=-1, stable=True).indices[..., :kk]
    idx, val = triton_attention.fused_select(qs, ks, kk)
    ties = int((s.unsqueeze(-1) == s.unsqueeze(-2)).sum() - s.numel())
    return dict(ids_equal=bool((idx == order).all()), scores=(val.double() - s.gather(-1, order)).abs().max().item(),
                ties=ties, dtype=str(idx.dtype))

results['select_ties'] = select_tie_case(30, 90, 9)

# with a candidate list (shuffled; some queries listed in it, some not): the K kept are K best of the listed tokens
# and the query's own (with exact ties at the K-th place, any of the tied), ranked by (score descending, id ascending)
def select_listed_tie_case(n, m, r, kk, d=16):
    g = torch.Generator().manual_seed(m + r)
    qs = torch.randint(-2, 3, (2, 1, n, d), generator=g).float()
    ks = torch.randint(-2, 3, (2, 1, m, d), generator=g).float()
    cand, qid = torch.randperm(m, generator=g)[:r], torch.randperm(m, generator=g)[:n]
    idx, val = triton_attention.fused_select(qs, ks, kk, cand, qid)
    s = qs.double() @ ks.double().transpose(-1, -2)
    allowed = torch.zeros(n, m, dtype=torch.bool)
    allowed[:, cand] = True
    allowed[torch.arange(n), qid] = True
    best = s.masked_fill(~allowed, float('-inf')).sort(-1, descending=True).values[..., :kk]
    kept = s.gather(-1, idx)
    ids = idx.sort(-1).values
    tied = kept[..., 1:] == kept[..., :-1]
    return dict(k_best=bool((kept == best).all()),
                listed=bool(allowed.expand(2, 1, n, m).gather(-1, idx).all()),
                unique=bool((ids[..., 1:] > ids[..., :-1]).all()),
                order=bool(((idx[..., 1:] > idx[..., :-1]) | ~tied).all()), ties=int(tied.sum()),
                scores=(val.double() - kept).abs().max().item(), shape=list(idx.shape), dtype=str(idx.dtype))

results['select_listed_ties'] = select_listed_tie_case(30, 90, 40, 9)
results['select_listed_ties_tiles'] = select_listed_tie_case(40, 120, 80, 16)  # 80 candidates: two key tiles
results['select_listed_ties_wide'] = select_listed_tie_case(30, 90, 40, 9, d=80)  # the query's own token last

# CONFIG fwd_stream='threshold': a pass bounding each query's K-th best score, then every key scoring at least the
# bound collected into a scratch of STREAM_CAP per query and ranked; a block with a query over that takes the merge
# loop. ``kept``: the most keys a query keeps (benchmarks/stream_rounds.py models the kernel's bound)
import importlib.util
spec = importlib.util.spec_from_file_location('stream_rounds', STREAM_ROUNDS)
stream_rounds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stream_rounds)

def most_kept(qs, ks, kk):
    s = (qs.double() @ ks.double().transpose(-1, -2)).reshape(-1, ks.shape[-2])
    per_tile = triton_attention._tile_values(ks.shape[-2], kk)
    return int(stream_rounds.threshold_counts(s, kk, triton_attention.STREAM_BLOCK_N, per_tile).max())

def threshold_tie_case(n, kk):
    g = torch.Generator().manual_seed(n)
    qs, ks = (torch.randint(-2, 3, (1, 2, n, 16), generator=g).float() for _ in range(2))
    return dict(tie_case(n, kk), kept=most_kept(qs, ks, kk))  # tie_case draws the same features

# (on 64 queries per program, the launch for half / bf16 inputs on a GPU: under the interpreter a program costs about
# the same whatever its size, and the threshold passes on 16 took 4.6x as long)
triton_attention.CONFIG.update(fwd_stream='threshold', fwd_block_m=64)
compare('stream_threshold_64', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=9, num_prefix_tokens=1,
        grid_size=(17, 17)), torch.randn(1, 290, 32))
results['ties_stream_threshold'] = threshold_tie_case(triton_attention.ROW_TOKENS + 14, 16)
# blocks with a query over a scratch of 16: the merge loop's answer, through the scratch
triton_attention.STREAM_CAP = 16
results['ties_stream_threshold_over'] = threshold_tie_case(triton_attention.ROW_TOKENS + 14, 16)
triton_attention.STREAM_CAP = 64
results['select_ties_threshold'] = select_tie_case(30, 300, 9)
triton_attention.CONFIG.update(fwd_stream=None, fwd_block_m=None)

# Non-finite features (what fp16 overflow hands over), forward and selection alone. NaN scores rank first, as
# torch.topk ranks them on the PyTorch path (triton_attention._nan_first): a query whose features are NaN keeps the
# first K tokens and its output is NaN; a NaN key is every query's first neighbour, so its head's outputs are NaN, as
# on the PyTorch path and in attention. A query whose scores are all -inf leaves buffer slots empty in the streaming
# kernels, whose ids lie outside the tokens: every id stored is still a token's (the aggregation and the backward
# gather with them) and that query's output is NaN, as on the PyTorch path. The rest stays finite.
def nan_case(n, what, listed=None):
    g = torch.Generator().manual_seed(3)
    qs, ks, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    w = torch.randn(32, 1, 9, generator=g)
    cand = None if listed is None else torch.randperm(n, generator=g)[:listed]
    if cand is not None:
        cand[0] = 5  # the NaN key is listed
    bad = torch.zeros(2, n, dtype=torch.bool)
    if what == 'key':
        ks[0, 1, 5] = float('nan')
        bad[1] = True
    else:
        bad[1, 5] = True
        if what == 'query':
            qs[0, 1, 5] = float('nan')
        else:  # every score -inf
            ks[0, 1, :, 0] = ks[0, 1, :, 0].abs() + 0.1
            qs[0, 1, 5] = 0.
            qs[0, 1, 5, 0] = float('-inf')
    qid = None if cand is None else torch.arange(n)
    out, idx, _ = triton_attention._convnn_attention(qs, ks, v, w, 9, cand)
    sel = triton_attention.fused_select(qs, ks, 9, cand, qid)[0]
    set_backend('torch')
    ref = convnn_attention._select_scored(qs, ks, 9, cand, qid)[0]
    set_backend('triton')
    r = dict(ids=bool(all(((i >= 0) & (i < n)).all() for i in (idx, sel))), nan=bool(out[0][bad].isnan().all()),
             rest=bool(out[0][~bad].isfinite().all()))
    if what == 'key':
        r['first'] = [bool((i[0, 1, :, 0] == 5).all()) for i in (idx, sel, ref)]
    return r

for launch, config in (('row', {}), ('row_packed', dict(fwd_keys='packed')), ('row_topk', dict(fwd_select='topk')),
                       ('stream', {}), ('stream_threshold', dict(fwd_stream='threshold', fwd_block_m=64)),
                       ('listed', {}), ('listed_row', dict(fwd_listed='row'))):
    triton_attention.CONFIG.update(config)
    n, listed = (260, None) if launch.startswith('stream') else (40, 20 if launch.startswith('listed') else None)
    # a NaN key on every launch; -inf scores (empty slots) where the buffer streams; a NaN query once
    for what in ('key',) + (('inf',) if launch in ('stream', 'stream_threshold', 'listed') else ()) + (
            ('query',) if launch == 'stream' else ()):
        results[f'nan_{what}_{launch}'] = nan_case(n, what, listed)
    triton_attention.CONFIG.update({key: None for key in config})

# the custom op's schema, fake (meta) and autograd registrations, as torch.library checks them
qs, ks, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
w = torch.randn(32, 1, 5, requires_grad=True)
torch.library.opcheck(torch.ops.timm_convnn.convnn_attention.default, (qs, ks, v, w, 5),
                      test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))
torch.library.opcheck(torch.ops.timm_convnn.convnn_attention.default, (qs, ks, v, w, 5, None, 0.25),
                      test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))
# with a candidate list, which the autograd context keeps for the backward (CONFIG bwd_listed='dense' reads it)
for dense in (None, 'dense'):
    triton_attention.CONFIG['bwd_listed'] = dense
    torch.library.opcheck(torch.ops.timm_convnn.convnn_attention.default,
                          (qs, ks, v, w, 5, torch.tensor([3, 0, 9, 4, 12, 7])),
                          test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))
triton_attention.CONFIG['bwd_listed'] = None
# with attention dropout's noise, which the autograd context keeps for the backward too
noise = torch.nn.functional.dropout(torch.ones(1, 2, 17, 5), 0.3)
torch.library.opcheck(torch.ops.timm_convnn.convnn_attention.default, (qs, ks, v, w, 5, None, 0.25, noise),
                      test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))
torch.library.opcheck(torch.ops.timm_convnn.convnn_select.default, (qs.detach(), ks.detach(), 5),
                      test_utils=('test_schema', 'test_faketensor'))
torch.library.opcheck(torch.ops.timm_convnn.convnn_select.default,
                      (qs.detach(), ks.detach(), 5, torch.tensor([3, 0, 9, 4]), torch.arange(17)),
                      test_utils=('test_schema', 'test_faketensor'))
# double backward (create_graph=True and a second backward, a gradient penalty): the eager fused op refuses the second
# derivative (its gradients have no graph: it would silently lack the ConvNN term); the first one is the plain one
set_backend('triton')
layer = ConvNNAttention(16, num_heads=2, num_neighbors=4)
x = torch.randn(1, 9, 16, requires_grad=True)
g, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
results['double_backward_first'] = (g - torch.autograd.grad(layer(x).square().sum(), x)[0]).abs().max().item()
try:
    g.square().sum().backward()
    results['double_backward'] = 'ran'
except RuntimeError as e:
    results['double_backward'] = 'ConvNN has no double backward (the fused attention kernels)' in str(e)
# a backward hook on the aggregation (as a forward one) takes the layer to the PyTorch path, where it fires
hooked = []
layer.aggregate.register_full_backward_hook(lambda m, grad_in, grad_out: hooked.append(1))
before = len(calls)
layer(x).sum().backward()
results['backward_hook'] = [len(calls) - before, len(hooked)]
# a model end to end, and inspection (hooks) falling back to the PyTorch path with the same neighbours
model = timm.create_model('vit_tiny_convnn_all', img_size=32, patch_size=8, depth=2, num_classes=3).eval()
img = torch.randn(2, 3, 32, 32)
before = len(calls)
with torch.no_grad():
    fused = model(img)
results['model_calls'] = len(calls) - before
set_backend('torch')
with torch.no_grad():
    results['model'] = (fused - model(img)).abs().max().item()
results['model_margin'] = margin_of(lambda: model(img))
set_backend('triton')
before = len(calls)
maps = neighbors(model, img)
results['inspect_calls'] = len(calls) - before
# a ResNet whose every 3 x 3 conv is a ConvNN2d: one fused selection per layer of at most MAX_SELECT_DIM channels,
# the same logits as the PyTorch path
cnn = timm.create_model('resnet18_convnn', num_classes=3).eval()
img = torch.randn(2, 3, 48, 48)
for b in ('triton', 'torch'):
    set_backend(b)
    before = len(sel_calls)
    with torch.no_grad():
        results['cnn_model_' + b] = cnn(img)
    results['cnn_model_calls_' + b] = len(sel_calls) - before
results['cnn_model'] = (results.pop('cnn_model_triton') - results.pop('cnn_model_torch')).abs().max().item()
# every layer but those on wider maps than the kernel takes (stages 3 and 4: 256 and 512 channels)
results['cnn_model_layers'] = [(m.in_channels <= triton_attention.MAX_SELECT_DIM) for m in cnn.modules()
                               if isinstance(m, ConvNN2d)]
print('RESULT ' + json.dumps(results))
'''


# Older Tritons' CPU interpreter (seen with 3.4 and 3.6) turns a kernel's scalar argument into an int from a
# 1-element array, which recent numpy refuses (numpy 2.4, at `for start in range(0, L, BLOCK_N)`); 3.8 squeezes it.
# With numpy 2.2.6 the interpreter test passes under triton 3.6.0 (2026-12-01)
_INTERPRETER_NUMPY_BUG = 'only 0-dimensional arrays can be converted to Python scalars'


def run_interpreted(code: str, tmp_path, what: str) -> dict:
    """Run ``code`` in a subprocess under Triton's CPU interpreter and return the JSON it prints after 'RESULT '
    (fail without triton, skip where the installed one cannot run the kernels there)."""
    _require_kernels(what)
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='2')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    if out.returncode != 0 and _INTERPRETER_NUMPY_BUG in out.stderr and 'triton/runtime/interpreter.py' in out.stderr:
        pytest.skip(f'the CPU interpreter of triton {triton_attention.triton.__version__} cannot run a loop bound '
                    f'by a kernel argument with this numpy ({_INTERPRETER_NUMPY_BUG!r}; fixed in later Tritons, '
                    f'e.g. 3.8, and absent with numpy 2.2): the kernels are not what failed')
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return json.loads(out.stdout.split('RESULT ', 1)[1])


def test_kernels_under_the_triton_interpreter_match_the_pytorch_path(tmp_path):
    stream_rounds = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks', 'stream_rounds.py')
    r = run_interpreted(f'STREAM_ROUNDS = {stream_rounds!r}\n' + _INTERPRETED, tmp_path, 'checked')
    selects = ('cnn', 'cnn_strided_euclidean_coords_softmax', 'cnn_depthwise_position', 'attention_ones', 'cnn_random',
               'cnn_spatial_strided_softmax', 'attention_ones_random', 'cnn_random_wide')
    for case in ('dot', 'dot_d24', 'cosine_coords_qknorm', 'euclidean_k_clamped', 'branch', 'bf16', 'fp16', 'stream',
                 'stream_64', 'bwd_8', 'random', 'random_row', 'spatial_row', 'random_row_k_is_r', 'spatial_row_dense',
                 'random_dense', 'random_dense_bf16', 'random_row_copies', 'spatial', 'random_k_is_r', 'random_wide',
                 'dot_topk', 'euclidean_k_clamped_topk', 'dot_packed', 'random_row_packed',
                 'random_row_packed_pairs', 'stream_threshold_64') + selects:
        c = r[case]
        assert c['torch_calls'] == 0, (case, c)  # each path really ran: the fused forward, or the selection alone
        assert (c['triton_calls'], c['select_calls']) == ((0, 1) if case in selects else (1, 0)), (case, c)
        # packed keys: softmax weights from scores with 2**-15 relative precision
        packed = case in ('dot_packed', 'random_row_packed', 'random_row_packed_pairs')
        tol = {'bf16': (3e-2, 3e-2), 'fp16': (3e-2, 3e-2), 'random_dense_bf16': (3e-2, 3e-2)}.get(
            case, (1e-3, 1e-3) if packed else (1e-5, 1e-4))
        # the comparison is defined: no query's ranking hangs on rounding (2e-6: about 30 fp32 roundings of the row's
        # largest score), nor, with packed keys, on a shared bucket
        assert c['margin'] > (2 ** -15 if packed else 2e-6), (case, c)
        assert c['out'] <= tol[0] * max(1., c['scale']), (case, c)
        assert c['grad'] <= tol[1], (case, c)
    for case in ('ties_row', 'ties_stream', 'ties_row_topk', 'ties_row_topk_packed', 'ties_stream_threshold',
                 'ties_stream_threshold_over'):
        c = r[case]
        assert c['ties'] > 1000 and c['ids_equal'] and c['out'] < 1e-5 and c['p'] < 1e-6, (case, c)
    # CONFIG fwd_stream='threshold' kept every query's superset in the scratch (ties at the K-th place included),
    # then with a scratch of 16 the blocks with a query over it took the merge loop
    assert 16 < r['ties_stream_threshold']['kept'] <= 64 and r['ties_stream_threshold_over']['kept'] > 16
    nan_cases = [case for case in r if case.startswith('nan_')]
    assert len(nan_cases) == 11, nan_cases
    for case in nan_cases:
        first = {'first': [True] * 3} if case.startswith('nan_key') else {}
        assert r[case] == dict(ids=True, nan=True, rest=True, **first), (case, r[case])
    assert r['saved_qkv'] == {'features': 3, 'storages': 1}, r['saved_qkv']
    assert r['double_backward'] is True and r['backward_hook'] == [0, 1], (r['double_backward'], r['backward_hook'])
    assert r['double_backward_first'] == 0
    c = r['dense_op']
    assert c['diff'] < 1e-5 and c['short'] > 0.1 and 0.1 < c['own'] < 0.9, c
    for case in ('packed_row', 'packed_row_64', 'packed_row_pairs', 'packed_row_pairs_odd_k', 'packed_row_topk',
                 'packed_row_topk_64'):
        c = r[case]
        assert c['rows_unlike_exact'] > 10 and c['ids_equal'] and c['out'] < 1e-5 and c['p'] < 1e-6, (case, c)
    assert r['model_calls'] == 2 and r['model_margin'] > 2e-6 and r['model'] < 1e-5  # one fused call per block
    assert r['conv_identity']['select_calls'] == 1 and r['conv_identity']['err'] < 1e-5, r['conv_identity']
    for case in ('select_ties', 'select_ties_threshold'):
        c = r[case]
        assert c['ties'] > 1000 and c['ids_equal'] and c['scores'] == 0 and c['dtype'] == 'torch.int64', (case, c)
    for shape, case in (([2, 1, 30, 9], 'select_listed_ties'), ([2, 1, 40, 16], 'select_listed_ties_tiles'),
                        ([2, 1, 30, 9], 'select_listed_ties_wide')):
        c = r[case]
        assert c['shape'] == shape and c['dtype'] == 'torch.int64' and c['ties'] > 50, c
        assert c['k_best'] and c['listed'] and c['unique'] and c['order'] and c['scores'] == 0, c
    layers = r['cnn_model_layers']
    assert len(layers) == 16 and r['cnn_model_calls_triton'] == sum(layers) == 9 and r['cnn_model_calls_torch'] == 0
    assert r['cnn_model'] < 1e-4, r['cnn_model']
    assert r['inspect_calls'] == 0  # hooked aggregation: the PyTorch path, so the records are what ran


_FUNC_INTERPRETED = r'''
import json, torch
import timm_convnn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap
from timm_convnn.layers import ConvNN2d, ConvNNAttention, set_backend, triton_attention
torch.manual_seed(0)
launches = dict(fwd=0, bwd=0, select=0)

class Counted:
    def __init__(self, kernel, key):
        self.kernel, self.key = kernel, key

    def __getitem__(self, grid):
        launches[self.key] += 1
        return self.kernel[grid]

for key in launches:
    name = f'_convnn_{key}_kernel'
    setattr(triton_attention, name, Counted(getattr(triton_attention, name), key))
set_backend('triton')
results = {}

def per_sample(module, x):
    """(grad, vmap(grad)) under torch.func against plain autograd on the same (fused) path, one sample at a time:
    the largest difference, and the launches each took."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    loss = lambda p, t: functional_call(module, p, (t,)).square().sum()
    before = dict(launches)
    whole = grad(loss)(params, x)
    samples = vmap(grad(lambda p, t: loss(p, t[None])), in_dims=(None, 0))(params, x)
    used = {k: launches[k] - before[k] for k in launches}
    diff = 0.
    for i in range(-1, x.shape[0]):  # the whole batch, then each sample
        module.zero_grad()
        loss(dict(module.named_parameters()), x if i < 0 else x[i:i + 1]).backward()
        got = whole if i < 0 else {k: v[i] for k, v in samples.items()}
        for n, p in module.named_parameters():
            diff = max(diff, (got[n] - p.grad).abs().max().item())
    return dict(diff=diff, launches=used)

for cand in ('all', 'random'):
    layer = ConvNNAttention(16, num_heads=2, num_neighbors=4, candidates=cand, num_samples=6).eval()
    results['attention_' + cand] = per_sample(layer, torch.randn(3, 9, 16))
layer = ConvNNAttention(8, num_heads=2, num_neighbors=3).eval()
x = torch.randn(1, 5, 8)
before = dict(launches)
jac = jacrev(layer)(x)
used = {k: launches[k] - before[k] for k in launches}
results['jacobian'] = dict(diff=(jac - torch.autograd.functional.jacobian(layer, x)).abs().max().item(), launches=used)
results['conv2d'] = per_sample(ConvNN2d(4, 4, num_neighbors=5).eval(), torch.randn(3, 4, 6, 6))
layers = [ConvNNAttention(16, num_heads=2, num_neighbors=4).eval() for _ in range(3)]
params, buffers = stack_module_state(layers)
x = torch.randn(2, 9, 16)
before = dict(launches)
out = vmap(lambda p, b: functional_call(layers[0], (p, b), (x,)))(params, buffers)
used = {k: launches[k] - before[k] for k in launches}
with torch.no_grad():
    expected = torch.stack([m(x) for m in layers])
results['ensemble'] = dict(diff=(out - expected).abs().max().item(), launches=used)
# nested: per-sample gradients of each model of the ensemble (the inner level folds the samples into the heads of the
# backward, the outer the models)
loss = lambda p, b, t: functional_call(layers[0], (p, b), (t[None],)).square().sum()
before = dict(launches)
nested = vmap(vmap(grad(loss), in_dims=(None, None, 0)), in_dims=(0, 0, None))(params, buffers, x)
used = {k: launches[k] - before[k] for k in launches}
diff = 0.
for e, m in enumerate(layers):
    for i in range(x.shape[0]):
        m.zero_grad()
        m(x[i:i + 1]).square().sum().backward()
        for n, p in m.named_parameters():
            diff = max(diff, (nested[n][e, i] - p.grad).abs().max().item())
results['nested'] = dict(diff=diff, launches=used)
print('RESULT ' + json.dumps(results))
'''


def test_fused_kernels_under_torch_func_transforms(tmp_path):
    # the custom op's autograd registration does not serve torch.func (it refused grad, vmap and jacrev); the same
    # launches now run through an autograd Function with vmap rules: a vmapped batch folds into the kernels' batch
    r = run_interpreted(_FUNC_INTERPRETED, tmp_path, 'checked')
    for case in ('attention_all', 'attention_random'):
        # grad: one forward, one backward; vmap(grad): one forward (the samples folded into the batch) and one
        # backward (folded into the heads: dw per sample; until 2026-12-03 a backward per sample)
        assert r[case]['launches'] == dict(fwd=2, bwd=2, select=0) and r[case]['diff'] < 1e-5, (case, r[case])
    # jacrev: one backward for the 40 cotangents, folded into the heads by the backward's vmap rule
    assert r['jacobian']['launches'] == dict(fwd=1, bwd=1, select=0) and r['jacobian']['diff'] < 1e-5, r['jacobian']
    # a vmapped ensemble of 3 layers (stacked weights): one forward, folded into the heads
    assert r['ensemble']['launches'] == dict(fwd=1, bwd=0, select=0) and r['ensemble']['diff'] < 1e-5, r['ensemble']
    # per-sample gradients of each model (nested vmaps): still one forward and one backward
    assert r['nested']['launches'] == dict(fwd=1, bwd=1, select=0) and r['nested']['diff'] < 1e-5, r['nested']
    # ConvNN2d: the selection kernel alone (its vmap rule folds the batch), aggregation on the PyTorch path
    assert r['conv2d']['launches'] == dict(fwd=0, bwd=0, select=2) and r['conv2d']['diff'] < 1e-5, r['conv2d']


_DROPOUT_INTERPRETED = _RANDOMIZED_LAYER + r"""
import json, torch
import timm_convnn
from timm_convnn.layers import ConvNNAttention, set_backend, triton_attention
calls = []
real = triton_attention.fused_attention
triton_attention.fused_attention = lambda *a: calls.append(a[-1] is not None) or real(*a)
results = {}

def compare(name, make, x, **config):
    # a layer in train() mode with attention dropout: both paths draw the same noise from the same RNG state (the
    # fused path multiplies the kernels' softmax weights by it), so outputs and gradients must agree
    triton_attention.CONFIG.update(config)
    layer, g = randomized(make, x)  # (in train() mode, as built)
    outs = {}
    for b in ('torch', 'triton'):
        set_backend(b)
        del calls[:]
        torch.manual_seed(7)
        xx = x.detach().requires_grad_()
        y = layer(xx)
        grads = torch.autograd.grad(y, [xx] + list(layer.parameters()), g)
        outs[b] = (y, grads, list(calls))
    set_backend('torch')
    with torch.no_grad():
        undropped = layer.eval()(x)  # (the dropout changed the output)
    (y0, g0, c0), (y1, g1, c1) = outs['torch'], outs['triton']
    results[name] = dict(out=(y0 - y1).abs().max().item(), scale=y0.abs().max().item(),
                         grad=max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
                                  for a, b in zip(g0, g1)),
                         torch_calls=c0, triton_calls=c1, dropped=(y0 - undropped).abs().max().item())
    for key in config:
        triton_attention.CONFIG[key] = None

x = torch.randn(2, 50, 32)
def layer(drop=0.3, **kw):
    return lambda: ConvNNAttention(32, num_heads=2, num_neighbors=6, attn_drop=drop, num_prefix_tokens=1,
                                   grid_size=(7, 7), **kw)

compare('row', layer(), x)
compare('row_bwd_8', layer(), x, bwd_block_m=8, bwd_warps=1)
compare('stream', lambda: ConvNNAttention(32, num_heads=2, num_neighbors=9, attn_drop=0.3, num_prefix_tokens=1,
                                          grid_size=(17, 17)), torch.randn(1, 290, 32))
compare('random', layer(candidates='random', num_samples=20), x)
compare('random_row_dense', layer(candidates='random', num_samples=20), x, fwd_listed='row', bwd_listed='dense')
compare('spatial_dense', layer(candidates='spatial', num_samples=16), x, bwd_listed='dense')
compare('drop_all', layer(drop=1.0), x)

# the op reads noise in any layout (a vmapped batch of one folds an unmapped noise into a stride-0 batch)
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
w = torch.randn(32, 1, 4, generator=g)
noise = torch.nn.functional.dropout(torch.ones(2, 2, 9, 4), 0.5)
strided = noise.transpose(0, 1).contiguous().transpose(0, 1)
a, b = (triton_attention.fused_attention(q, k, v, w, 4, None, 1.0, n)[0] for n in (noise, strided))
results['strided_noise'] = (a - b).abs().max().item()

# per-sample gradients in training (vmap's randomness='same': one noise for every sample) and an ensemble of
# one-head layers, against the PyTorch path; an empty batch through the vmap rules
from torch.func import functional_call, grad, stack_module_state, vmap
def transforms(backend):
    set_backend(backend)
    torch.manual_seed(0)
    layer = ConvNNAttention(16, num_heads=2, num_neighbors=4, attn_drop=0.5).train()
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(3, 9, 16)
    loss = lambda p, t: functional_call(layer, p, (t[None],)).square().sum()
    torch.manual_seed(1)
    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness='same')(params, x)
    layers = [ConvNNAttention(16, num_heads=1, num_neighbors=4, attn_drop=0.5).train() for _ in range(2)]
    stacked, buffers = stack_module_state(layers)
    torch.manual_seed(2)
    ensemble = vmap(lambda p, b: functional_call(layers[0], (p, b), (x,)), randomness='same')(stacked, buffers)
    empty = vmap(lambda p, b: functional_call(layers[0].eval(), (p, b), (x[:0],)))(stacked, buffers)
    return per_sample, ensemble, tuple(empty.shape)
(s0, e0, z0), (s1, e1, z1) = transforms('torch'), transforms('triton')
results['transforms'] = dict(per_sample=max((s0[n] - s1[n]).abs().max().item() for n in s0),
                             ensemble=(e0 - e1).abs().max().item(), empty=[z0, z1])
print('RESULT ' + json.dumps(results))
"""


def test_fused_attention_dropout_under_the_triton_interpreter(tmp_path):
    # attention dropout in training ran on the PyTorch path until 2026-12-03 (the paper's CIFAR recipe sets
    # attn_drop_rate 0.1): now the kernels take its noise, drawn as the PyTorch path draws it
    r = run_interpreted(_DROPOUT_INTERPRETED, tmp_path, 'checked')
    for case in ('row', 'row_bwd_8', 'stream', 'random', 'random_row_dense', 'spatial_dense', 'drop_all'):
        c = r[case]
        assert c['torch_calls'] == [] and c['triton_calls'] == [True], (case, c)  # the fused path, with noise
        assert c['dropped'] > 1e-3 * c['scale'], (case, c)
        assert c['out'] <= 1e-5 * max(1., c['scale']) and c['grad'] <= 1e-4, (case, c)
    assert r['strided_noise'] < 1e-6, r  # (read as contiguous before 2026-12-03: 4.1 here)
    t = r['transforms']  # (NaN gradients and 4e17 outputs from a stride-0 noise; an IndexError on the empty batch)
    assert t['per_sample'] < 1e-4 and t['ensemble'] < 1e-4 and t['empty'] == [[2, 0, 9, 16]] * 2, t


_OP_INTERPRETED = _REFERENCE + r'''
import json, torch
import timm_convnn
from timm_convnn.layers import set_backend, triton_attention
ta = triton_attention
set_backend('triton')
results = {}

# scores far beyond exp's fp32 range (integer features times 8: exact products up to 4096; the ties of the integer
# features kept): the softmax subtracts each query's best score first, as the PyTorch path does, in every ranking
def large_score_case(n, kk):
    g = torch.Generator().manual_seed(n)
    qs, ks = (8 * torch.randint(-2, 3, (1, 2, n, 16), generator=g).float() for _ in range(2))
    v, w = torch.randn(1, 2, n, 16, generator=g), torch.randn(32, 1, kk, generator=g)
    s = qs.double() @ ks.double().transpose(-1, -2)
    order = torch.sort(-s, dim=-1, stable=True).indices[..., :kk]
    return dict(against_reference(ta._convnn_attention(qs, ks, v, w, kk), v, w, order, s.gather(-1, order)),
                best=s.amax().item())

results['large_row'] = large_score_case(40, 5)
results['large_stream'] = large_score_case(ta.ROW_TOKENS + 4, 9)
ta.CONFIG['fwd_select'] = 'topk'
results['large_row_topk'] = large_score_case(40, 5)
ta.CONFIG['fwd_select'] = None

# q, k, v and the incoming gradient each in a layout of its own (k a view of a qkv-like buffer, v and the gradient
# token-major): every kernel reads each through its own strides, as it reads contiguous copies
def layouts_case():
    g = torch.Generator().manual_seed(5)
    qs = torch.randn(2, 2, 50, 16, generator=g)
    ks = torch.randn(2, 50, 3, 2, 16, generator=g)[:, :, 1].transpose(1, 2)
    v = torch.randn(50, 2, 2, 16, generator=g).permute(1, 2, 0, 3)
    go = torch.randn(2, 50, 2, 16, generator=g).transpose(1, 2)
    w = torch.randn(32, 1, 6, generator=g)
    cand = torch.randperm(50, generator=g)[:20]
    diff = 0.
    for listed in (None, cand):
        runs = []
        for t in ((qs, ks, v, go), tuple(x.contiguous() for x in (qs, ks, v, go))):
            out, idx, p = ta._attention_forward(t[0], t[1], t[2], w, 6, listed, 0.25)
            runs.append((out, idx, p) + ta._attention_backward(t[3], t[0], t[1], t[2], w, idx, p, listed, 0.25))
        diff = max([diff] + [(a.double() - b.double()).abs().max().item() for a, b in zip(*runs)])
    # the selection alone: 30 queries against 50 keys of another layout, all tokens and a list
    sq = torch.randn(2, 1, 30, 16, generator=g)
    sk = torch.randn(2, 50, 1, 16, generator=g).transpose(1, 2)
    for listed in ((), (cand, torch.randperm(50, generator=g)[:30])):
        a, b = (ta.fused_select(x, y, 6, *listed) for x, y in ((sq, sk), (sq, sk.contiguous())))
        diff = max(diff, (a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())
    return dict(diff=diff, strides=len({ks.stride(), v.stride(), go.stride(), qs.stride()}))

results['layouts'] = layouts_case()

# the registered custom op (what compiled and exported graphs, dispatch modes and tensor subclasses run) against the
# eager Function: the same forward and the same gradients through its autograd registration, with a candidate list,
# a query scale and dropout noise
def dispatcher_case():
    g = torch.Generator().manual_seed(6)
    qs, ks, v, go = (torch.randn(2, 2, 30, 16, generator=g) for _ in range(4))
    w = torch.randn(32, 1, 8, generator=g)
    cand = torch.randperm(30, generator=g)[:12]
    noise = (torch.rand(2, 2, 30, 8, generator=g) > 0.3).float() / 0.7
    eager, runs = ta._eager, {}
    for path in ('eager', 'dispatcher'):
        if path == 'dispatcher':
            ta._eager = lambda *tensors: False
        try:
            leaves = [t.clone().requires_grad_() for t in (qs, ks, v, w)]
            out = ta.fused_attention(*leaves, 8, cand, 0.25, noise)[0]
            runs[path] = (type(out.grad_fn).__name__, [out] + list(torch.autograd.grad(out, leaves, go)))
        finally:
            ta._eager = eager
    (n0, t0), (n1, t1) = runs['eager'], runs['dispatcher']
    return dict(nodes=[n0, n1], diff=max((a - b).abs().max().item() for a, b in zip(t0, t1)))

results['dispatcher'] = dispatcher_case()

# the fake (meta) registrations where K exceeds the candidate list (K is clamped to it), as torch.library checks them
qs, ks, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
listed = torch.tensor([3, 0, 9, 4, 12, 7])
checks = {}
for name, op, args in (('attention', torch.ops.timm_convnn.convnn_attention.default,
                        (qs, ks, v, torch.randn(32, 1, 8), 8, listed)),
                       ('select', torch.ops.timm_convnn.convnn_select.default, (qs, ks, 8, listed, torch.arange(17)))):
    try:
        torch.library.opcheck(op, args, test_utils=('test_faketensor',))
        checks[name] = 'ok'
    except Exception as e:  # (OpCheckError: the fake and real outputs differ)
        checks[name] = f'{type(e).__name__}: {str(e)[:300]}'
results['fake_k_over_r'] = checks

# dw summed over CONFIG bwd_dw_copies copies (one, three) as over the built-in DW_COPIES
def dw_copies_case():
    g = torch.Generator().manual_seed(7)
    qs, ks, v, go = (torch.randn(2, 2, 50, 16, generator=g) for _ in range(4))
    w = torch.randn(32, 1, 6, generator=g)
    _, idx, p = ta._attention_forward(qs, ks, v, w, 6)
    grads = {}
    for copies in (None, 1, 3):
        ta.CONFIG['bwd_dw_copies'] = copies
        grads[copies] = ta._attention_backward(go, qs, ks, v, w, idx, p)
    ta.CONFIG['bwd_dw_copies'] = None
    return max((a - b).abs().max().item() for c in (1, 3) for a, b in zip(grads[None], grads[c]))

results['dw_copies'] = dw_copies_case()
print('RESULT ' + json.dumps(results))
'''


def test_fused_op_edge_cases_under_the_triton_interpreter(tmp_path):
    # the op called directly (test_kernels_under_the_triton_interpreter_match_the_pytorch_path: through the layers)
    r = run_interpreted(_OP_INTERPRETED, tmp_path, 'checked')
    for case in ('large_row', 'large_stream', 'large_row_topk'):
        c = r[case]
        assert c['best'] > 1000 and c['ids_equal'] and c['out'] < 1e-5 and c['p'] < 1e-6, (case, c)
    assert r['layouts'] == dict(diff=0., strides=4), r['layouts']
    c = r['dispatcher']
    assert c['nodes'][0] == '_EagerAttentionBackward' and 'EagerAttention' not in c['nodes'][1], c
    assert c['diff'] < 1e-6, c
    assert r['fake_k_over_r'] == dict(attention='ok', select='ok'), r['fake_k_over_r']
    assert r['dw_copies'] < 1e-5, r['dw_copies']


def _recorded_launches(monkeypatch):
    """Replace the three kernels by recorders of (kernel, grid, arguments, keyword arguments) and let the fused ops
    take CPU tensors. Returns the record list."""
    if triton_attention.triton is None:
        pytest.fail('triton is not installed (pip install triton)')
    launches = []

    class Record:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid, args, kwargs))

    for name in ('_convnn_fwd_kernel', '_convnn_bwd_kernel', '_convnn_select_kernel'):
        monkeypatch.setattr(triton_attention, name, Record(name))
    monkeypatch.setattr(triton_attention, 'triton_unavailable_reason', lambda device: None)
    return launches


def _launch_signature(launch):
    """A recorded launch with its tensors as (shape, strides, dtype): comparable across calls that allocate their
    outputs and gradients anew."""
    name, grid, args, kwargs = launch
    args = [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    return name, grid, args, kwargs


def test_fused_op_reads_timm_qkv_views_in_place(monkeypatch):
    # timm's attention hands over q, k, v as permuted views of one (B, N, 3, H, D) buffer: the kernels read them
    # through their strides (no copies), write the output token-major so that the head merge is a view, and take the
    # incoming gradient (a view of the same kind) in place too. The launches are recorded, not run.
    launches = _recorded_launches(monkeypatch)
    B, N, H, D, K = 2, 50, 3, 16, 5
    q, k, v = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    w = torch.randn(H * D, 1, K)
    out, idx, p = triton_attention._convnn_attention(q, k, v, w, K)
    (_, grid, args, kwargs), = launches
    assert kwargs['enable_fp_fusion'] is True  # compiled as tested (Triton 3.10's default would drop FMAs)
    assert grid == (triton_attention.triton.cdiv(N, triton_attention.BLOCK_QUERIES), H, B)
    for given, passed in zip((q, k, v, out), (args[0], args[1], args[2], args[4])):
        assert passed.data_ptr() == given.data_ptr() and passed.stride() == given.stride()
    assert out.shape == (B, H, N, D) and out.transpose(1, 2).is_contiguous()  # the merge (B, N, H * D) is a view
    # the depthwise weights slot-major, (H, K, D) fp32 and contiguous: the kernels index them so
    assert args[3].is_contiguous() and torch.equal(args[3], w.view(H, D, K).transpose(1, 2))
    go = torch.randn(B, N, H, D).transpose(1, 2)
    dq, dk, dv, dw = triton_attention._convnn_attention_backward(go, q, k, v, w, idx, p)
    (_, _, bargs, bkwargs), = launches[1:]
    assert bkwargs['enable_fp_fusion'] is True
    for given, passed in zip((go, q, k, v), bargs[:4]):
        assert passed.data_ptr() == given.data_ptr() and passed.stride() == given.stride()
    assert dq.dtype == q.dtype and dq.is_contiguous() and bargs[7].data_ptr() == dq.data_ptr()  # stored once, no cast


def test_fused_launches_split_the_batch_for_the_grid_and_int32_offsets():
    if triton_attention.triton is None:
        pytest.fail('triton is not installed (pip install triton)')
    chunks = triton_attention._batch_chunks
    big = torch.empty(70000, 2, 4, 16, device='meta')  # more batch entries than CUDA's z grid axis takes
    assert chunks(70000, big) == [(0, 65535), (65535, 70000)]
    # one batch entry 2**30 elements apart: two entries per launch keep every offset below 2**31
    wide = big[:5].as_strided((5, 1, 1, 16), (2 ** 30, 16, 16, 1))
    assert chunks(5, big[:5], wide) == [(0, 2), (2, 4), (4, 5)]
    assert chunks(256, torch.empty(256, 12, 197, 64, device='meta')) == [(0, 256)]
    # allocated tensors whose whole storage fits int32 offsets take the quick test, with the same answers
    for batch in (0, 3):
        real = torch.empty(batch, 4, 16, 3, 8).permute(0, 3, 1, 2, 4)[..., 0, :]  # a permuted view
        assert chunks(batch, real, real.contiguous()) == chunks(batch, real.to('meta')) == [(0, batch)][:batch]


def test_token_ids_reach_the_kernels_on_the_features_device():
    # a candidate list made on the CPU for CUDA features would hand the kernel a host pointer: the ids are moved
    ids = triton_attention._int32_ids(torch.arange(5), torch.device('meta'))
    assert ids.device.type == 'meta' and ids.dtype == torch.int32 and ids.is_contiguous()


def test_launches_run_on_the_device_of_their_tensors(monkeypatch):
    # Triton launches on the current CUDA device, on its current stream: each call makes its tensors' GPU current for
    # its launches (_on_device), so that a model on cuda:1 without torch.cuda.set_device (timm's validate.py /
    # benchmark.py --device cuda:1) neither launches on cuda:0 with cuda:1's memory nor races cuda:1's stream
    import contextlib
    launches = _recorded_launches(monkeypatch)
    real, spans = triton_attention._on_device, []

    @contextlib.contextmanager
    def on_device(x):
        start = len(launches)
        with real(x):
            yield
        spans.append((x.device, start, len(launches)))

    monkeypatch.setattr(triton_attention, '_on_device', on_device)
    monkeypatch.setitem(triton_attention.CONFIG, 'bwd_listed', 'dense')
    B, N, H, D, K = 2, 50, 3, 16, 5
    for cand in (None, torch.tensor([3, 0, 9, 4, 12, 7, 30, 41])):  # every token; a list (the dense backward)
        q, k, v = torch.randn(3, B, H, N, D, requires_grad=True).unbind(0)
        w = torch.randn(H * D, 1, K, requires_grad=True)
        triton_attention.fused_attention(q, k, v, w, K, cand, 0.25)[0].sum().backward()
    with torch.no_grad():
        triton_attention.fused_select(q, k, K)
    assert [x[0] for x in launches] == ['_convnn_fwd_kernel', '_convnn_bwd_kernel'] * 2 + ['_convnn_select_kernel']
    assert sorted(i for _, a, b in spans for i in range(a, b)) == list(range(len(launches)))  # each inside one
    # the switch itself: to a tensor's GPU when another one is current; none on the current GPU or the CPU
    switched = []
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'device', lambda index: switched.append(index) or contextlib.nullcontext())
    for device in ('cuda:1', 'cuda:0', 'cpu'):
        with real(type('OnDevice', (), dict(device=torch.device(device)))()):
            pass
    assert switched == [1]


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
@pytest.mark.filterwarnings('ignore:`torch.jit.trace:FutureWarning')
@pytest.mark.parametrize('listed', [False, True])
def test_eager_calls_skip_the_dispatcher_with_the_same_launches(listed, monkeypatch):
    # eager calls run the launches through an autograd.Function, without torch.library's dispatcher (host time at
    # small batches, benchmarks/host_overhead.py); graphs (torch.jit.trace here, torch.compile in the CUDA test)
    # record the registered custom op. Both launch the same kernels with the same arguments and gradients flow the same
    launches = _recorded_launches(monkeypatch)
    B, N, H, D, K = 2, 50, 3, 16, 5
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    w = torch.randn(H * D, 1, K, requires_grad=True)
    cand = torch.tensor([3, 0, 9, 4, 12, 7, 30, 41]) if listed else None
    runs = {}
    for path in ('eager', 'dispatcher'):
        if path == 'dispatcher':
            monkeypatch.setattr(triton_attention, '_eager', lambda *tensors: False)
        del launches[:]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, idx, p = triton_attention.fused_attention(q, k, v, w, K, cand, 0.25)
        node = type(out.grad_fn).__name__
        qkv.grad = w.grad = None
        out.sum().backward()
        runs[path] = dict(node=node, launches=[_launch_signature(x) for x in launches],
                          grads=(qkv.grad.clone(), w.grad.clone()),
                          saved_q=launches[0][2][0].data_ptr() == q.data_ptr())
    eager, disp = runs['eager'], runs['dispatcher']
    assert eager['node'] == '_EagerAttentionBackward' and 'EagerAttention' not in disp['node']
    assert [x[0] for x in eager['launches']] == ['_convnn_fwd_kernel', '_convnn_bwd_kernel']
    assert eager['launches'] == disp['launches'] and eager['saved_q'] and disp['saved_q']
    # (the stubbed kernels write nothing: the gradients are what the host code around them computes, dw's copy sums
    # and the dk / dv casts, from uninitialised memory where the kernels would accumulate; so compare launches, and
    # gradient shapes and dtypes)
    assert [(g.shape, g.dtype) for g in eager['grads']] == [(g.shape, g.dtype) for g in disp['grads']]
    monkeypatch.undo()

    # what a trace records: the custom op, eagerly called or not
    launches = _recorded_launches(monkeypatch)
    x = torch.randn(B, H, N, D)

    def mix(x, weight):
        return triton_attention.fused_attention(x, x, x, weight, K)[0]

    graph = str(torch.jit.trace(mix, (x, w.detach()), check_trace=False).graph)
    assert 'timm_convnn::convnn_attention' in graph, graph
    graph = str(torch.jit.trace(lambda x: triton_attention.fused_select(x, x, K)[1], (x,), check_trace=False).graph)
    assert 'timm_convnn::convnn_select' in graph, graph
    del launches[:]
    with torch.no_grad():  # selection alone: the same launch either way
        eager_sel = triton_attention.fused_select(x, x, K)
        monkeypatch.setattr(triton_attention, '_eager', lambda *tensors: False)
        disp_sel = triton_attention.fused_select(x, x, K)
    sel = [_launch_signature(x) for x in launches if x[0] == '_convnn_select_kernel']
    assert len(sel) == 2 and sel[0] == sel[1] and eager_sel[0].shape == disp_sel[0].shape == (B, H, N, K)


@pytest.mark.filterwarnings('ignore:`torch.jit.trace:FutureWarning')
def test_eager_rule_leaves_graphs_and_subclasses_to_the_custom_op():
    x = torch.randn(2, 3)
    w = torch.nn.Parameter(torch.randn(3))
    assert triton_attention._eager(x, w, None)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    with FakeTensorMode() as mode:
        assert not triton_attention._eager(mode.from_tensor(x), w)

    class Watch(TorchDispatchMode):  # what profilers and FLOP counters are: they see the custom ops
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        assert not triton_attention._eager(x, w)
    assert triton_attention._eager(x, w)
    assert not torch.func.vmap(lambda t: torch.tensor(triton_attention._eager(t)))(x).any()
    seen = []
    torch.jit.trace(lambda t: seen.append(triton_attention._eager(t)) or t * 2, (x,), check_trace=False)
    assert seen == [False]

    def compiled(t):
        seen.append(triton_attention._eager(t))
        return t * 2

    torch.compile(compiled, backend='eager', fullgraph=True)(x)
    assert seen == [False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (the CPU interpreter test covers the '
                                                          'kernel logic on every machine)')
# float16: timm train.py's --amp default (with its loss scaler), bfloat16: the harness's autocast
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('side', [14, 28])  # 197 tokens: the row kernel; 785: the streaming kernel
def test_fused_matches_torch_on_cuda(dtype, side, backend, monkeypatch):
    _fused_vs_torch_on_cuda(dtype, side, backend, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (the CPU interpreter test covers the '
                                                          'kernel logic on every machine)')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('n,listed', [(197, None), (785, None), (197, 64)])  # row, streaming, candidate list
def test_fused_nan_key_ranks_first_as_on_the_torch_path_on_cuda(dtype, n, listed, backend):
    # NaN as the GPU makes it (the interpreter uses numpy's): a NaN key is every query's first neighbour on both
    # paths and its head's outputs are NaN, as attention's; the other head is untouched
    g = torch.Generator(device='cuda').manual_seed(0)
    qs, ks, v = (torch.randn(2, 2, n, 64, device='cuda', generator=g).to(dtype) for _ in range(3))
    w = torch.randn(128, 1, 16, device='cuda', generator=g).to(dtype)
    cand = None if listed is None else torch.randperm(n, device='cuda', generator=g)[:listed]
    if cand is not None:
        cand[0] = 5
    ks[1, 1, 5] = float('nan')
    out, idx, _ = triton_attention._attention_forward(qs, ks, v, w, 16, cand)
    qid = None if cand is None else torch.arange(n, device='cuda')
    sel = triton_attention.fused_select(qs, ks, 16, cand, qid)[0]
    backend('torch')
    ref = select_scored_neighbors(qs, ks, 16, cand, qid)[0]
    for ids in (idx, sel, ref):
        assert (ids[1, 1, :, 0] == 5).all()
    assert out[1, 1].isnan().all() and out[0].isfinite().all() and out[1, 0].isfinite().all()


def _launch_id(value):
    """Test ids of launch parametrisations: dtypes by name, CONFIG dicts by their values."""
    if isinstance(value, torch.dtype):
        return str(value)[6:]
    return '-'.join(map(str, value.values())) if isinstance(value, dict) else value


def _optin(*values):
    """A parametrisation with an opt-in launch (a CONFIG setting the kernels do not choose themselves), marked
    ``optin``: benchmarks/gpu_check.sh runs these in a stage of their own, after the built-in launches' tests and the
    model-level measurements, so that kernels compiled on first use by opt-in launches cannot crowd those out of its
    time budget."""
    return pytest.param(*values, marks=pytest.mark.optin)


def _set_launch(monkeypatch, launch):
    """``triton_attention.CONFIG`` launch settings for one test."""
    for key, value in launch.items():
        monkeypatch.setitem(triton_attention.CONFIG, key, value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype,launch', [
    # packed keys are what the row kernel ranks bf16 by when CONFIG leaves it alone (2**-15 relative ranking precision,
    # meant for half inputs: fp32 would flip near-ties); exact fp32 scores, and the bitonic selection, on request
    (torch.bfloat16, dict(fwd_keys='packed')), _optin(torch.bfloat16, dict(fwd_keys='exact')),
    _optin(torch.float32, dict(fwd_select='topk')), _optin(torch.bfloat16, dict(fwd_select='topk', fwd_keys='exact')),
    _optin(torch.bfloat16, dict(fwd_select='topk', fwd_keys='packed')),
    # the launches kernel_sweep.py times against the built-in 16 queries on 4 warps (64 on 8 warps with the bitonic
    # selection: the fastest at B 256, 12 heads, n 197 on the H200, 2026-11-30; and with rounds, untimed), and the
    # rounds two keys at a time (untimed); 16 queries on 2 warps and on one (untimed)
    _optin(torch.bfloat16, dict(fwd_block_m=32)), _optin(torch.bfloat16, dict(fwd_block_m=64)),
    _optin(torch.bfloat16, dict(fwd_block_m=64, fwd_warps=8, fwd_select='topk')),
    _optin(torch.bfloat16, dict(fwd_block_m=64, fwd_warps=8)), _optin(torch.bfloat16, dict(fwd_select='pairs')),
    _optin(torch.bfloat16, dict(fwd_warps=2)), _optin(torch.bfloat16, dict(fwd_warps=1))],
    ids=_launch_id)
def test_fused_row_selection_variants_match_torch_on_cuda(dtype, launch, backend, monkeypatch):
    # the row kernel's selections and launches (CONFIG fwd_select='topk': bitonic, 'pairs': rounds two keys at a time;
    # fwd_keys='packed' / 'exact': int32
    # keys or exact fp32 scores; None: packed for half / bf16; fwd_block_m / fwd_warps)
    _set_launch(monkeypatch, launch)
    _fused_vs_torch_on_cuda(dtype, 14, backend, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype,side,launch', [
    _optin(torch.float32, 28, {}), _optin(torch.bfloat16, 28, {}), _optin(torch.bfloat16, 64, {}),
    _optin(torch.bfloat16, 28, dict(fwd_block_m=32)), _optin(torch.bfloat16, 64, dict(fwd_block_m=64, fwd_warps=8))],
    ids=_launch_id)
def test_fused_threshold_stream_matches_torch_on_cuda(dtype, side, launch, backend, monkeypatch):
    # CONFIG fwd_stream='threshold' (a bound, then every key above it): 785 tokens (4 values per key tile) and 4097
    # (one), and the launches kernel_sweep.py times
    _set_launch(monkeypatch, dict(launch, fwd_stream='threshold'))
    _fused_vs_torch_on_cuda(dtype, side, backend, monkeypatch)


def _fused_vs_torch_on_cuda(dtype, side, backend, monkeypatch):
    # fp32 inputs with CUDA-core products: the fp32 tolerance allows no near-tie to flip, and the default 3xTF32
    # products (scores ~1e-6 off) flipped one or two of the 9,456 (query, head) selections here on the H200, which
    # moves a softmax output by ~8 % of its scale. test_fp32_product_precisions_agree_on_cuda holds the two apart.
    monkeypatch.setitem(triton_attention.CONFIG, 'fp32_dot', 'ieee')
    torch.manual_seed(0)
    layer = ConvNNAttention(384, num_heads=6, num_neighbors=16, num_prefix_tokens=1, grid_size=(side, side)).cuda()
    x = torch.randn(8, side * side + 1, 384, device='cuda', dtype=dtype, requires_grad=True)
    half = dtype in (torch.bfloat16, torch.float16)
    with torch.autocast('cuda', dtype=dtype if half else torch.bfloat16, enabled=half):
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('candidates,launch', [
    ('random', {}), ('spatial', {}), _optin('random', dict(bwd_row_copies=4)), _optin('random', dict(fwd_listed='row')),
    _optin('spatial', dict(fwd_listed='row')), _optin('random', dict(bwd_listed='dense')),
    _optin('spatial', dict(fwd_listed='row', bwd_listed='dense'))],
    ids=_launch_id)
def test_fused_candidates_match_torch_on_cuda(candidates, launch, backend, monkeypatch):
    # fp32 with CUDA-core products, as in _fused_vs_torch_on_cuda (a no-flip tolerance); launch: the backward's dk / dv
    # spread over copies (CONFIG bwd_row_copies), the list ranked as one score row (fwd_listed)
    monkeypatch.setitem(triton_attention.CONFIG, 'fp32_dot', 'ieee')
    _set_launch(monkeypatch, launch)
    torch.manual_seed(0)
    layer = ConvNNAttention(384, num_heads=6, num_neighbors=16, candidates=candidates, num_samples=128,
                            num_prefix_tokens=1, grid_size=(28, 28)).cuda().eval()  # eval: the same candidates
    x = torch.randn(4, 785, 384, device='cuda', requires_grad=True)
    _paths_agree_on_cuda(layer, x, backend)  # 'auto': the fused forward with the candidate list


def _paths_agree_on_cuda(layer, x, backend, seed=None):
    """``layer``'s output and gradients (of their sum) on the PyTorch path and on ``auto``'s (each run after
    ``torch.manual_seed(seed)`` when given) agree to the fp32 no-flip tolerance."""
    outs = {}
    for b in ('torch', 'auto'):
        backend(b)
        if seed is not None:
            torch.manual_seed(seed)
        y = layer(x)
        outs[b] = (y, torch.autograd.grad(y.sum(), [x] + list(layer.parameters())))
    (y0, g0), (y1, g1) = outs['torch'], outs['auto']
    assert (y0 - y1).abs().max() <= 1e-4 * y0.abs().max()
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('candidates,side', [('all', 14), ('all', 28), ('random', 28)])
def test_fused_attention_dropout_matches_torch_on_cuda(candidates, side, backend, monkeypatch):
    # attention dropout in training (the paper's CIFAR recipe): the fused path draws its noise as the PyTorch path
    # draws the dropout of its weights (same shape, fp32, the same RNG state), so both agree; fp32 with CUDA-core
    # products, as in _fused_vs_torch_on_cuda
    monkeypatch.setitem(triton_attention.CONFIG, 'fp32_dot', 'ieee')
    calls = []
    real = triton_attention.fused_attention
    monkeypatch.setattr(triton_attention, 'fused_attention', lambda *a: calls.append(a[-1] is not None) or real(*a))
    torch.manual_seed(0)
    layer = ConvNNAttention(384, num_heads=6, num_neighbors=16, candidates=candidates, num_samples=128, attn_drop=0.1,
                            num_prefix_tokens=1, grid_size=(side, side)).cuda().train()
    x = torch.randn(4, side * side + 1, 384, device='cuda', requires_grad=True)
    _paths_agree_on_cuda(layer, x, backend, seed=1)
    assert calls == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('name, kernel', [('vit_tiny_convnn_all_k16', 'fused_attention'),
                                          ('vit_tiny_convnn_random', 'fused_attention'),
                                          ('resnet18_convnn_branch', 'fused_select')])
def test_fused_per_sample_gradients_on_cuda(name, kernel, backend, monkeypatch):
    # torch.func on the fused path (test_fused_kernels_under_torch_func_transforms under the interpreter): per-sample
    # gradients by vmap(grad) equal plain autograd one sample at a time, both through the kernels
    import timm
    from torch.func import functional_call, grad, vmap
    backend('auto')
    calls = []
    real = getattr(triton_attention, kernel)
    monkeypatch.setattr(triton_attention, kernel, lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    kwargs = dict(img_size=64, depth=2) if name.startswith('vit') else {}
    model = timm.create_model(name, num_classes=5, **kwargs).cuda().eval()
    x = torch.randn(3, 3, 64, 64, device='cuda')
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, t):
        return functional_call(model, (p, buffers), (t,)).square().sum()

    per_sample = vmap(grad(lambda p, t: loss(p, t[None])), in_dims=(None, 0))(params, x)
    assert calls
    for i in range(x.shape[0]):
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i:i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, atol=1e-4, rtol=1e-3, msg=f'{n}, sample {i}')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('name, kernel, launch', [
    ('vit_tiny_convnn_all_k16', 'fused_attention', {}), ('vit_tiny_convnn_random', 'fused_attention', {}),
    # the sampled candidates ranked as one score row (CONFIG fwd_listed='row'), packed keys in bf16, and the backward's
    # dense per-token sums (bwd_listed='dense')
    _optin('vit_tiny_convnn_random', 'fused_attention', dict(fwd_listed='row', bwd_listed='dense')),
    ('resnet50_convnn_branch', 'fused_select', {}),
    # the selections over all tokens through CONFIG fwd_stream='threshold' (stage 1's 26 x 26 padded map streams)
    _optin('resnet50_convnn_branch', 'fused_select', dict(fwd_stream='threshold'))],
    ids=_launch_id)
def test_fused_model_train_step_on_cuda(name, kernel, launch, backend, monkeypatch):
    import timm
    _set_launch(monkeypatch, launch)
    calls = []
    real = getattr(triton_attention, kernel)
    monkeypatch.setattr(triton_attention, kernel, lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda()
    vit = kernel == 'fused_attention'
    # under 'auto' only: one fused forward per ViT block; one fused selection per ConvNN2d of at most MAX_SELECT_DIM
    # channels (the ResNet's stages 1 and 2)
    expected = 12 if vit else sum(m.in_channels <= triton_attention.MAX_SELECT_DIM for m in model.modules()
                                  if isinstance(m, ConvNN2d))
    first = model.patch_embed.proj.weight if vit else model.conv1.weight
    x = torch.randn(4, 3, 224 if vit else 96, 224 if vit else 96, device='cuda')
    outs = {}
    for b in ('torch', 'auto'):
        backend(b)
        model.zero_grad()
        del calls[:]
        torch.manual_seed(1)  # random candidates: the same fresh draw for both paths
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y = model(x)
        y.float().logsumexp(-1).sum().backward()
        outs[b] = (y.float(), first.grad.clone())
        assert len(calls) == (expected if b == 'auto' else 0)
    scale = outs['torch'][0].abs().max()
    assert (outs['torch'][0] - outs['auto'][0]).abs().max() <= 0.1 * scale
    g0, g1 = outs['torch'][1], outs['auto'][1]
    assert torch.cosine_similarity(g0.flatten(), g1.flatten(), dim=0) > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_fused_model_under_compile_on_cuda(backend, monkeypatch):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_convnn_all_k16', num_classes=10).cuda()
    x = torch.randn(4, 3, 224, 224, device='cuda')
    backend('auto')
    # the custom op inside a compiled graph (no graph break), eval: deterministic and equal to eager
    model.eval()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert (eager.float() - compiled.float()).abs().max() <= 0.05 * eager.float().abs().max()
    # a training step (train.py --torchcompile): the op's autograd registration under Inductor, the fused backward
    # kernel called from the compiled graph; the gradients of eager and compiled agree up to bf16 rounding
    calls = []
    real = triton_attention._attention_backward
    monkeypatch.setattr(triton_attention, '_attention_backward', lambda *a, **k: calls.append(1) or real(*a, **k))
    model.train()
    grads = {}
    for name, run in (('eager', model), ('compiled', torch.compile(model, fullgraph=True))):
        model.zero_grad()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = run(x).float().logsumexp(-1).sum()
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert len(calls) == 2 * len(model.blocks)  # both passes ran the fused backward in every block
    assert torch.isfinite(grads['compiled']).all()
    assert torch.cosine_similarity(grads['eager'], grads['compiled'], dim=0) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('listed', [False, True, _optin('threshold')], ids=['all', 'random', 'threshold'])
def test_fused_select_matches_torch_on_cuda(dtype, listed, backend, monkeypatch):
    # a ResNet stage-1 map: 56 x 56 queries against the 58 x 58 zero-padded map, 64 channels, K 9; all candidates, or
    # 100 random pixels of the map (two key tiles) and each query's own; or all through CONFIG fwd_stream='threshold'
    from timm_convnn.layers.functional import select_scored_neighbors, similarity_features
    if listed == 'threshold':
        monkeypatch.setitem(triton_attention.CONFIG, 'fwd_stream', 'threshold')
        listed = False
    calls = []
    real = triton_attention.fused_select
    monkeypatch.setattr(triton_attention, 'fused_select', lambda *a: calls.append(1) or real(*a))
    g = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(4, 1, 58 * 58, 64, device='cuda', generator=g).to(dtype)
    inner = (torch.arange(1, 57, device='cuda').view(-1, 1) * 58 + torch.arange(1, 57, device='cuda')).flatten()
    cand = inner[torch.randperm(inner.numel(), device='cuda', generator=g)[:100]] if listed else None
    qid = inner if listed else None
    qs, ks = similarity_features(x[:, :, inner], x, 'cosine')
    backend('torch')
    i0, s0 = select_scored_neighbors(qs, ks, 9, cand, qid)
    backend('auto')
    i1, s1 = select_scored_neighbors(qs, ks, 9, cand, qid)
    assert calls == [1] and i1.dtype == i0.dtype == torch.int64 and s1.dtype == torch.float32
    # the same neighbours up to fp32 summation order (near-ties), the same sorted scores
    assert (i0 == i1).all(-1).float().mean() >= 0.999
    assert (s0 - s1).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_fp32_product_precisions_agree_on_cuda(monkeypatch):
    # fp32 similarity features multiply as 3xTF32 by default (FP32_DOT) or on the CUDA cores ('ieee'): the selection
    # kernel (fp32 cosine features, what a ResNet's ConvNN2d hands over under autocast) and the forward (fp32 q / k /
    # v: timm validate.py without AMP) give the same neighbours up to near-ties and the same scores / outputs
    assert triton_attention.FP32_DOT == 'tf32x3' and triton_attention.CONFIG['fp32_dot'] is None
    g = torch.Generator(device='cuda').manual_seed(0)
    x = F.normalize(torch.randn(2, 1, 58 * 58, 128, device='cuda', generator=g), dim=-1)
    q, k, v = (torch.randn(8, 3, 197, 64, device='cuda', generator=g) for _ in range(3))
    w = torch.randn(3 * 64, 1, 16, device='cuda', generator=g)
    out = {}
    for dot in ('ieee', 'tf32x3'):
        monkeypatch.setitem(triton_attention.CONFIG, 'fp32_dot', dot)
        out[dot] = triton_attention.fused_select(x[:, :, :3136], x, 9), triton_attention.fused_attention(
            q, k, v, w, 16)
    (i0, s0), (o0, j0, _) = out['ieee']
    (i1, s1), (o1, j1, _) = out['tf32x3']
    assert (i0 == i1).all(-1).float().mean() >= 0.999 and (s0 - s1).abs().max() <= 1e-5
    assert (j0 == j1).all(-1).float().mean() >= 0.999
    assert (o0 - o1).abs().max() <= 1e-3 * o0.abs().max()


def test_built_in_launch_choices(monkeypatch):
    # what the H200 sweep of 2026-11-29 chose, and where compiled kernels spill (kernel_resources.py): checked as rules
    # here, since CI has no GPU; CONFIG overrides each
    ta, bf16, fp32 = triton_attention, torch.bfloat16, torch.float32
    # backward: 8 queries on one warp for half / bf16 at row-kernel sizes, K <= 16, head dims <= 64; else 16 on 4
    assert ta._bwd_launch(bf16, 197, 16, 64, 64)[:2] == (8, 1) == ta._bwd_launch(torch.float16, 256, 9, 32, 64)[:2]
    for args in ((fp32, 197, 16, 64, 64), (bf16, 257, 16, 64, 64), (bf16, 197, 32, 64, 64), (bf16, 197, 16, 128, 64),
                 (bf16, 197, 16, 64, 128)):
        assert ta._bwd_launch(*args)[:2] == (ta.BLOCK_QUERIES, 4), args
    # the dense candidate-list backward (CONFIG bwd_listed): 32 queries on 8 warps over 64 list positions at a time
    # (no spill for bf16 at K 9-64 under triton 3.6-3.9), 16 queries for fp32 inputs and 128-channel heads (32
    # spill under 3.9)
    assert ta._bwd_launch(bf16, 197, 16, 64, 64, True) == (32, 8, 64) == ta._bwd_launch(bf16, 16385, 9, 64, 64, True)
    assert ta._bwd_launch(fp32, 16385, 16, 64, 64, True) == (16, 8, 64) == ta._bwd_launch(bf16, 197, 32, 128, 128, True)
    monkeypatch.setitem(ta.CONFIG, 'bwd_block_c', 16)
    assert ta._bwd_launch(bf16, 16385, 16, 64, 64, True) == (32, 8, 16)
    # the forward: 4 warps, 8 for a candidate list ranked as one row with fp32 products (4 spill)
    assert ta._fwd_warps(False, True, True) == 8
    assert ta._fwd_warps(True, True, True) == ta._fwd_warps(False, False, True) == 4
    assert ta._fwd_warps(False, True, False) == 4
    monkeypatch.setitem(ta.CONFIG, 'bwd_block_m', 32)
    assert ta._bwd_launch(bf16, 197, 16, 64, 64)[:2] == (32, 1)
    # row-kernel keys: packed for half / bf16, exact for fp32 features
    assert ta._use_packed_keys(False) and not ta._use_packed_keys(True)
    monkeypatch.setitem(ta.CONFIG, 'fwd_keys', 'exact')
    assert not ta._use_packed_keys(False)
    # queries per program: 64 in the streaming kernels at K <= 32, fp32 features too with 3xTF32 products, except wide
    # fp32 features with a candidate list; 16 in the row kernel, at K > 32 and with CUDA-core fp32 products
    assert ta._fwd_block_m(True, False, 16, 64, False) == ta.STREAM_BLOCK_QUERIES == 64
    assert ta._fwd_block_m(True, True, 9, 128, False) == 64 == ta._fwd_block_m(True, True, 9, 64, True)
    assert ta._fwd_block_m(True, True, 9, 128, True) == ta.BLOCK_QUERIES == 16
    assert ta._fwd_block_m(False, False, 16, 64, False) == 16 == ta._fwd_block_m(True, False, 64, 64, False)
    assert ta._dot_f32() == 'tf32x3'
    monkeypatch.setitem(ta.CONFIG, 'fp32_dot', 'ieee')
    assert ta._dot_f32() == 'ieee' and ta._fwd_block_m(True, True, 9, 64, False) == 16
    assert ta._fwd_block_m(True, False, 9, 64, False) == 64  # half / bf16 products do not depend on it
    # the forward streams above ROW_TOKENS tokens and, unless CONFIG fwd_listed='row', for every candidate list
    assert not ta._streams(256, None) and ta._streams(257, None) and ta._streams(197, 128)
    monkeypatch.setitem(ta.CONFIG, 'fwd_listed', 'row')
    assert not ta._streams(16385, 128) and not ta._streams(16385, 255) and ta._streams(16385, 256)
    # dk / dv copies in the backward: one unless CONFIG asks, and at most one per program
    assert ta._row_copies(100) == 1
    monkeypatch.setitem(ta.CONFIG, 'bwd_row_copies', 8)
    assert ta._row_copies(100) == 8 and ta._row_copies(2) == 2


def test_threshold_launch_choices(monkeypatch):
    # CONFIG fwd_stream='threshold' (opt-in): streamed launches over all tokens take it, candidate lists and the row
    # kernel do not; values per tile 1 from 4K tiles, 2 from 2K, else 4; 16 queries for fp32 features (64 spill)
    ta = triton_attention
    assert ta._per_tile(True, 16385, 16, False) == 0  # the merge loop unless asked for
    spare = (torch.empty(1, device='meta'), torch.empty(1, device='meta', dtype=torch.int32))
    launch = ta._top_k_launch(True, False, 16, 64, False, 3137, 8, 12, 3137, spare)
    assert launch[1:3] == (0, ta._GRID_Z) and launch[3] is spare[0] and launch[4] is spare[1]  # no scratch
    monkeypatch.setitem(ta.CONFIG, 'fwd_stream', 'threshold')
    assert ta._per_tile(True, 16385, 16, True) == ta._per_tile(False, 197, 16, False) == 0
    assert ta._per_tile(True, 16385, 16, False) == 1 and ta._per_tile(True, 4096, 16, False) == 1  # 257, 64 tiles
    assert ta._per_tile(True, 4032, 16, False) == 2 and ta._per_tile(True, 2048, 16, False) == 2  # 63, 32 tiles
    assert ta._per_tile(True, 1984, 16, False) == 4 and ta._per_tile(True, 257, 64, False) == 4  # 31, 5 tiles
    assert ta._fwd_block_m(True, True, 16, 64, False, True) == ta.BLOCK_QUERIES
    assert ta._fwd_block_m(True, False, 16, 64, False, True) == ta.STREAM_BLOCK_QUERIES
    # on 8 warps (4 spill under triton 3.9), the merge loop's launches on 4
    assert ta._fwd_warps(True, False, False, True) == ta._fwd_warps(True, True, False, True) == 8
    assert ta._fwd_warps(True, False, False) == ta._fwd_warps(True, True, False) == 4
    # the scratch: STREAM_CAP slots per query (at least K), at most SCRATCH_BYTES a launch down to one batch entry
    assert ta._stream_cap(9) == ta._stream_cap(64) == ta.STREAM_CAP == 64
    monkeypatch.setattr(ta, 'STREAM_CAP', 16)
    assert ta._stream_cap(9) == 16 and ta._stream_cap(20) == 32
    monkeypatch.setattr(ta, 'STREAM_CAP', 64)
    launch = ta._top_k_launch(True, False, 16, 64, False, 3137, 8, 12, 3137, spare)  # 12 x 50 blocks of 64: 18.75 MiB
    block_m, per_tile, most, scores, ids = launch
    assert (block_m, per_tile, most) == (64, 2, 3) and scores.numel() == ids.numel() == 3 * 12 * 50 * 64 * 64
    assert ids.dtype == torch.int32 and scores.device == ids.device == torch.device('meta')
    assert ta._top_k_launch(True, False, 16, 64, False, 16385, 2, 12, 16385, spare)[1:3] == (1, 1)  # one entry: 96 MiB
    # slots of one entry past int32 offsets (2**18 tokens, 128 heads): the merge loop, and the spare tensors
    launch = ta._top_k_launch(True, False, 16, 64, False, 2 ** 18, 1, 128, 2 ** 18, spare)
    assert launch[1:3] == (0, ta._GRID_Z) and launch[3] is spare[0] and launch[4] is spare[1]
    q = torch.empty(8, 12, 3137, 64, device='meta')
    assert ta._batch_chunks(8, q, most=most) == [(0, 3), (3, 6), (6, 8)]


def test_fused_forward_dispatch(backend, monkeypatch):
    monkeypatch.setattr(triton_attention, 'triton_unavailable_reason', lambda device: None)
    backend('auto')
    cuda = torch.device('cuda')
    assert _layer()._fused_supported(50, cuda)
    # candidate subsets (random / spatial) and r covering every token
    assert _layer(candidates='random', num_samples=16)._fused_supported(50, cuda)
    assert _layer(candidates='spatial', num_samples=16)._fused_supported(50, cuda)
    assert _layer(candidates='random', num_samples=64)._fused_supported(50, cuda)
    assert not _layer(candidates='random', num_samples=16)._fused_supported(50, torch.device('cpu'))
    assert not _layer(weighting='ones')._fused_supported(50, cuda)  # the selection kernel serves these
    assert not _layer(aggregation='standard')._fused_supported(50, cuda)
    assert not _layer(neighbor_order='position')._fused_supported(50, cuda)
    assert not ConvNNAttention(32, num_heads=2, num_neighbors=65)._fused_supported(100, cuda)  # K > MAX_NEIGHBORS
    assert not _layer()._fused_supported(triton_attention.MAX_TOKENS + 1, cuda)
    assert _layer()._fused_supported(50, cuda, torch.bfloat16)
    assert not _layer()._fused_supported(50, cuda, torch.float64)  # the kernels compute in fp32: fp64 in PyTorch
    # attention dropout in training: the kernels take its noise (since 2026-12-03); a dropout module of another kind,
    # whose noise they could not draw, stays on the PyTorch path in training
    assert _layer(attn_drop=0.1).train()._fused_supported(50, cuda)
    other = _layer(attn_drop=0.1).train()
    other.attn_drop = torch.nn.AlphaDropout(0.1)
    assert not other._fused_supported(50, cuda) and other.eval()._fused_supported(50, cuda)
    backend('triton')
    assert _layer(candidates='spatial', num_samples=16)._fused_supported(50, torch.device('cpu'))
    assert not _layer(weighting='ones')._fused_supported(50, cuda)
    backend('torch')
    assert not _layer()._fused_supported(50, cuda)
    assert not _layer(candidates='random', num_samples=16)._fused_supported(50, cuda)


def test_dropout_noise_reaches_the_fused_op(backend, monkeypatch):
    # in training the layer hands the kernels attention dropout's noise: (B, heads, N, K) fp32, what nn.Dropout
    # multiplies by (the kernels themselves: test_fused_attention_dropout_under_the_triton_interpreter)
    monkeypatch.setattr(triton_attention, 'triton_unavailable_reason', lambda device: None)
    got = []
    monkeypatch.setattr(triton_attention, 'fused_attention',
                        lambda qs, ks, v, w, k, cand, scale, noise: got.append(noise) or (qs[..., :16], None, None))
    backend('triton')
    layer = _layer(attn_drop=0.25, candidates='random', num_samples=8)
    layer.train()(torch.randn(3, 50, 32))
    layer.eval()(torch.randn(3, 50, 32))
    _layer().train()(torch.randn(3, 50, 32))
    noise = got[0]
    assert noise.shape == (3, 2, 50, 6) and noise.dtype == torch.float32
    assert torch.equal(noise.unique(), torch.tensor([0., 1 / 0.75])) and got[1:] == [None, None]
    # the dropout module's own mode decides, as on the PyTorch path (Monte Carlo dropout: an eval model whose dropout
    # is in training), and the noise is fp32 whatever torch's default dtype
    del got[:]
    layer.attn_drop.train()
    layer(torch.randn(3, 50, 32))
    layer.train()
    layer.attn_drop.eval()
    layer(torch.randn(3, 50, 32))
    assert got[0] is not None and got[1] is None
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _layer(attn_drop=0.25).float().train()(torch.randn(3, 50, 32, dtype=torch.float32))
    finally:
        torch.set_default_dtype(saved)
    assert got[2].dtype == torch.float32


def test_fused_attention_rejects_bad_dropout_noise():
    x, w = torch.randn(1, 2, 5, 4), torch.ones(8, 1, 3)
    for noise, got in ((torch.ones(1, 2, 5, 4), '(1, 2, 5, 4) torch.float32 on cpu'),
                       (torch.ones(1, 2, 5, 3, dtype=torch.float16), '(1, 2, 5, 3) torch.float16 on cpu')):
        with pytest.raises(ValueError,
                           match=re.escape(f'takes the dropout noise as (1, 2, 5, 3) fp32 on cpu; got {got}')):
            triton_attention.fused_attention(x, x, x, w, 3, None, 1.0, noise)


def test_fused_path_needs_an_ampere_or_newer_nvidia_gpu(backend, monkeypatch):
    # the kernels serve NVIDIA GPUs of compute capability >= 8.0 (compiled spill-free, or nearly, for sm_80 to sm_120;
    # sm_75 spills kilobytes): auto runs the PyTorch path on older GPUs and on ROCm builds, 'triton' says why it cannot.
    # On other GPUs than Hopper, fp32 products stream on 16 queries per program, and on sm_100 half / bf16 ones on 32
    # (the launch asks the tensors' GPU)
    if triton_attention.triton is None:
        pytest.fail('triton is not installed (pip install triton)')
    monkeypatch.setattr(triton_attention, '_INSTALL_REASON', None)  # as if a recent Triton were installed
    asked = []
    capabilities = {0: (7, 5), 1: (8, 0), 2: (12, 0)}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i: asked.append(i) or capabilities[i])
    monkeypatch.setattr(triton_attention, '_ARCHS', {})
    turing, ampere, blackwell = (torch.device('cuda', i) for i in range(3))
    assert triton_attention.triton_unavailable_reason(turing) == (
        'the fused ConvNN kernels need an NVIDIA GPU of compute capability 8.0 or newer (Ampere and later; older ones '
        'spill registers); this GPU is 7.5')
    assert triton_attention.triton_available(ampere) and triton_attention.triton_available(blackwell)
    assert [triton_attention._arch(d) for d in (turing, ampere, blackwell, ampere)] == [75, 80, 120, 80]
    assert asked == [0, 1, 2]  # once per device
    backend('auto')
    assert not _layer()._fused_supported(50, turing) and _layer()._fused_supported(50, ampere)
    backend('triton')
    with pytest.raises(RuntimeError, match=r'is "triton" but the fused ConvNN kernels need .* this GPU is 7\.5'):
        _layer()._fused_supported(50, turing)
    monkeypatch.setattr(torch.version, 'hip', '6.4.0', raising=False)
    assert triton_attention.triton_unavailable_reason(ampere) == (
        'the fused ConvNN kernels are built for NVIDIA GPUs; this torch is a ROCm build (6.4.0)')
    # the launch of fp32 products over streamed keys (a ResNet's selection under autocast): by the tensors' GPU
    spare = (torch.empty(0), torch.empty(0, dtype=torch.int32))
    for arch, fp32, half in ((80, 16, 64), (86, 16, 64), (100, 16, 32), (120, 16, 64), (90, 64, 64)):
        monkeypatch.setattr(triton_attention, '_arch', lambda device, arch=arch: arch)
        assert triton_attention._top_k_launch(True, True, 9, 64, False, 3136, 1, 1, 3136, spare)[0] == fp32
        assert triton_attention._top_k_launch(True, False, 9, 64, False, 3136, 1, 1, 3136, spare)[0] == half


def test_fused_path_needs_a_recent_triton(backend, monkeypatch):
    # triton 3.1-3.3 (torch 2.5-2.7) cannot compile the kernels (no tl.topk): auto falls back to the PyTorch path on
    # CUDA, and 'triton' / fused_attention say which version is there and which is needed
    if triton_attention.triton is None:
        pytest.fail('triton is not installed (pip install triton)')
    cuda = torch.device('cuda')
    monkeypatch.setattr(triton_attention, '_INSTALL_REASON', triton_attention._too_old('3.3.1'))
    assert triton_attention.triton_unavailable_reason(cuda) == (
        'triton 3.3.1 is too old for the fused ConvNN kernels (they need triton >= 3.4, which torch >= 2.8 brings)')
    assert not triton_attention.triton_available(cuda)
    backend('auto')
    assert not _layer()._fused_supported(50, cuda)
    backend('triton')
    with pytest.raises(RuntimeError, match=r'is "triton" but triton 3.3.1 is too old .* need triton >= 3.4'):
        _layer()._fused_supported(50, cuda)
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match='triton 3.3.1 is too old'):
        triton_attention.fused_attention(x, x, x, torch.ones(8, 1, 2), 2)
    for version, ok in (('3.4.0', True), ('3.4.0rc1', True), ('3.10.0+git8a1b2c3', True), ('3.3.9', False),
                        ('2.3.1', False)):
        monkeypatch.setattr(triton_attention, '_INSTALL_REASON', triton_attention._too_old(version))
        assert triton_attention.triton_available(cuda) is ok, version
    monkeypatch.setattr(triton_attention, '_INSTALL_REASON', triton_attention._too_old('3.4.0'))
    backend('auto')
    assert _layer()._fused_supported(50, cuda)


def test_forward_queries_per_program_at_the_rule_boundaries():
    # STREAM_BLOCK_QUERIES streaming queries up to K 32 (16 above); sm_100 and its relatives (sm_103: B300) take 32;
    # fp32 products stream on 64 queries on Hopper (sm_90) only
    ta = triton_attention
    assert ta._fwd_block_m(True, False, 32, 64, False) == ta.STREAM_BLOCK_QUERIES == 64
    assert ta._fwd_block_m(True, False, 33, 64, False) == ta.BLOCK_QUERIES == 16
    for arch in (100, 103):
        assert ta._fwd_block_m(True, False, 16, 64, False, arch=arch) == ta.STREAM_BLOCK_QUERIES // 2 == 32, arch
    for arch in (80, 86, 89, 100, 120):
        assert ta._fwd_block_m(True, True, 16, 64, False, arch=arch) == ta.BLOCK_QUERIES, arch
    assert ta._fwd_block_m(True, True, 16, 64, False, arch=90) == ta.STREAM_BLOCK_QUERIES
    assert ta._fwd_block_m(False, False, 16, 64, False, arch=100) == ta.BLOCK_QUERIES  # the row kernel: 16 anywhere


def testkept_neighbors_clamps_to_the_tokens_or_to_the_candidate_list():
    ta = triton_attention
    assert ta.kept_neighbors(9, 100, None) == 9 and ta.kept_neighbors(9, 4, None) == 4
    assert ta.kept_neighbors(9, 100, torch.arange(5)) == 5 and ta.kept_neighbors(3, 100, torch.arange(5)) == 3


def test_entry_span_and_batch_chunks_of_broadcast_tensors():
    ta = triton_attention
    assert ta._entry_span(torch.empty(2, 3, 4, 5, device='meta')) == 3 * 4 * 5  # one entry of a contiguous tensor
    assert ta._entry_span(torch.empty(2, 5, 4, 3, device='meta').transpose(1, 3)) == 3 * 4 * 5
    # a batch broadcast over stride 0 (one entry in memory): split for the grid only
    shared = torch.empty(1, 2, 4, 16, device='meta').expand(70000, -1, -1, -1)
    assert ta._batch_chunks(70000, shared) == [(0, 65535), (65535, 70000)]
