"""The ConvNN operator: kernels against autograd and brute force, candidates, determinism, dtypes, devices, tracing."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import timm
from timm_convnn import ConvNN2d, ConvNNAttention, ConvNNBranch2d
from timm_convnn.layers import functional as FN


def _rand_idx(B, G, N, M, K):
    # K distinct ids per row (as selection produces)
    return torch.stack([torch.randperm(M)[:K] for _ in range(B * G * N)]).view(B, G, N, K)


# slot-chunk budgets: one slot at a time, chunks of 2 slots (uneven last chunk), all slots at once
BUDGETS = {'per-slot': 1, 'two-slots': 2 * 2 * 2 * 5 * 8 * 4, 'all-slots': 1024 * 1024}


@pytest.mark.parametrize('budget', list(BUDGETS))
def test_gather_dot_gradcheck(budget):
    B, G, N, M, D, K = 2, 2, 5, 7, 3, 5
    q = torch.randn(B, G, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, G, M, D, dtype=torch.float64, requires_grad=True)
    idx = _rand_idx(B, G, N, M, K)
    assert torch.autograd.gradcheck(lambda a, b: FN.gather_dot(a, b, idx, BUDGETS[budget]), (q, k))
    ref = torch.einsum('bgnd,bgnkd->bgnk', q, k[torch.arange(B)[:, None, None, None],
                                              torch.arange(G)[None, :, None, None], idx])
    torch.testing.assert_close(FN.gather_dot(q, k, idx), ref)


@pytest.mark.parametrize('tokens', [7, 300])  # M <= 16 K: dense backward; M > 16 K: gather / scatter backward
def test_gather_dot_gradient_of_one_operand(tokens):
    # only q or only k requiring a gradient: that one gets it (the layers always need both; the function is public)
    B, G, N, D, K = 2, 2, 5, 3, 5
    q0, k0 = torch.randn(B, G, N, D, dtype=torch.float64), torch.randn(B, G, tokens, D, dtype=torch.float64)
    idx = _rand_idx(B, G, N, tokens, K)
    g = torch.randn(B, G, N, K, dtype=torch.float64)
    ref_q, ref_k = torch.autograd.grad(FN._gather_dot_eager(q0.requires_grad_(), k0.requires_grad_(), idx), (q0, k0), g)
    for which in ('q', 'k'):
        q, k = q0.detach().requires_grad_(which == 'q'), k0.detach().requires_grad_(which == 'k')
        FN.gather_dot(q, k, idx, 64).backward(g)
        assert (q.grad is None) == (which == 'k') and (k.grad is None) == (which == 'q')
        torch.testing.assert_close(q.grad if which == 'q' else k.grad, ref_q if which == 'q' else ref_k)


@pytest.mark.parametrize('tokens', [7, 300])  # M <= 16 K: dense backward; M > 16 K: gather / scatter backward
def test_gather_dot_backward_paths_and_reused_scores(tokens):
    B, G, N, D, K = 2, 2, 5, 3, 5
    q = torch.randn(B, G, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, G, tokens, D, dtype=torch.float64, requires_grad=True)
    idx = _rand_idx(B, G, N, tokens, K)
    assert FN._dense_backward_is_cheaper(tokens, K) == (tokens == 7)
    assert torch.autograd.gradcheck(lambda a, b: FN.gather_dot(a, b, idx, 64), (q, k))
    # the selection's own scores are returned as differentiable scores: same values, same gradients
    qs, ks = q.detach().requires_grad_(), k.detach().requires_grad_()
    sel_idx, sel_scores = FN.select_scored_neighbors(q.detach(), k.detach(), K)
    reused = FN.gather_dot(qs, ks, sel_idx, scores=sel_scores)
    recomputed = FN._gather_dot_eager(q, k, sel_idx)
    torch.testing.assert_close(reused, recomputed)
    g = torch.randn_like(reused)
    ref = torch.autograd.grad(recomputed, (q, k), g)
    torch.testing.assert_close(torch.autograd.grad(reused, (qs, ks), g), ref)
    # both paths, whatever the size (the dense one in small score chunks)
    dense = FN._gather_dot_backward_dense(q.detach(), k.detach(), sel_idx, g, True, True, 256)
    sparse = FN._gather_dot_backward_sparse(q.detach(), k.detach(), sel_idx, g, True, True)
    for dq, dk in (dense, sparse):
        torch.testing.assert_close((dq, dk), ref)


@pytest.mark.parametrize('budget', list(BUDGETS))
@pytest.mark.parametrize('depthwise', [True, False])
@pytest.mark.parametrize('with_rho', [True, False])
def test_neighbor_aggregate_gradcheck_and_definition(depthwise, with_rho, budget):
    B, G, N, M, C, Co, K = 2, 2, 4, 6, 3, 5, 5
    v = torch.randn(B, G, M, C, dtype=torch.float64, requires_grad=True)
    idx = _rand_idx(B, G, N, M, K)
    rho = torch.rand(B, G, N, K, dtype=torch.float64, requires_grad=True) if with_rho else None
    shape = (G, C, K) if depthwise else (G, Co, C, K)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    inputs = (v, w) + ((rho,) if with_rho else ())

    def fn(v_, w_, *r):
        return FN.neighbor_aggregate(v_, idx, r[0] if r else None, w_, depthwise, BUDGETS[budget])

    assert torch.autograd.gradcheck(fn, inputs)
    # definition: the paper's Conv1d(kernel K, stride K) over the materialised neighbour sequence
    nb = v[torch.arange(B)[:, None, None, None], torch.arange(G)[None, :, None, None], idx]  # (B, G, N, K, C)
    if rho is not None:
        nb = nb * rho[..., None]
    seq = nb.permute(0, 1, 4, 2, 3).reshape(B * G, C, N * K)  # token-major, slot-minor
    outs = []
    for g in range(G):
        seq_g = seq.view(B, G, C, N * K)[:, g]
        if depthwise:
            y = torch.nn.functional.conv1d(seq_g, w[g].unsqueeze(1), stride=K, groups=C)
        else:
            y = torch.nn.functional.conv1d(seq_g, w[g], stride=K)
        outs.append(y.transpose(1, 2))
    torch.testing.assert_close(fn(v, w, *((rho,) if with_rho else ())), torch.stack(outs, 1))


@pytest.mark.parametrize('depthwise', [True, False])
def test_aggregation_under_autocast_takes_one_dtype(depthwise):
    # the standard aggregation is a matrix product: under autocast it runs in autocast's dtype, as the conv it
    # replaces would, from an fp32 v too (a VGG's first ConvNN layer gets the image), and differentiates back into
    # the leaves' own dtypes; the depthwise one is elementwise and keeps v's dtype (autocast leaves such ops alone)
    B, G, N, M, C, K = 2, 2, 7, 9, 3, 4
    v = torch.randn(B, G, M, C, requires_grad=True)
    rho = torch.rand(B, G, N, K, requires_grad=True)
    w = torch.randn(*((G, C, K) if depthwise else (G, 5, C, K)), requires_grad=True)
    idx = _rand_idx(B, G, N, M, K)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = FN.neighbor_aggregate(v, idx, rho, w, depthwise)
    dtype = torch.float32 if depthwise else torch.bfloat16
    leaves = (v, rho, w)
    ref = FN.neighbor_aggregate(*(t.to(dtype) if t is v else t for t in (v, idx, rho, w)), depthwise)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    torch.testing.assert_close(grads, torch.autograd.grad((ref * gy).sum(), leaves))


@pytest.mark.parametrize('budget', list(BUDGETS))
@pytest.mark.parametrize('depthwise', [True, False])
def test_custom_functions_match_eager_fallback(budget, depthwise):
    B, G, N, M, C, K = 2, 3, 9, 11, 4, 5
    q, k, v = (torch.randn(B, G, n, C, requires_grad=True) for n in (N, M, M))
    w = torch.randn(*((G, C, K) if depthwise else (G, 6, C, K)), requires_grad=True)
    idx = _rand_idx(B, G, N, M, K)
    b = BUDGETS[budget]

    def run(fast):
        s = FN.gather_dot(q, k, idx, b) if fast else FN._gather_dot_eager(q, k, idx, b)
        rho = s.softmax(-1)
        if fast:
            y = FN.neighbor_aggregate(v, idx, rho, w, depthwise, b)
        else:
            y = FN._aggregate_eager(v, idx, rho, w, depthwise, b)
        return (y,) + torch.autograd.grad(y.square().sum(), (q, k, v, w))

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)



# query-block budgets of the gather / scatter kernels (8 bytes per float64 value; K = 5, C = 4 -> 160 bytes a query,
# 151 queries a slice, 9 slices): all slices in one block, at most 5 slices a block (5 + 4), each slice cut into
# query ranges of at most 64 (balanced: 51 + 51 + 49)
BLOCK_BYTES = {'one-block': 1 << 20, 'slices': 5 * 151 * 160, 'query-ranges': 1}


@pytest.mark.parametrize('block', list(BLOCK_BYTES))
@pytest.mark.parametrize('with_rho', [True, False])
def test_query_block_kernels_match_definition(block, with_rho, monkeypatch):
    monkeypatch.setattr(FN, '_BLOCK_BYTES', BLOCK_BYTES[block])
    B, G, N, M, C, K = 3, 3, 151, 250, 4, 5
    expected = {'one-block': [(0, 9, 0, N)], 'slices': [(0, 5, 0, N), (5, 9, 0, N)],
                'query-ranges': [(s, s + 1, a, b) for s in range(9) for a, b in ((0, 51), (51, 102), (102, 151))]}
    assert FN._query_blocks(B * G, N, K * C * 8, BLOCK_BYTES[block]) == expected[block]
    q, k, v = (torch.randn(B, G, n, C, dtype=torch.float64, requires_grad=True) for n in (N, M, M))
    rho = torch.rand(B, G, N, K, dtype=torch.float64, requires_grad=True) if with_rho else None
    w = torch.randn(G, C, K, dtype=torch.float64, requires_grad=True)
    idx = _rand_idx(B, G, N, M, K)
    leaves = [t for t in (q, k, v, rho, w) if t is not None]
    bi, gi = torch.arange(B)[:, None, None, None], torch.arange(G)[None, :, None, None]

    # the definitions, on the materialised neighbours
    nb = v[bi, gi, idx] * (rho[..., None] if with_rho else 1.)  # (B, G, N, K, C)
    y_ref = (nb * w.transpose(1, 2)[None, :, None]).sum(-2)
    s_ref = (q.unsqueeze(-2) * k[bi, gi, idx]).sum(-1)
    # the block kernels: depthwise aggregation; gather-dot through its sparse (gather / scatter) backward
    assert not FN._dense_backward_is_cheaper(M, K)
    y = FN.neighbor_aggregate(v, idx, rho, w, True)
    s = FN.gather_dot(q, k, idx)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.testing.assert_close(y, y_ref)
    ref = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), leaves)
    torch.testing.assert_close(torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves), ref)


def test_query_blocks_stay_few_under_torch_compile(monkeypatch):
    # torch.compile unrolls the block loop into the graph: there blocks are about output-sized (about K of them, at
    # least 64 queries), not cache-sized (here 18 eagerly), and split the queries only, whatever the batch
    monkeypatch.setattr(FN, '_BLOCK_BYTES', 1)
    v, idx = torch.randn(2, 3, 170, 4), _rand_idx(2, 3, 150, 170, 5)

    def count(v_):
        return torch.tensor(len(FN._block_setup(v_, idx, 2 * 3 * 150 * 4 * 4)[2]))

    assert count(v).item() == 18
    torch._dynamo.reset()
    assert torch.compile(count, backend='eager', fullgraph=True)(v).item() == 3
    monkeypatch.setattr(FN, '_capturing', lambda: True)
    assert FN._block_setup(v, idx, 0)[2] == [(0, 6, 0, 50), (0, 6, 50, 100), (0, 6, 100, 150)]


def test_query_blocks_on_accelerators_are_large():
    # off the CPU (meta stands in for a GPU here) blocks are output-sized, at least 64 MiB: ViT-B at batch 256 keeps
    # about K blocks; one 16385-token image (6 heads, bf16) takes one block per head (output-sized ones: 18)
    def blocks(B, H, N, K):
        v = torch.empty(B, H, N, 64, device='meta', dtype=torch.bfloat16)
        return len(FN._block_setup(v, torch.empty(B, H, N, K, dtype=torch.long, device='meta'), v.nbytes)[2])

    assert blocks(256, 12, 197, 16) == 16
    assert blocks(1, 6, 16385, 16) == 6
@pytest.mark.parametrize('similarity', ['dot', 'cosine', 'euclidean'])
def test_selection_is_brute_force_topk(similarity):
    torch.manual_seed(0)  # (unseeded, the inputs hung on the tests run before: euclidean near-ties then flipped)
    B, G, N, D, K = 2, 2, 33, 8, 5
    q, k = torch.randn(B, G, N, D), torch.randn(B, G, N, D)
    qs, ks = FN.similarity_features(q, k, similarity)
    if similarity == 'dot':
        dense = q @ k.transpose(-1, -2) / D ** 0.5
    elif similarity == 'cosine':
        dense = torch.nn.functional.cosine_similarity(q[:, :, :, None], k[:, :, None], dim=-1)
    else:
        dense = -torch.cdist(q, k).square()
    ref = dense.topk(K, dim=-1).indices
    idx = FN.select_neighbors(qs, ks, K)
    assert torch.equal(idx, ref)
    torch.testing.assert_close(FN.gather_dot(qs, ks, idx), dense.gather(-1, ref), atol=1e-4, rtol=1e-5)
    # chunked selection (tiny score budget) gives the same answer
    assert torch.equal(FN.select_neighbors(qs, ks, K, budget_bytes=1), ref)


def test_selection_scores_stay_fp32_under_autocast():
    # autocast would run the score matmul in bf16 (cosine scores in ~4e-3 steps: ranks flip, near-ties tie); the
    # selection must see the same fp32 scores as without autocast, for all and for listed candidates
    B, G, N, D, K = 2, 2, 50, 16, 9
    qs, ks = (torch.randn(B, G, N, D).bfloat16() for _ in range(2))
    cand = torch.arange(0, N, 3)
    ref_all = FN.select_scored_neighbors(qs.float(), ks.float(), K)
    ref_listed = FN.select_scored_neighbors(qs.float(), ks.float(), K, cand, torch.arange(N))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got_all = FN.select_scored_neighbors(qs, ks, K)
        got_listed = FN.select_scored_neighbors(qs, ks, K, cand, torch.arange(N))
    for (i0, s0), (i1, s1) in ((ref_all, got_all), (ref_listed, got_listed)):
        assert s1.dtype == torch.float32 and torch.equal(i0, i1) and torch.equal(s0, s1)
    # the layer under autocast selects what the fp32 layer selects from the same bf16 projections
    layer = ConvNNAttention(32, num_heads=2, num_neighbors=K, qkv_bias=False)
    x = torch.randn(1, N, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        q, k, _ = layer.qkv(x).reshape(1, N, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        qs, ks = FN.similarity_features(q, k, layer.similarity)
        inside = FN.select_neighbors(qs, ks, K)
    assert torch.equal(inside, FN.select_neighbors(qs.float(), ks.float(), K))


@pytest.mark.parametrize('similarity', ['cosine', 'euclidean'])
def test_half_precision_features_rank_as_fp32(similarity):
    # bf16 / fp16 inputs are what they are, but their cosine / euclidean features are computed from them in fp32:
    # rounded unit vectors or squared norms (-|k|^2 + 2 <q, k> cancels its leading digits) changed most queries'
    # neighbours here (80 % / 51 % in bf16)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 400, 32) + 3.  # (cosines near 1, large norms: what rounding hurts most)
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        qs, ks = FN.similarity_features(xh, xh, similarity)
        assert qs.dtype == ks.dtype == torch.float32
        ref = FN.select_neighbors(*FN.similarity_features(xh.float(), xh.float(), similarity), 9)
        assert torch.equal(FN.select_neighbors(qs, ks, 9), ref)
    # dot features keep the inputs' dtype: their scores are the rounded inputs' own, as in attention
    assert FN.similarity_features(x.bfloat16(), x.bfloat16(), 'dot')[0].dtype == torch.bfloat16


def test_coordinates_are_at_least_fp32():
    # bf16 steps of 2 ** -7 near the edge of [-1, 1] cannot hold a 300-pixel row's positions (every other one ties)
    ref = FN.coordinate_grid(160, 300, torch.device('cpu'), torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(FN.coordinate_grid(160, 300, torch.device('cpu'), dtype), ref)
    assert FN.coordinate_grid(3, 4, torch.device('cpu'), torch.float64).dtype == torch.float64
    assert ref[:300, 0].unique().numel() == 300


def _hash_definition(n, seed):
    # hashed_permutation's definition in Python ints: a 32-bit hash of every id keyed by the seed, then argsort
    def h(x):
        x = (x + seed * 0x9E3779B1 + 0x632BE5AB) & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    return sorted(range(n), key=h)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_any_int_sample_seed_keys_the_eval_draw():
    # every int seed, large or negative, gives the hash's permutation (seeds past ~7,000 overflowed int64 and raised
    # OverflowError in an eval forward); TorchScript's wrapping int64 arithmetic draws the same
    cpu = torch.device('cpu')
    for seed in (0, 3, 12345, 2 ** 31, -10 ** 6, 10 ** 30):
        assert FN.hashed_permutation(64, seed, cpu).tolist() == _hash_definition(64, seed)
        # a layer's eval draw of r of n tokens: keyed by its sample_seed and the token count
        draw = FN.random_candidates(64, 8, 1, False, seed, cpu).tolist()
        assert draw == [i + 1 for i in _hash_definition(64, seed * 1000003 + 64)[:8]]
    m = ConvNNAttention(32, 4, num_neighbors=3, candidates='random', num_samples=8, sample_seed=2 ** 40).eval()
    x = torch.randn(2, 50, 32)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))
    conv = ConvNN2d(4, 4, candidates='random', num_samples=9, sample_seed=12345).eval()
    assert conv(torch.randn(1, 4, 6, 6)).shape == (1, 4, 6, 6)


def test_listed_candidates_include_self_once():
    B, G, N, D, K = 2, 3, 40, 6, 8
    q = torch.randn(B, G, N, D)
    qs, ks = FN.similarity_features(q, q.clone(), 'cosine')
    cand = torch.tensor([0, 3, 5, 8, 13, 21, 34, 37, 39])
    idx = FN.select_neighbors(qs, ks, K, cand, torch.arange(N), budget_bytes=1024)
    assert idx.shape == (B, G, N, K)
    # cosine: every token is its own best match, so the query wins slot 0 whether or not it was listed
    assert torch.equal(idx[..., 0], torch.arange(N).expand(B, G, N))
    allowed = torch.zeros(N, N, dtype=torch.bool)
    allowed[:, cand] = True
    allowed[torch.arange(N), torch.arange(N)] = True
    assert allowed[torch.arange(N).view(1, 1, N, 1), idx].all()
    srt = idx.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all(), 'a candidate was selected twice'


def test_attention_candidates_random_and_spatial():
    m = ConvNNAttention(16, 2, candidates='random', num_samples=20, num_neighbors=4, num_prefix_tokens=1)
    for training in (True, False):
        m.train(training)
        ids = m._candidate_ids(1 + 196, torch.device('cpu'))
        assert ids.shape == (21,) and ids[0] == 0 and len(set(ids.tolist())) == 21
        assert ids[1:].min() >= 1 and ids.max() <= 196
    m.eval()
    assert torch.equal(m._candidate_ids(197, torch.device('cpu')), m._candidate_ids(197, torch.device('cpu')))
    # r >= number of patch tokens: all tokens
    assert m._candidate_ids(1 + 16, torch.device('cpu')) is None

    s = ConvNNAttention(16, 2, candidates='spatial', num_samples=16, num_neighbors=4, num_prefix_tokens=1)
    ids = s._candidate_ids(1 + 64, torch.device('cpu'))  # 8 x 8 patches, 4 x 4 grid at rows/cols 1, 3, 5, 7
    expect = [1 + r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert ids.tolist() == [0] + expect
    s.num_samples = 128
    assert FN.grid_shape(14, 14, 128) == (11, 11)
    ids = s._candidate_ids(1 + 196, torch.device('cpu'))
    assert ids.shape == (1 + 121,) and len(set(ids.tolist())) == 122


def test_grid_shape_fits_the_budget_and_covers_small_maps():
    for height in range(1, 41):
        for width in range(1, 41):
            for r in (1, 2, 5, 9, 16, 20, 32, 128):
                gh, gw = FN.grid_shape(height, width, r)
                assert 1 <= gh <= height and 1 <= gw <= width and gh * gw <= r, (height, width, r, gh, gw)
                if height * width <= r:  # the whole map (a graph exported for every size relies on it)
                    assert (gh, gw) == (height, width), (height, width, r)
    assert FN.grid_shape(40, 1, 9) == (9, 1) and FN.grid_shape(1, 40, 9) == (1, 9)  # thin maps: a line of r points


def test_convnn2d_candidates_stay_on_real_map():
    m = ConvNN2d(3, 4, candidates='random', num_samples=10, padding=1)
    for training in (True, False):
        m.train(training)
        ids = m._candidate_ids(6, 7, torch.device('cpu'))
        rows, cols = ids // 9, ids % 9  # padded width 9
        assert ((rows >= 1) & (rows <= 6) & (cols >= 1) & (cols <= 7)).all() and len(set(ids.tolist())) == 10
    g = ConvNN2d(3, 4, candidates='spatial', num_samples=9, padding=1)
    ids = g._candidate_ids(6, 6, torch.device('cpu'))
    assert sorted(((ids // 8 - 1) * 6 + ids % 8 - 1).tolist()) == [r * 6 + c for r in (1, 3, 5) for c in (1, 3, 5)]


def test_k_is_clamped_on_small_inputs():
    # timm's tests run 2x2 feature maps: K = 9 on 4 pixels uses the first 4 slots
    big = ConvNN2d(4, 6, num_neighbors=9).eval()
    small = ConvNN2d(4, 6, num_neighbors=4).eval()
    with torch.no_grad():
        small.aggregate.weight.copy_(big.aggregate.weight[..., :4])
        small.aggregate.bias.copy_(big.aggregate.bias)
    x = torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(big(x), small(x))
    # depthwise too, with random per-slot weights (unit ones would hide which slots are used): the first taps,
    # for ConvNN2d and for attention (3 tokens, K 9 -> 3)
    dw = dict(aggregation='depthwise', weighting='softmax')
    for big, small, x in ((ConvNN2d(4, 4, num_neighbors=9, **dw), ConvNN2d(4, 4, num_neighbors=4, **dw),
                           torch.randn(2, 4, 2, 2)),
                          (ConvNNAttention(16, 2, num_neighbors=9), ConvNNAttention(16, 2, num_neighbors=3),
                           torch.randn(2, 3, 16))):
        kept = small.aggregate.num_neighbors
        with torch.no_grad():
            big.aggregate.weight.normal_()
            source = dict(big.named_parameters())
            for name, p in small.named_parameters():
                p.copy_(source[name][..., :kept] if name == 'aggregate.weight' else source[name])
        torch.testing.assert_close(big.eval()(x), small.eval()(x))
    attn = ConvNNAttention(16, 2, num_neighbors=9)
    assert attn(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    assert ConvNN2d(4, 6, num_neighbors=9, stride=2)(torch.randn(1, 4, 1, 1)).shape == (1, 6, 1, 1)


def _modules():
    # built at collection, before the autouse seed: seeded here so that every run tests the same weights
    torch.manual_seed(0)
    return [
        ConvNNAttention(32, 4, qkv_bias=True, num_neighbors=5, num_prefix_tokens=1),
        ConvNNAttention(32, 4, num_neighbors=5, candidates='random', num_samples=8, num_prefix_tokens=1,
                        similarity='cosine', coords='append'),
        ConvNNAttention(32, 2, num_neighbors=5, candidates='spatial', num_samples=9, similarity='euclidean',
                        aggregation='standard', num_prefix_tokens=1),
        ConvNN2d(6, 8, padding=1),
        ConvNN2d(6, 8, stride=2, padding=1, candidates='random', num_samples=12, weighting='softmax',
                 coords='append'),
        ConvNN2d(6, 6, candidates='spatial', num_samples=16, aggregation='depthwise', similarity='dot'),
        ConvNNBranch2d(6, 8, stride=2),
        ConvNNBranch2d(6, 8, candidates='random', num_samples=10, weighting='softmax'),
    ]


def _input(m, dtype=torch.float32, device='cpu'):
    if isinstance(m, ConvNNAttention):
        return torch.randn(2, 1 + 25, 32, dtype=dtype, device=device)
    return torch.randn(2, 6, 7, 7, dtype=dtype, device=device)


@pytest.mark.parametrize('m', _modules(), ids=lambda m: type(m).__name__)
def test_gradients_reach_every_parameter(m):
    m.train()
    x = _input(m).requires_grad_()
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize('m', _modules(), ids=lambda m: type(m).__name__)
def test_eval_is_deterministic_and_dtype_preserving(m):
    m.eval()
    x = _input(m)
    y1 = m(x)
    torch.manual_seed(1234)  # a different global RNG state must not change eval outputs
    torch.rand(100)
    assert torch.equal(m(x), y1)
    mb = m.to(torch.bfloat16)
    yb = mb(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()
    m.float()


def test_random_candidates_are_fresh_in_training():
    m = ConvNNAttention(32, 4, num_neighbors=3, candidates='random', num_samples=4).train()
    draws = {tuple(m._candidate_ids(65, torch.device('cpu')).tolist()) for _ in range(5)}
    assert len(draws) > 1
    m.eval()
    assert len({tuple(m._candidate_ids(65, torch.device('cpu')).tolist()) for _ in range(5)}) == 1


def test_eval_is_deterministic_across_processes():
    code = (
        'import torch, timm_convnn\n'
        'torch.manual_seed(0)\n'
        'm = timm_convnn.ConvNNAttention(32, 4, num_neighbors=5, candidates="random", num_samples=8,'
        ' num_prefix_tokens=1, sample_seed=3).eval()\n'
        'x = torch.randn(2, 50, 32)\n'
        'torch.manual_seed(int(__import__("sys").argv[1]))\n'
        'print(repr(m(x).double().sum().item()), m._candidate_ids(50, torch.device("cpu")).tolist())\n'
    )
    outs = {subprocess.run([sys.executable, '-c', code, str(s)], capture_output=True, text=True, check=True).stdout
            for s in (1, 2)}
    assert len(outs) == 1, outs


@pytest.mark.parametrize('m', _modules(), ids=lambda m: type(m).__name__)
def test_meta_device(m):
    cls = type(m)
    if cls is ConvNNAttention:
        mm = cls(32, 4, num_neighbors=5, candidates=m.candidates, num_samples=9, num_prefix_tokens=1, device='meta')
    else:
        mm = cls(6, 6 if getattr(m, 'aggregation', '') == 'depthwise' else 8, device='meta')
    assert all(p.device.type == 'meta' for p in mm.parameters())
    y = mm(_input(m, device='meta'))
    assert y.device.type == 'meta'


# recent torch (2.14, 2.15) deprecates torch.jit.script; timm's own model tests still script every model, so the
# layers must script
@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
@pytest.mark.parametrize('m', _modules(), ids=lambda m: type(m).__name__)
def test_torchscript_matches_eager(m):
    m.eval()
    x = _input(m)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))


def test_fx_tracing_with_timm_leaf_modules():
    from torchvision.models.feature_extraction import create_feature_extractor
    from timm.models import get_notrace_functions, get_notrace_modules
    assert {ConvNNAttention, ConvNN2d} <= set(get_notrace_modules())
    model = nn.Sequential(ConvNNBranch2d(3, 8), nn.ReLU(), ConvNN2d(8, 8, padding=1, stride=2)).eval()
    tracer_kwargs = {'leaf_modules': list(get_notrace_modules()), 'autowrap_functions': list(get_notrace_functions())}
    fx = create_feature_extractor(model, return_nodes={'2': 'out'}, tracer_kwargs=tracer_kwargs)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fx(x)['out'], model(x))


def test_attention_dropout_acts_on_neighbor_weights():
    m = ConvNNAttention(16, 2, num_neighbors=4, attn_drop=0.5)
    x = torch.randn(2, 10, 16)
    m.eval()
    y = m(x)
    assert torch.equal(y, m(x))
    m.train()
    assert not torch.allclose(m(x), y)


def test_timm_vit_runs_with_convnn_attention_as_attn_layer():
    # drop-in: timm's own VisionTransformer accepts the class through attn_layer
    model = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, attn_layer=ConvNNAttention)
    assert all(isinstance(b.attn, ConvNNAttention) for b in model.blocks)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    out.sum().backward()


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_with_options_configures_the_layer_class_for_timm_models(tmp_path):
    # timm's VisionTransformer takes attn_layer as a class (it calls issubclass: a functools.partial fails there);
    # with_options gives one whose instances carry the options, and pickle, deep-copy and script like the layer
    import copy
    import functools
    import pickle
    from timm_convnn.layers import ConvNNBranchAttention
    vit_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(TypeError):
        timm.models.VisionTransformer(**vit_args, attn_layer=functools.partial(ConvNNAttention, num_neighbors=3))
    layer = ConvNNAttention.with_options(num_neighbors=3, candidates='random', num_samples=8, num_prefix_tokens=1)
    assert issubclass(layer, ConvNNAttention) and layer.__name__ == 'ConvNNAttention'
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(**vit_args, attn_layer=layer).eval()
    attn = model.blocks[1].attn
    assert (attn.num_neighbors, attn.candidates, attn.num_samples, attn.num_prefix_tokens) == (3, 'random', 8, 1)
    assert (attn.num_heads, attn.dim) == (2, 32)  # the model's own arguments
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        torch.save(model, tmp_path / 'model.pt')  # whole-model pickling (torch.save / load)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                      torch.load(tmp_path / 'model.pt', weights_only=False)):
            assert type(other.blocks[1].attn).__doc__ == type(attn).__doc__
            assert other.blocks[1].attn.num_samples == 8 and torch.equal(other(x), y)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), y)
    assert timm.models.get_graph_node_names(model)[1].count('blocks.1.attn') == 1  # an FX leaf like the layer
    branch = ConvNNBranchAttention.with_options(branch_ratio=0.25, num_neighbors=4)(64, num_heads=2)
    assert (branch.branch_ratio, branch.num_neighbors, branch.convnn_head_channels) == (0.25, 4, 8)
    with pytest.raises(TypeError, match=r'takes the ConvNN arguments num_neighbors, .*; got num_heads'):
        ConvNNAttention.with_options(num_heads=4)  # the model's to set
    with pytest.raises(TypeError, match='got candidate '):
        ConvNNAttention.with_options(candidate='all')
    with pytest.raises(TypeError, match='got branch_ratio'):
        ConvNNAttention.with_options(branch_ratio=0.5)  # the branch layer's
    with pytest.raises(ValueError, match=r'num_neighbors \(K\) must be >= 1; got 0'):
        ConvNNAttention.with_options(num_neighbors=0)  # values are checked where they are given
    with pytest.raises(ValueError, match='branch_ratio'):
        ConvNNBranchAttention.with_options(branch_ratio=2.)
    with pytest.raises(TypeError, match='set grid_size already'):
        ConvNNAttention.with_options(grid_size=(4, 4))(32, num_heads=2, grid_size=(2, 2))


@pytest.mark.parametrize('candidates', ['all', 'random'])
def test_torch_compile_fullgraph(candidates):
    # the PyTorch path traces as one graph (custom autograd Functions included): no graph breaks
    torch.manual_seed(0)
    layer = ConvNNAttention(64, num_heads=2, num_neighbors=5, candidates=candidates, num_samples=16).eval()
    x = torch.randn(2, 50, 64, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    (gx,) = torch.autograd.grad(y.sum(), x)
    (rx,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(gx, rx)


def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_fixed_candidate_lists_are_made_once(monkeypatch):
    # the spatial grid and the eval draw of random candidates are the same at every call: made once per key (a dozen
    # small ops per layer otherwise); training draws afresh
    from timm_convnn.layers import attention, conv2d
    x = torch.randn(2, 65, 32)
    drawn = _counting(monkeypatch, attention, 'random_candidates')
    m = ConvNNAttention(32, 4, num_neighbors=3, candidates='random', num_samples=8, num_prefix_tokens=1).eval()
    with torch.no_grad():
        y = [m(x) for _ in range(3)]
    assert len(drawn) == 1 and torch.equal(y[0], y[2])
    assert torch.equal(m._candidate_ids(65, x.device), m._make_candidate_ids(65, x.device)) and len(drawn) == 2
    m.train()
    m(x), m(x)
    assert len(drawn) == 4
    m.eval()
    before = m._candidate_ids(65, x.device)
    m.sample_seed = 5  # every setting the list depends on is part of the key
    assert not torch.equal(m._candidate_ids(65, x.device), before) and len(drawn) == 5
    gridded = _counting(monkeypatch, attention, 'grid_candidates')
    s = ConvNNAttention(32, 4, num_neighbors=3, candidates='spatial', num_samples=16, num_prefix_tokens=1,
                        grid_size=(6, 8))  # (64 patches: a square map)
    for training in (True, False, True):
        s.train(training)(x)
    assert len(gridded) == 1
    s.num_samples = 9
    assert s._candidate_ids(65, x.device).shape == (1 + 9,) and len(gridded) == 2
    assert s._candidate_ids(1 + 48, x.device).shape == (1 + 9,) and len(gridded) == 3  # another map (6 x 8)

    c = ConvNN2d(8, 8, candidates='random', num_samples=20, padding=1).eval()
    conv_drawn = _counting(monkeypatch, conv2d, 'random_candidates')
    img = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        assert torch.equal(c(img), c(img)) and len(conv_drawn) == 1
        c(torch.randn(1, 8, 7, 9))
    assert len(conv_drawn) == 2


def test_cached_candidates_made_under_inference_mode_serve_training():
    # a list made under torch.inference_mode is an inference tensor, which autograd may not save (the fused op keeps
    # the list for its backward): the inference mode is part of the key, so later calls get a list of their own
    layer = ConvNNAttention(32, 4, num_neighbors=3, candidates='spatial', num_samples=16, num_prefix_tokens=1)
    x = torch.randn(2, 65, 32)
    with torch.inference_mode():
        expect = layer(x)
        assert layer._candidate_ids(65, x.device).is_inference()
    ids = layer._candidate_ids(65, x.device)
    assert not ids.is_inference() and ids.tolist() == layer._make_candidate_ids(65, x.device).tolist()
    y = layer(x.requires_grad_())
    y.sum().backward()
    assert torch.equal(y.detach(), expect) and x.grad is not None


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
@pytest.mark.filterwarnings('ignore:`torch.jit.trace:FutureWarning')
def test_candidate_lists_are_not_cached_while_tracing(monkeypatch):
    # a trace (torch.jit.trace, what timm's TorchScript ONNX path records) keeps the ops that make the list, not a
    # constant from an earlier call; eager calls after it still reuse theirs
    from timm_convnn.layers import attention
    layer = ConvNNAttention(32, 4, num_neighbors=3, candidates='random', num_samples=8, num_prefix_tokens=1).eval()
    x = torch.randn(2, 65, 32)
    drawn = _counting(monkeypatch, attention, 'random_candidates')
    with torch.no_grad():
        expect = layer(x)
        traced = torch.jit.trace(layer, x, check_trace=False)
    assert len(drawn) == 2 and 'aten::sort' in str(traced.graph)
    torch.testing.assert_close(traced(x), expect)
    layer(x)
    assert len(drawn) == 2


def test_listed_selection_keeps_min_k_r_distinct_ids():
    # K > r listed candidates: K is clamped to r (never r + 1, which took the masked duplicate of a listed query, i.e.
    # the query token twice), and the ids are the top of the dense scores masked to the list plus the query itself
    B, G, N, D, K = 2, 2, 12, 4, 7
    qs, ks = torch.randn(B, G, N, D, dtype=torch.float64), torch.randn(B, G, N, D, dtype=torch.float64)
    cand = torch.tensor([1, 4, 6, 9])  # queries 1, 4, 6, 9 are listed (r candidates), the others have r + 1
    idx = FN.select_neighbors(qs, ks, K, cand, torch.arange(N))
    assert idx.shape == (B, G, N, cand.numel())
    srt = idx.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all(), 'a token was selected twice'
    allowed = torch.zeros(N, N, dtype=torch.bool)
    allowed[:, cand] = True
    allowed[torch.arange(N), torch.arange(N)] = True
    dense = (qs @ ks.transpose(-1, -2)).masked_fill(~allowed, float('-inf'))
    assert torch.equal(idx, dense.topk(cand.numel(), dim=-1).indices)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_softmax_weights_are_fp32_for_half_scores(dtype):
    s = (torch.randn(2, 3, 5, 9) * 4).to(dtype)
    rho = FN.softmax_weights(s)
    assert rho.dtype == torch.float32
    torch.testing.assert_close(rho, torch.softmax(s.float(), -1), atol=0, rtol=0)


def test_standard_aggregation_keeps_fp64_under_autocast():
    # autocast leaves fp64 alone (as for a matmul): the standard aggregation of fp64 values stays fp64, unrounded
    B, G, N, M, C, K = 2, 2, 7, 9, 3, 4
    v = torch.randn(B, G, M, C, dtype=torch.float64)
    rho = torch.rand(B, G, N, K, dtype=torch.float64)
    w = torch.randn(G, 5, C, K, dtype=torch.float64)
    idx = _rand_idx(B, G, N, M, K)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = FN.neighbor_aggregate(v, idx, rho, w, False)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, FN.neighbor_aggregate(v, idx, rho, w, False), atol=1e-12, rtol=0)


@pytest.mark.parametrize('height,width', [(3, 5), (5, 3)])
def test_coordinate_grid_definition(height, width):
    # raster order, (x, y) columns, both axes centred and sharing the spacing 2 / (max(h, w) - 1): +-1 along the
    # longer axis
    grid = FN.coordinate_grid(height, width, torch.device('cpu'), torch.float64)
    step = 2. / (max(height, width) - 1)
    ref = torch.tensor([[(c - (width - 1) / 2) * step, (r - (height - 1) / 2) * step]
                        for r in range(height) for c in range(width)], dtype=torch.float64)
    torch.testing.assert_close(grid, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(grid.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    longer = 0 if width > height else 1
    assert grid[:, longer].min() == -1 and grid[:, longer].max() == 1


@pytest.mark.parametrize('scale', [0.5, 4.0])
def test_conv_coords_are_the_scaled_grid_of_the_padded_map(scale):
    # ConvNN2d(coords='append', coord_scale=s) by definition: the pixels' channels and s * coordinate_grid of the
    # zero-padded map, euclidean K nearest in rank order, standard Conv1d taps (a scale that is ignored changes which
    # pixels are nearest)
    torch.manual_seed(0)
    B, C, H, W, K, p = 2, 3, 5, 6, 5, 1
    m = ConvNN2d(C, 4, num_neighbors=K, padding=p, coords='append', coord_scale=scale, similarity='euclidean',
                 weighting='ones', aggregation='standard').double().eval()
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    hp, wp = H + 2 * p, W + 2 * p
    tokens = torch.nn.functional.pad(x, (p, p, p, p)).flatten(2).transpose(1, 2)  # (B, hp * wp, C)
    coord = FN.coordinate_grid(hp, wp, x.device, x.dtype) * scale
    feat = torch.cat([tokens, coord.expand(B, -1, -1)], dim=-1)
    queries = torch.tensor([(r + p) * wp + c + p for r in range(H) for c in range(W)])
    dist = torch.cdist(feat[:, queries], feat)  # (B, H * W, hp * wp)
    idx = (-dist).topk(K, dim=-1).indices  # best first
    weight = m.aggregate.weight.view(4, C, K)
    ref = torch.einsum('ock,bqkc->bqo', weight, tokens[torch.arange(B)[:, None, None], idx]) + m.aggregate.bias
    torch.testing.assert_close(m(x), ref.transpose(1, 2).reshape(B, 4, H, W), atol=1e-10, rtol=0)


def test_attention_token_coords_are_scaled_raster_grid_after_prefix():
    # coords='append': prefix tokens at the centre (0, 0), patch tokens at coord_scale * their (x, y) on the
    # (rows, cols) grid, in raster order
    m = ConvNNAttention(16, 2, coords='append', coord_scale=0.7, num_prefix_tokens=1, grid_size=(2, 6))
    coords = m._token_coords(1 + 12, torch.device('cpu'), torch.float64)
    step = 2. / 5
    ref = [[0., 0.]] + [[0.7 * (c - 2.5) * step, 0.7 * (r - 0.5) * step] for r in range(2) for c in range(6)]
    torch.testing.assert_close(coords, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)


def test_attention_append_coords_matches_dense_oracle():
    # coords='append', dot similarity, K < n: scores <[q, s c], [k, s c]> / sqrt(d + 2) (coordinates appended to
    # both queries and keys), top-K per query, softmax over the kept, depthwise aggregation in rank order
    dim, heads, K, s = 16, 2, 5, 1.5
    hd = dim // heads
    m = ConvNNAttention(dim, heads, num_neighbors=K, coords='append', coord_scale=s, num_prefix_tokens=1,
                        grid_size=(3, 4), qkv_bias=True).double().eval()
    with torch.no_grad():
        m.aggregate.weight.copy_(torch.rand_like(m.aggregate.weight) + 0.5)  # the slot order matters
    B, n = 2, 1 + 12
    x = torch.randn(B, n, dim, dtype=torch.float64)
    q, k, v = m.qkv(x).reshape(B, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    c = torch.zeros(n, 2, dtype=torch.float64)
    c[1:] = torch.tensor([[(col - 1.5) * 2 / 3, (row - 1) * 2 / 3] for row in range(3) for col in range(4)]) * s
    c = c.expand(B, heads, n, 2)
    scores = torch.cat([q, c], -1) @ torch.cat([k, c], -1).transpose(-1, -2) * (hd + 2) ** -0.5
    top = scores.topk(K, dim=-1)
    rho = top.values.softmax(-1)  # (B, H, n, K)
    bi, hi = torch.arange(B)[:, None, None, None], torch.arange(heads)[None, :, None, None]
    nb = v[bi, hi, top.indices]  # (B, H, n, K, hd)
    w = m.aggregate.weight.view(heads, hd, K).transpose(1, 2)  # (H, K, hd)
    out = (nb * rho[..., None] * w[None, :, None]).sum(-2)
    ref = m.proj(out.transpose(1, 2).reshape(B, n, dim))
    torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=0)


def test_position_order_with_softmax_and_unit_weights_equals_rank_order():
    # with unit depthwise weights the slots' order cannot matter: sorting the ids into position order must move their
    # scores (softmax weights) with them
    attn = ConvNNAttention(16, 2, num_neighbors=5, neighbor_order='position').double().eval()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    y = attn(x)
    attn.neighbor_order = 'rank'
    torch.testing.assert_close(y, attn(x), atol=1e-12, rtol=0)
    conv = ConvNN2d(6, 6, num_neighbors=5, padding=1, aggregation='depthwise', weighting='softmax',
                    neighbor_order='position').double().eval()
    with torch.no_grad():
        conv.aggregate.weight.fill_(1.)
    img = torch.randn(2, 6, 6, 7, dtype=torch.float64)
    y = conv(img)
    conv.neighbor_order = 'rank'
    torch.testing.assert_close(y, conv(img), atol=1e-12, rtol=0)


def test_default_aggregation_init_is_conv1d_init():
    # init='default' is nn.Conv1d(in, out, K)'s: weights and bias uniform in +-1 / sqrt(fan_in), fan_in = in * K
    from timm_convnn.layers.common import NeighborAggregation
    agg = NeighborAggregation(4, 512, 3, depthwise=False, bias=True, init='default')
    bound = (4 * 3) ** -0.5
    for p in (agg.weight, agg.bias):
        assert 0.5 * bound < p.abs().max() <= bound  # (512 values: all below half the bound with chance 2 ** -512)
    assert agg.weight.shape == nn.Conv1d(4, 512, 3).weight.shape


def test_biased_standard_convnn2d_under_autocast_gives_autocast_dtype():
    # as nn.Conv2d: under CPU bf16 autocast a (biased) standard ConvNN2d outputs bf16 whatever its fp32 bias
    conv = ConvNN2d(4, 6, padding=1)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = conv(x)
        assert nn.Conv2d(4, 6, 3, padding=1)(x).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), conv(x), atol=0.1, rtol=0.05)


def test_candidate_cache_holds_at_most_max_entries():
    from timm_convnn.layers.common import CandidateCache
    cache = CandidateCache()
    for i in range(CandidateCache.max_entries + 5):
        assert cache.get((i,), lambda: torch.tensor([i])).tolist() == [i]
        assert len(cache.lists) <= CandidateCache.max_entries


def test_convnn2d_candidate_cache_follows_padding(monkeypatch):
    # padding is part of the cache key (the ids index the padded raster): a changed padding gets its own list
    from timm_convnn.layers import conv2d
    c = ConvNN2d(8, 8, candidates='random', num_samples=20, padding=1).eval()
    img = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        c(img)
    before = c._candidate_ids(9, 9, img.device)
    drawn = _counting(monkeypatch, conv2d, 'random_candidates')
    c.padding = 0
    ids = c._candidate_ids(9, 9, img.device)
    assert len(drawn) == 1 and not torch.equal(ids, before)
    assert torch.equal(ids, c._make_candidate_ids(9, 9, img.device))
