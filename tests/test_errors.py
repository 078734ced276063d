"""Bad input gets a clear error that names the argument and the valid range."""
import pytest
import torch
import torch.nn as nn

from timm_convnn import ConvNN2d, ConvNNAttention, ConvNNBranch2d, conv2d_weight_to_convnn
from timm_convnn.layers import ConvNNBranchAttention
from timm_convnn.layers.common import NeighborAggregation


@pytest.mark.parametrize('kwargs,exc,words', [
    (dict(num_neighbors=0), ValueError, ['num_neighbors', '>= 1', '0']),
    (dict(num_neighbors=-3), ValueError, ['num_neighbors', '>= 1']),
    (dict(num_neighbors=2.5), TypeError, ['num_neighbors', 'int']),
    (dict(num_neighbors='9'), TypeError, ['num_neighbors', 'int']),
    (dict(candidates='random', num_samples=8, num_neighbors=9), ValueError, ['num_samples', 'r=8', 'K=9']),
    (dict(candidates='spatial', num_samples=4, num_neighbors=16), ValueError, ['num_samples', 'r=4', 'K=16']),
    (dict(candidates='nearest'), ValueError, ['candidates', "'all'", "'random'", "'spatial'", 'nearest']),
    (dict(similarity='l1'), ValueError, ['similarity', "'cosine'", "'dot'", "'euclidean'", 'l1']),
    (dict(weighting='sigmoid'), ValueError, ['weighting', "'softmax'", "'ones'"]),
    (dict(aggregation='separable'), ValueError, ['aggregation', "'depthwise'", "'standard'"]),
    (dict(coords='xy'), ValueError, ['coords', "'none'", "'append'", "'only'"]),
    (dict(neighbor_order='random'), ValueError, ['neighbor_order', "'rank'", "'position'"]),
])
@pytest.mark.parametrize('cls', [ConvNNAttention, ConvNN2d])
def test_bad_options(cls, kwargs, exc, words):
    args = (32, 8) if cls is ConvNNAttention else (8, 8)
    with pytest.raises(exc) as info:
        cls(*args, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize('heads', [5, 0, 7])
def test_heads_must_divide_dim(heads):
    with pytest.raises(ValueError, match=f'num_heads must be a positive divisor of dim=32; got num_heads={heads}'):
        ConvNNAttention(32, num_heads=heads)


@pytest.mark.parametrize('kwargs', [{}, {'attn_head_dim': 8}])
def test_heads_must_be_an_int(kwargs):
    # a bool (an int to isinstance) was refused as 'groups must be an int', an internal argument's name
    for heads in (True, 2.0):
        with pytest.raises(TypeError, match=f'num_heads must be an int.*; got {type(heads).__name__} {heads}'):
            ConvNNAttention(32, num_heads=heads, **kwargs)


def test_attention_bad_inputs():
    m = ConvNNAttention(32, 4)
    with pytest.raises(ValueError, match=r'expects \(B, N, C\) input, got a 4-D tensor'):
        m(torch.randn(2, 3, 4, 32))
    with pytest.raises(ValueError, match=r'expects \(B, N, C\) input, got a 2-D tensor'):
        m(torch.randn(3, 32))
    with pytest.raises(ValueError, match='expects 32 input channels, got 16'):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match='attn_mask and is_causal are not supported'):
        m(torch.randn(2, 5, 32), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match='norm_layer must be provided'):
        ConvNNAttention(32, 4, qk_norm=True)


def test_conv_bad_inputs():
    m = ConvNN2d(8, 4)
    with pytest.raises(ValueError, match=r'expects \(B, C, H, W\) input, got a 3-D tensor'):
        m(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match='expects 8 input channels, got 3'):
        m(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match='expects a map of at least 1 x 1, got 0 x 5'):
        ConvNN2d(8, 4, padding=0)(torch.randn(1, 8, 0, 5))
    with pytest.raises(ValueError, match='stride must be >= 1; got 0'):
        ConvNN2d(8, 4, stride=0)
    with pytest.raises(ValueError, match='padding must be >= 0; got -1'):
        ConvNN2d(8, 4, padding=-1)
    with pytest.raises(ValueError, match='depthwise aggregation needs out_channels == in_channels'):
        ConvNN2d(8, 4, aggregation='depthwise')
    with pytest.raises(ValueError, match=r'supports square kernels 1, 3 or 5; got kernel_size=\(7, 7\)'):
        ConvNN2d.from_conv2d(nn.Conv2d(3, 3, 7, padding=3))
    with pytest.raises(ValueError, match='needs padding=1'):
        ConvNN2d.from_conv2d(nn.Conv2d(3, 3, 3, padding=0))
    with pytest.raises(TypeError, match='from_conv2d takes an nn.Conv2d; got Linear'):
        ConvNN2d.from_conv2d(nn.Linear(3, 3))
    with pytest.raises(ValueError, match='run a forward through the LazyConv2d first'):
        ConvNN2d.from_conv2d(nn.LazyConv2d(3, 3, padding=1))
    with pytest.raises(ValueError, match="needs padding=1.*got padding='valid'"):
        ConvNN2d.from_conv2d(nn.Conv2d(3, 3, 3, padding='valid'))
    from timm.layers import StdConv2d
    with pytest.raises(TypeError, match='StdConv2d computes another'):
        ConvNN2d.from_conv2d(StdConv2d(3, 3, 3, padding=1))
    for mode in ('reflect', 'replicate', 'circular'):  # (ConvNN's border is zero pixels: it would compute another conv)
        with pytest.raises(ValueError, match=f"needs padding_mode='zeros'; got padding_mode='{mode}'"):
            ConvNN2d.from_conv2d(nn.Conv2d(3, 3, 3, padding=1, padding_mode=mode))


@pytest.mark.parametrize('ratio,exc', [(-0.1, ValueError), (1.5, ValueError), ('half', TypeError),
                                       (None, TypeError), (True, TypeError)])
def test_branch_ratio_range(ratio, exc):
    with pytest.raises(exc, match=r'branch_ratio \(lambda\) must be'):
        ConvNNBranch2d(8, 8, branch_ratio=ratio)


def test_layer_arguments_are_checked_where_given():
    # bad layout / scale arguments fail at construction with their name and range, not deep inside a forward
    cases = [
        (lambda: ConvNNAttention(64, 4, coords='append', coord_scale='x'), TypeError, "coord_scale must be a finite"),
        (lambda: ConvNN2d(8, 8, coord_scale=float('nan')), ValueError, 'coord_scale must be a finite real number'),
        (lambda: ConvNNAttention(64, 4, grid_size=5), TypeError, r'grid_size must be None or \(rows, cols\)'),
        (lambda: ConvNNAttention(64, 4, grid_size=(2, 0)), ValueError, r'two positive ints; got \(2, 0\)'),
        (lambda: ConvNNAttention(64, 4, candidates='spatial', num_samples=16, num_prefix_tokens=-1), ValueError,
         'num_prefix_tokens must be >= 0; got -1'),
        (lambda: ConvNNAttention(64, 4, attn_head_dim=0), ValueError, 'attn_head_dim must be >= 1; got 0'),
        (lambda: ConvNNAttention(8, num_heads=0, attn_head_dim=4), ValueError, 'num_heads must be >= 1; got 0'),
        (lambda: NeighborAggregation(4, 4, 3, groups=0), ValueError, 'groups must be >= 1; got 0'),
        (lambda: ConvNNAttention(64, 4, sample_seed=1.5), TypeError, 'sample_seed must be an int; got float 1.5'),
        (lambda: ConvNN2d(8, 8, sample_seed='3'), TypeError, "sample_seed must be an int; got str '3'"),
        # the branch layer checks the ConvNN options also when it builds no ConvNN path (lambda 0, or rounding to 0)
        (lambda: ConvNNBranch2d(8, 16, branch_ratio=0, num_neighbors=0), ValueError, r'num_neighbors \(K\)'),
        (lambda: ConvNNBranch2d(8, 16, branch_ratio=0.01, candidates='foo'), ValueError, "got 'foo'"),
        (lambda: ConvNNBranch2d('8', 16, branch_ratio=0), TypeError, "in_channels must be an int >= 1; got str '8'"),
        # (sample_seed too: it was not checked when no ConvNN path is built)
        (lambda: ConvNNBranch2d(8, 16, branch_ratio=0, sample_seed='3'), TypeError, "sample_seed must be an int"),
        (lambda: ConvNNBranch2d(8, 16, branch_ratio=0.01, sample_seed=1.5), TypeError, "sample_seed must be an int"),
        (lambda: ConvNNBranch2d(8, 8, aggregation='depthwise'), ValueError,
         r"depthwise' needs the ConvNN branch's output channels, round\(branch_ratio \* out_channels\) = 4, to equal "
         'in_channels=8'),
    ]
    for build, exc, words in cases:
        with pytest.raises(exc, match=words):
            build()
    assert ConvNNBranch2d(8, 16, aggregation='depthwise', num_neighbors=3).convnn_channels == 8


@pytest.mark.parametrize('build, shape', [
    (lambda: ConvNNAttention(32, 4, num_neighbors=3), (0, 10, 32)),
    (lambda: ConvNNAttention(32, 4, num_neighbors=3), (2, 0, 32)),
    (lambda: ConvNNAttention(32, 4, num_neighbors=3, aggregation='standard'), (2, 0, 32)),
    (lambda: ConvNNAttention(32, 4, num_neighbors=3, weighting='ones', aggregation='standard'), (2, 0, 32)),
    (lambda: ConvNNAttention(32, 4, num_neighbors=3, candidates='random', num_samples=4), (0, 10, 32)),
    (lambda: ConvNNAttention(32, 4, num_neighbors=3, candidates='spatial', num_samples=4), (0, 16, 32)),
    (lambda: ConvNN2d(8, 16), (0, 8, 5, 5)),
    (lambda: ConvNN2d(8, 8, aggregation='depthwise', weighting='softmax', stride=2), (0, 8, 5, 5)),
    (lambda: ConvNN2d(8, 16, candidates='random', num_samples=9), (0, 8, 5, 5)),
    (lambda: ConvNNBranch2d(8, 16), (0, 8, 5, 5)),
])
def test_empty_inputs_give_empty_outputs(build, shape):
    # as timm's Attention and nn.Conv2d: an empty batch (or token set) gives an empty result of the right shape, and
    # a backward through it (zero gradients), in training and in eval
    layer = build()
    reference = nn.Conv2d(8, layer.out_channels, 3, stride=getattr(layer, 'stride', 1), padding=1) \
        if len(shape) == 4 else nn.Identity()
    for train in (True, False):
        x = torch.randn(*shape, requires_grad=True)
        y = layer.train(train)(x)
        assert y.shape == reference(x).shape and y.numel() == 0
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
    # and scripted (TorchScript runs the eager aggregation and score loops, which had no slot to start from at K 0)
    assert torch.jit.script(layer.eval())(torch.randn(*shape)).shape == y.shape


def test_branch_even_kernel_rejected():
    with pytest.raises(ValueError, match='kernel_size must be odd'):
        ConvNNBranch2d(8, 8, kernel_size=2)


def test_plain_fx_tracing_says_what_to_use_instead():
    # torch.fx.symbolic_trace cannot trace through the data-dependent selection: a TypeError naming timm's FX helpers
    # (which keep the layers as leaves), where it had been "attn_mask ... not supported" (timm's ViT hands its
    # attn_mask input on, a proxy) or a TraceError on the input-rank check
    import timm
    import timm_convnn  # noqa: F401
    for module in (ConvNNAttention(32, 4), ConvNN2d(8, 8), ConvNNBranch2d(8, 8),
                   timm.create_model('vit_tiny_convnn_all', img_size=32, patch_size=8, depth=1)):
        with pytest.raises(TypeError, match=r'cannot be traced through by torch.fx.symbolic_trace .*get_graph_node'):
            torch.fx.symbolic_trace(module)
    names = timm.models.get_graph_node_names(timm.create_model('resnet18_convnn'))[1]
    assert 'layer1.0.conv1' in names  # a leaf there


@pytest.mark.parametrize('ratio', [0, -0.1, 1.5])
def test_branch_attention_ratio_range(ratio):
    with pytest.raises(ValueError, match=r'branch_ratio \(lambda\) must be in \(0, 1\]'):
        ConvNNBranchAttention(32, 2, branch_ratio=ratio)


@pytest.mark.parametrize('name', ['num_neighbors', 'sample_seed'])
def test_bools_are_not_ints(name):
    # bool is an int subclass: True would be taken as K = 1 / seed 1
    with pytest.raises(TypeError, match=f'{name}.* must be an int.*; got bool True'):
        ConvNNAttention(32, 4, **{name: True})


def test_aggregation_channels_must_divide_by_groups():
    with pytest.raises(ValueError, match=r'out_channels \(6\) must be divisible by groups \(4\)'):
        NeighborAggregation(4, 6, 3, groups=4, depthwise=False, init='default')


@pytest.mark.parametrize('depthwise', [True, False])
def test_aggregation_module_checks_its_input_shapes(depthwise):
    # the exported module: shapes that do not fit it fail naming them (the layers' own calls pass; the id values
    # are the layers' selections', not read back at every call)
    agg = NeighborAggregation(8, 8, 4, groups=2, depthwise=depthwise)
    v, idx = torch.randn(2, 2, 5, 4), torch.randint(0, 5, (2, 2, 3, 4))
    assert agg(v, idx, None).shape == (2, 2, 3, 4)
    assert agg(v, idx[..., :2], torch.rand(2, 2, 3, 2)).shape == (2, 2, 3, 4)  # K' < K (clamped K)
    want = r"takes v \(B, 2, M, 4\), idx \(B, 2, N, K'\) with K' <= 4"
    for args in [(torch.randn(2, 2, 5, 8), idx, None),  # channels of the whole layer, not per group
                 (torch.randn(2, 1, 5, 8), idx[:, :1], None),  # one group for a 2-group module
                 (v, torch.randint(0, 5, (2, 2, 3, 5)), None),  # more slots than K
                 (v[0], idx, None), (v, idx[1:], None),
                 (v, idx, torch.rand(2, 2, 3, 3))]:
        with pytest.raises(ValueError, match=want):
            agg(*args)
    with pytest.raises(TypeError, match='idx must be integer token ids; got torch.float32'):
        agg(v, idx.float(), None)
    with pytest.raises(ValueError, match=r'num_neighbors \(K\) must be >= 1; got 0'):
        NeighborAggregation(4, 4, 0)


def test_conv_conversions_refuse_what_they_cannot_map():
    with pytest.raises(ValueError, match=r'from_conv2d needs equal strides; got stride=\(1, 2\)'):
        ConvNN2d.from_conv2d(nn.Conv2d(3, 3, 3, padding=1, stride=(1, 2)))
    with pytest.raises(ValueError, match=r'expected a square \(out, in, k, k\) Conv2d weight, got shape \(4, 3, 3, 5'):
        conv2d_weight_to_convnn(torch.randn(4, 3, 3, 5))


def test_conv_zero_width_map():
    with pytest.raises(ValueError, match='expects a map of at least 1 x 1, got 5 x 0'):
        ConvNN2d(8, 4)(torch.randn(1, 8, 5, 0))


def test_functional_api_checks_shapes_and_token_ids():
    # the exported functionals flatten (B, G, M) into one table: an id of M or more read another sample's or head's
    # row, ids shaped for other features were broadcast into the wrong slices; both are refused now
    from timm_convnn.layers import gather_dot, neighbor_aggregate, select_neighbors
    g = torch.Generator().manual_seed(0)
    B, G, N, M, D = 2, 2, 5, 7, 4
    q, k, v = torch.randn(B, G, N, D, generator=g), torch.randn(B, G, M, D, generator=g), torch.randn(B, G, M, D)
    idx = torch.randint(0, M, (B, G, N, 3), generator=g)
    assert gather_dot(q, k, idx).shape == (B, G, N, 3)  # (valid ids pass)
    assert neighbor_aggregate(v, idx, None, torch.ones(G, D, 3), True).shape == (B, G, N, D)
    for bad, lo, hi in ((M, 0, M), (-1, -1, M - 1)):
        ids = idx.clone()
        ids[1, 0, 2, 1] = bad
        ids[0, 0, 0, 0], ids[0, 0, 0, 1] = 0, M - 1
        with pytest.raises(ValueError, match=rf'gather_dot: idx must lie in \[0, 6\] \(the 7 tokens of k\); '
                                             rf'got ids from {lo} to {hi}'):
            gather_dot(q, k, ids)
        with pytest.raises(ValueError, match=rf'neighbor_aggregate: idx must lie in \[0, 6\] .*from {lo} to {hi}'):
            neighbor_aggregate(v, ids, None, torch.ones(G, D, 3), True)
    with pytest.raises(ValueError, match=r'gather_dot takes idx \(B, G, N, K\) with k \(B, G, M, C\), q '
                                         r'\(B, G, N, D\); got idx \(2, 1, 5, 3\), k \(2, 2, 7, 4\), q \(2, 2, 5, 4\)'):
        gather_dot(q, k, idx[:, :1])
    with pytest.raises(ValueError, match=r'scores shaped like idx'):
        gather_dot(q, k, idx, scores=torch.zeros(B, G, N, 2))
    with pytest.raises(TypeError, match='idx must be integer token ids; got torch.float32'):
        gather_dot(q, k, idx.float())
    with pytest.raises(ValueError, match=r'rho shaped like idx; got idx \(2, 2, 5, 3\), v \(2, 2, 7, 4\), '
                                         r'rho \(2, 2, 5, 2\)'):
        neighbor_aggregate(v, idx, torch.ones(B, G, N, 2), torch.ones(G, D, 3), True)
    with pytest.raises(ValueError, match=r'depthwise \(G, C, K\) weights .*; got \(2, 4, 2\)'):
        neighbor_aggregate(v, idx, None, torch.ones(G, D, 2), True)
    with pytest.raises(ValueError, match=r'standard \(G, Cout, C, K\) weights .*; got \(2, 6, 3, 3\)'):
        neighbor_aggregate(v, idx, None, torch.ones(G, 6, 3, 3), False)
    for K, exc in ((0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(exc, match=r'num_neighbors \(K\) must be'):
            select_neighbors(q, k, K)
    with pytest.raises(ValueError, match=r'candidates must lie in \[0, 6\] \(the 7 tokens of ks\); got ids from 0 '
                                         r'to 20'):
        select_neighbors(q, k, 3, torch.tensor([0, 1, 20]), torch.arange(N))
    with pytest.raises(ValueError, match=r'query_index must be \(5,\), one per query; got \(4,\)'):
        select_neighbors(q, k, 3, torch.tensor([0, 1, 2]), torch.arange(4))
    with pytest.raises(ValueError, match=r'takes qs \(B, G, N, D\) and ks \(B, G, M, D\); got \(2, 2, 5, 4\) and '
                                         r'\(2, 2, 7, 3\)'):
        select_neighbors(q, k[..., :3], 3)
    # a candidate listed twice: two slots on the PyTorch path, one in the fused kernel (a device-dependent answer)
    for listed, count, first in (([4, 1, 4, 2], 1, 4), ([3, 6, 3, 6, 3], 3, 3), ([5, 5], 1, 5)):
        with pytest.raises(ValueError, match=rf'candidates must list each token once; got {count} repeated ids '
                                             rf'\(e.g. {first}\)'):
            select_neighbors(q, k, 2, torch.tensor(listed), torch.arange(N))
    assert select_neighbors(q, k, 2, torch.tensor([6, 0, 3]), torch.arange(N)).shape == (B, G, N, 2)


def test_conv_input_must_match_the_layer_dtype_and_device():
    # as nn.Conv2d: the aggregation cast its weights to the input's dtype (integer input gave integer zeros) and a
    # meta input on a CPU layer gave a CPU tensor of the bias
    layer = ConvNN2d(3, 4, padding=1).eval()
    with pytest.raises(TypeError, match='ConvNN2d expects floating-point input; got torch.int64'):
        layer(torch.randint(0, 5, (1, 3, 6, 6)))
    with pytest.raises(TypeError, match='input torch.float64 and weights torch.float32 should be the same dtype'):
        layer(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match='input on meta, weights on cpu'):
        layer(torch.randn(1, 3, 6, 6, device='meta'))
    x = torch.randn(1, 3, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast decides the dtypes: accepted
        assert layer(x.bfloat16()).shape == (1, 4, 6, 6)
    assert layer.double()(x.double()).dtype == torch.float64


def test_branch_stride_is_checked_without_a_convnn_path():
    for ratio in (0.0, 0.5):
        with pytest.raises(ValueError, match='stride must be >= 1; got 0'):
            ConvNNBranch2d(3, 4, stride=0, branch_ratio=ratio)
    with pytest.raises(TypeError, match='stride must be an int'):
        ConvNNBranch2d(3, 4, stride=1.5, branch_ratio=0.0)


@pytest.mark.parametrize('kwargs,exc,words', [
    (dict(dim=-4), ValueError, 'dim must be >= 1; got -4'),
    (dict(dim=0), ValueError, 'dim must be >= 1; got 0'),
    (dict(dim=64.0), TypeError, 'dim must be an int >= 1; got float 64.0'),
    (dict(dim=64, dim_out=-1), ValueError, 'dim_out must be >= 1; got -1'),
    (dict(dim=64, dim_out=0), ValueError, 'dim_out must be >= 1; got 0'),
])
def test_attention_width_is_checked(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        ConvNNAttention(num_heads=4, **kwargs)


def test_unknown_similarity_names_the_value():
    from timm_convnn.layers import similarity_features
    for bad in (None, 'l2'):
        with pytest.raises(ValueError, match=f'similarity must be one of dot, cosine, euclidean; got {bad}'):
            similarity_features(torch.randn(1, 2), torch.randn(1, 2), bad)


def test_bad_backend_names_where_it_came_from():
    import os
    import subprocess
    import sys
    from timm_convnn.layers import get_backend, set_backend
    for bad, exc in (('cuda', ValueError), (None, TypeError), (1, TypeError)):
        with pytest.raises(exc, match=r"one of auto, torch, triton; got .*(cuda|None|1)"):
            set_backend(bad)
    assert get_backend() in ('auto', 'torch', 'triton')  # (a refused name changes nothing)
    # a bad TIMM_CONVNN_BACKEND fails at the first forward: the message says the variable set it
    code = ('import torch, timm_convnn\n'
            'try:\n    timm_convnn.ConvNNAttention(32, 4)(torch.randn(1, 5, 32))\n'
            'except ValueError as e:\n    print(e)\n')
    env = dict(os.environ, TIMM_CONVNN_BACKEND='bogus')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert "got 'bogus' (from the TIMM_CONVNN_BACKEND environment variable)" in out.stdout, out.stdout + out.stderr


def test_layers_do_not_pay_for_the_functional_checks(monkeypatch):
    # the checks read ids back to the host (a synchronisation on CUDA): the layers make their own ids and call the
    # unchecked twins, forward and backward, on every path of the PyTorch implementation
    from timm_convnn.layers import functional

    def refuse(*args, **kwargs):
        raise AssertionError('a layer ran an argument check of the public functionals')

    for name in ('_check_ids', '_check_pairs', '_check_gather_dot', '_check_aggregation', '_check_selection'):
        monkeypatch.setattr(functional, name, refuse)
    layers = [(ConvNNAttention(32, 4, num_neighbors=5), (2, 10, 32)),
              (ConvNNAttention(32, 4, num_neighbors=3, candidates='random', num_samples=4, aggregation='standard'),
               (2, 10, 32)),
              (ConvNN2d(4, 6, candidates='spatial', num_samples=9, weighting='softmax'), (2, 4, 5, 5)),
              (ConvNNBranch2d(4, 8), (2, 4, 5, 5))]
    for layer, shape in layers:
        x = torch.randn(*shape, requires_grad=True)
        layer.train()(x).sum().backward()
        assert x.grad is not None
        layer.eval()(x)
