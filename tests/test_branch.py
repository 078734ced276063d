"""The hybrid branching layer: channel split, single-path limits, geometry."""
import pytest
import torch
import torch.nn as nn

from timm_convnn import ConvNN2d, ConvNNBranch2d
from timm_convnn.layers import ConvNNBranchAttention


def _names(m):
    return sorted(n for n, _ in m.named_parameters())


def test_lambda_zero_is_conv_plus_fuse():
    m = ConvNNBranch2d(6, 10, branch_ratio=0.).eval()
    assert m.convnn is None and m.conv_channels == 10
    assert _names(m) == ['conv.bias', 'conv.weight', 'fuse.bias', 'fuse.weight']
    conv, fuse = nn.Conv2d(6, 10, 3, padding=1), nn.Conv2d(10, 10, 1)
    conv.load_state_dict(m.conv.state_dict())
    fuse.load_state_dict(m.fuse.state_dict())
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(m(x), fuse(conv(x)), atol=0, rtol=0)


def test_lambda_one_is_convnn_plus_fuse():
    m = ConvNNBranch2d(6, 10, branch_ratio=1., similarity='cosine').eval()
    assert m.conv is None and m.convnn_channels == 10
    assert _names(m) == ['convnn.aggregate.bias', 'convnn.aggregate.weight', 'fuse.bias', 'fuse.weight']
    single = ConvNN2d(6, 10, num_neighbors=9, padding=1, similarity='cosine').eval()
    single.load_state_dict(m.convnn.state_dict())
    fuse = nn.Conv2d(10, 10, 1)
    fuse.load_state_dict(m.fuse.state_dict())
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(m(x), fuse(single(x)), atol=0, rtol=0)


@pytest.mark.parametrize('ratio,expect', [(0.5, (32, 32)), (0.125, (8, 56)), (0.25, (16, 48)), (0.3, (19, 45))])
def test_channel_split(ratio, expect):
    # round(lambda * out): 0.3 * 32 = 9.6 -> 10 (where floor would give 9)
    assert ConvNNBranch2d(16, 32, branch_ratio=0.3).convnn_channels == 10
    m = ConvNNBranch2d(16, 64, branch_ratio=ratio)
    assert (m.convnn_channels, m.conv_channels) == expect
    assert m.convnn.out_channels == expect[0] and m.conv.out_channels == expect[1]
    # concatenation is ConvNN-first: with an identity fuse, the first channels are the ConvNN branch's output
    with torch.no_grad():
        m.fuse.weight.copy_(torch.eye(64).view(64, 64, 1, 1))
        m.fuse.bias.zero_()
    m.eval()
    x = torch.randn(1, 16, 6, 6)
    y = m(x)
    assert y.shape == (1, 64, 6, 6)
    torch.testing.assert_close(y[:, :expect[0]], m.convnn(x))
    torch.testing.assert_close(y[:, expect[0]:], m.conv(x))


def test_parameter_budget_independent_of_lambda():
    # K = 9 slots == a 3x3 kernel: the split does not change the parameter count (paper §4.2.3)
    counts = {r: sum(p.numel() for p in ConvNNBranch2d(16, 32, branch_ratio=r).parameters())
              for r in (0., 0.25, 0.5, 1.)}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize('stride,hw', [(1, (9, 9)), (2, (9, 9)), (2, (8, 10)), (2, (1, 1))])
def test_strided_geometry_matches_conv(stride, hw):
    m = ConvNNBranch2d(4, 8, stride=stride)
    conv = nn.Conv2d(4, 8, 3, stride=stride, padding=1)
    x = torch.randn(1, 4, *hw)
    assert m(x).shape == conv(x).shape


def test_dilated_conv_path_keeps_same_geometry():
    # the conv path is padded by (k // 2) * dilation: same geometry as the ConvNN path, and the dilated conv itself
    m = ConvNNBranch2d(4, 8, dilation=2).eval()
    x = torch.randn(1, 4, 5, 5)
    assert m(x).shape == (1, 8, 5, 5)
    conv = nn.Conv2d(4, 4, 3, dilation=2, padding=2)
    conv.load_state_dict(m.conv.state_dict())
    torch.testing.assert_close(m.conv(x), conv(x), atol=0, rtol=0)


def test_branch_attention_channel_split_rounds():
    # round(lambda * head_dim) ConvNN channels per head (0.3 * 16 = 4.8 -> 5), the rest attention
    m = ConvNNBranchAttention(32, 2, branch_ratio=0.3)
    assert (m.convnn_head_channels, m.attn_head_channels) == (5, 11)
    assert m.aggregate.weight.shape[0] == 2 * 5


def test_branch_attention_is_deterministic_in_eval():
    # attention dropout acts in training only, on both branches
    m = ConvNNBranchAttention(32, 2, branch_ratio=0.5, num_neighbors=4, attn_drop=0.5).eval()
    x = torch.randn(2, 10, 32)
    assert torch.equal(m(x), m(x))


def test_branch_attention_matches_definition():
    # per head: the first c channels of q, k, v mixed by top-K ConvNN (unit depthwise weights: masked softmax
    # attention at scale c ** -0.5), the other d - c by softmax attention (scale (d - c) ** -0.5); concatenated
    # ConvNN-first per head, heads merged as timm's Attention merges them, then proj
    dim, heads, n, K, B = 32, 2, 12, 4, 2
    hd = dim // heads
    m = ConvNNBranchAttention(dim, heads, branch_ratio=0.25, num_neighbors=K, qkv_bias=True).double().eval()
    c = m.convnn_head_channels
    assert c == 4
    x = torch.randn(B, n, dim, dtype=torch.float64)
    q, k, v = m.qkv(x).reshape(B, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    s = q[..., :c] @ k[..., :c].transpose(-1, -2) * c ** -0.5
    kth = s.topk(K, dim=-1).values[..., -1:]
    convnn = s.masked_fill(s < kth, float('-inf')).softmax(-1) @ v[..., :c]
    attn = (q[..., c:] @ k[..., c:].transpose(-1, -2) * (hd - c) ** -0.5).softmax(-1) @ v[..., c:]
    out = torch.cat([convnn, attn], -1).transpose(1, 2).reshape(B, n, dim)
    torch.testing.assert_close(m(x), m.proj(out), atol=1e-10, rtol=0)
