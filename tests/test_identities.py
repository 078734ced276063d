"""The definitions ConvNN generalizes: attention (K = n) and convolution (coordinate neighbours)."""
import pytest
import torch
import torch.nn as nn
from timm.layers import Attention

from timm_convnn import ConvNN2d, ConvNNAttention, conv2d_weight_to_convnn


def _attention_pair(dim, heads, aggregation='depthwise', **attn_kwargs):
    attn = Attention(dim, num_heads=heads, **attn_kwargs).eval()
    convnn = ConvNNAttention(
        dim, num_heads=heads, num_neighbors=100000, candidates='all', similarity='dot', weighting='softmax',
        aggregation=aggregation, **attn_kwargs).eval()
    result = convnn.load_state_dict(attn.state_dict(), strict=False)
    assert result.missing_keys == ['aggregate.weight'] and not result.unexpected_keys
    if aggregation == 'depthwise':
        assert torch.all(convnn.aggregate.weight == 1)
    return attn, convnn


@pytest.mark.parametrize('batch,tokens,dim,heads,aggregation', [
    (1, 1, 8, 1, 'depthwise'), (2, 17, 32, 1, 'depthwise'), (2, 50, 64, 4, 'depthwise'), (3, 197, 96, 3, 'depthwise'),
    (2, 64, 192, 12, 'depthwise'), (2, 17, 32, 2, 'standard'), (2, 50, 64, 4, 'standard'),
])
def test_attention_identity(batch, tokens, dim, heads, aggregation):
    # K >= n (clamped to n), dot similarity, softmax, unit depthwise weights: exactly timm's multi-head attention;
    # so is the standard (full Conv1d) aggregation at its unit init, identity channel maps in every slot
    attn, convnn = _attention_pair(dim, heads, aggregation, qkv_bias=True)
    for p in attn.parameters():  # non-trivial weights and biases, variance-preserving scale (outputs of order 1)
        nn.init.normal_(p, std=dim ** -0.5)
    convnn.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(batch, tokens, dim)
    torch.testing.assert_close(convnn(x), attn(x), atol=1e-5, rtol=0)


def test_attention_identity_with_qk_norm_scale_norm_and_gate():
    # every timm Attention parameter name maps 1:1 (qkv, q_norm, k_norm, norm, gate, proj)
    kw = dict(qkv_bias=True, qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm)
    attn, convnn = _attention_pair(48, 4, **kw)
    for p in attn.parameters():
        nn.init.normal_(p, mean=0.5, std=0.3)
    convnn.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(2, 30, 48)
    torch.testing.assert_close(convnn(x), attn(x), atol=1e-5, rtol=0)


def test_attention_identity_gradients():
    attn, convnn = _attention_pair(32, 4, qkv_bias=True)
    x = torch.randn(2, 20, 32)
    ya, yc = attn(x), convnn(x)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, list(attn.parameters()), g)
    gc = torch.autograd.grad(yc, [convnn.qkv.weight, convnn.qkv.bias, convnn.proj.weight, convnn.proj.bias], g)
    for a, c in zip(ga, gc):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)


def test_topk_attention_equals_masked_softmax_oracle():
    # K < n with unit weights is top-K (KVT) attention: dense scores, non-top-K masked to -inf, softmax, @ v
    dim, heads, n, K = 32, 2, 40, 7
    convnn = ConvNNAttention(dim, heads, num_neighbors=K, similarity='dot', qkv_bias=True).eval()
    x = torch.randn(2, n, dim, dtype=torch.float64)
    convnn = convnn.double()
    q, k, v = convnn.qkv(x).reshape(2, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5
    kth = s.topk(K, dim=-1).values[..., -1:]
    p = s.masked_fill(s < kth, float('-inf')).softmax(-1)
    ref = convnn.proj((p @ v).transpose(1, 2).reshape(2, n, dim))
    torch.testing.assert_close(convnn(x), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize('kernel,stride,hw', [(3, 1, (9, 11)), (3, 2, (9, 11)), (3, 2, (8, 8)), (1, 1, (5, 7)),
                                              (5, 1, (10, 7)), (3, 1, (1, 1)), (3, 1, (2, 2))])
def test_convolution_identity(kernel, stride, hw):
    conv = nn.Conv2d(5, 7, kernel, stride=stride, padding=kernel // 2).double()
    convnn = ConvNN2d.from_conv2d(conv)
    assert convnn.num_neighbors == kernel * kernel and convnn.coords == 'only' and convnn.similarity == 'euclidean'
    assert convnn.weighting == 'ones' and convnn.neighbor_order == 'position'
    x = torch.randn(2, 5, *hw, dtype=torch.float64)
    torch.testing.assert_close(convnn(x), conv(x), atol=1e-12, rtol=0)
    if stride == 1:  # padding='same' is the same conv (nn.Conv2d takes it at stride 1 only), 'valid' for k = 1
        same = nn.Conv2d(5, 7, kernel, padding='same' if kernel > 1 else 'valid').double()
        same.load_state_dict(conv.state_dict())
        torch.testing.assert_close(ConvNN2d.from_conv2d(same)(x), same(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_convolution_identity_in_half_precision(dtype):
    # a bf16 / fp16 model: the coordinates and their euclidean features stay fp32 (in half precision
    # -|k|^2 + 2 <q, k> lost the digits that tell neighbouring pixels apart: ConvNN2d missed nn.Conv2d by 1.5 (fp16)
    # and 3.6 (bf16) on this 64 x 96 map)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 64, 96).to(dtype)
    ref = nn.functional.conv2d(x.float(), conv.weight.to(dtype).float(), conv.bias.to(dtype).float(), padding=1)
    got = ConvNN2d.from_conv2d(conv.to(dtype))(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=0.03, rtol=0.02)


def test_convolution_identity_explicit_construction_fp32():
    # the statement spelled out: coordinate-only euclidean similarity, ones, K = 9, padding 1
    conv = nn.Conv2d(8, 16, 3, padding=1)
    convnn = ConvNN2d(8, 16, num_neighbors=9, padding=1, coords='only', similarity='euclidean', weighting='ones')
    with torch.no_grad():
        convnn.aggregate.weight.copy_(conv2d_weight_to_convnn(conv.weight))
        convnn.aggregate.bias.copy_(conv.bias)
    x = torch.randn(4, 8, 14, 14)
    torch.testing.assert_close(convnn(x), conv(x), atol=1e-5, rtol=0)
    # gradients agree too
    g = torch.randn(4, 16, 14, 14)
    gx_conv, = torch.autograd.grad(conv(x), conv.weight, g)
    gx_nn, = torch.autograd.grad(convnn(x), convnn.aggregate.weight, g)
    torch.testing.assert_close(gx_nn, conv2d_weight_to_convnn(gx_conv), atol=1e-4, rtol=1e-5)


def test_convolution_identity_fails_without_position_order():
    # the slot order matters: rank order ties the taps to similarity rank, not to spatial offsets
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    convnn = ConvNN2d.from_conv2d(conv)
    convnn.neighbor_order = 'rank'
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    assert (convnn(x) - conv(x)).abs().max() > 1e-3
