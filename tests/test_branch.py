"""The hybrid branching layer: channel split, single-path limits, geometry."""
import pytest
import torch
import torch.nn as nn

from timm_convnn import ConvNN2d, ConvNNBranch2d


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
