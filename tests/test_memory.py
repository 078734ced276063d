"""Memory: no (B, C, n, K) neighbour copies, no n x n scores kept for backward, linear growth in random mode."""
import json
import os
import subprocess
import sys

import pytest
import torch

from timm_convnn import ConvNN2d, ConvNNAttention
from timm_convnn.utils.memory import MALLOC_ENV


def _saved_tensor_sizes(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def _attention_saved(candidates, N, K, B=2, C=64, H=2):
    m = ConvNNAttention(C, H, num_neighbors=K, candidates=candidates, num_samples=64, similarity='cosine',
                        grid_size=(16, N // 16)).train()
    x = torch.randn(B, N, C, requires_grad=True)
    out, sizes = _saved_tensor_sizes(lambda: m(x))
    out.sum().backward()  # backward works from what was kept
    return sizes


@pytest.mark.parametrize('candidates', ['all', 'random', 'spatial'])
def test_attention_keeps_no_score_matrix_or_neighbor_copies(candidates):
    B, N, C, H, K = 2, 512, 64, 2, 16
    sizes = _attention_saved(candidates, N, K)
    score_matrix = B * H * N * N  # what attention / the reference keeps
    neighbor_copy = B * C * N * K  # the reference's (B, C, n, K) gathered tensor
    largest_activation = B * N * 3 * C  # the qkv projection output
    assert max(sizes) <= largest_activation < min(score_matrix, neighbor_copy)
    # everything kept is O(n): doubling n doubles it (an n x n term would quadruple)
    assert sum(_attention_saved(candidates, 2 * N, K)) <= 2.05 * sum(sizes)
    # growing K adds only the (B, H, n, K) indices and weights, not K copies of the (B, n, C) values
    extra = sum(_attention_saved(candidates, N, 2 * K)) - sum(sizes)
    assert extra <= 5 * B * H * N * K + C * K, (extra, B * C * N * K)


def _conv_saved(K, side=32, B=2, C=32):
    m = ConvNN2d(C, C, num_neighbors=K, padding=1, weighting='softmax')
    x = torch.randn(B, C, side, side, requires_grad=True)
    out, sizes = _saved_tensor_sizes(lambda: m(x))
    out.sum().backward()
    return sizes


def test_conv2d_keeps_no_neighbor_copies():
    B, C, side, K = 2, 32, 32, 9
    sizes = _conv_saved(K)
    n_padded = (side + 2) ** 2
    assert max(sizes) < min(B * n_padded * n_padded, B * C * side * side * K)
    extra = sum(_conv_saved(2 * K)) - sum(sizes)
    assert extra <= 5 * B * side * side * K + C * C * K, (extra, B * C * side * side * K)


_PEAK_SCRIPT = r'''
import json, sys, torch
torch.set_num_threads(1)
from timm_convnn import ConvNNAttention
from timm_convnn.utils import peak_rss_delta
n = int(sys.argv[1])
m = ConvNNAttention(128, 4, num_neighbors=16, candidates='random', num_samples=64).train()
x = torch.randn(4, n, 128, requires_grad=True)
def step():
    m(x).sum().backward()
step()  # warm-up: allocator, lazy init
x.grad = None
for p in m.parameters():
    p.grad = None
print(json.dumps(peak_rss_delta(step)))
'''


def _peak(n):
    env = dict(os.environ, **MALLOC_ENV)
    out = subprocess.run([sys.executable, '-c', _PEAK_SCRIPT, str(n)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='peak RSS accounting reads /proc (Linux only)')
def test_random_mode_peak_memory_grows_linearly():
    # forward + backward peak at n = 1024 and 4096: O(n (r + K + d)) buffers plus a bounded working set (the
    # slot-chunk budget) grow at most ~4x; any n x n term would grow ~16x
    p1, p4 = _peak(1024), _peak(4096)
    ratio = p4 / p1
    score_matrix_4096 = 4 * 4 * 4096 * 4096 * 4  # bytes of fp32 (B, H, n, n) scores at n = 4096 (1 GiB)
    assert p1 > 0 and 1.0 < ratio < 6, (p1, p4, ratio)
    assert p4 < score_matrix_4096 / 4, (p4, score_matrix_4096)
