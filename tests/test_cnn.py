"""CNN family: ResNet-18/34/50 and VGG-11 with ConvNN / branching 3x3 convs."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
import timm_convnn  # noqa: F401
from timm_convnn.layers import ConvNN2d, ConvNNBranch2d
from timm_convnn.models.resnet_convnn import ConvNNBasicBlock, ConvNNBottleneck, checkpoint_filter_fn as resnet_filter
from timm_convnn.models.vgg_convnn import checkpoint_filter_fn as vgg_filter

from .test_vit import _hooked_forward_backward

CNN_NAMES = sorted(
    [f'resnet{d}_convnn{m}' for d in (18, 34, 50) for m in ('', '_branch')]
    + ['vgg11_convnn', 'vgg11_convnn_branch', 'vgg11_convnn_branch_pe'])


def _convnn_layers(model):
    return [m for m in model.modules() if isinstance(m, (ConvNN2d, ConvNNBranch2d))]


def test_registry():
    assert timm.list_models(['resnet*_convnn*', 'vgg*_convnn*']) == CNN_NAMES


@pytest.mark.parametrize('name,expected', [
    ('resnet18_convnn', 16), ('resnet18_convnn_branch', 16), ('resnet34_convnn_branch', 32),
    ('resnet50_convnn', 16), ('resnet50_convnn_branch', 16), ('vgg11_convnn', 8), ('vgg11_convnn_branch', 8),
])
def test_every_3x3_conv_is_replaced(name, expected):
    model = timm.create_model(name, device='meta')
    layers = _convnn_layers(model)
    top = [m for m in layers if not any(m is not p and m in list(p.modules()) for p in layers)]
    assert len(top) == expected
    branch = 'branch' in name
    assert all(isinstance(m, ConvNNBranch2d if branch else ConvNN2d) for m in top)
    # no 3x3 nn.Conv2d left outside the branch layers' own conv path
    inside = {id(c) for m in top for c in m.modules()}
    assert not [n for n, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and id(m) not in inside]
    # paper CNN defaults
    convnn = [m for m in model.modules() if isinstance(m, ConvNN2d)]
    assert all((m.num_neighbors, m.candidates, m.similarity, m.weighting) == (9, 'all', 'cosine', 'ones')
               for m in convnn)
    if branch:
        assert all(m.branch_ratio == 0.5 for m in top)
    # each layer has its own eval-mode sampling seed
    assert len({m.sample_seed for m in convnn}) == len(convnn)


def test_resnet50_branch_trains_features_and_intermediates():
    # zero_init_last=False: timm zero-inits each block's last norm, which blocks every in-block gradient at step 0
    model = timm.create_model('resnet50_convnn_branch', num_classes=7, zero_init_last=False)
    assert all(isinstance(b, ConvNNBottleneck) for stage in (model.layer1, model.layer4) for b in stage)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any('convnn.aggregate' in n for n in changed) and any('.conv.' in n for n in changed)

    feat = timm.create_model('resnet50_convnn_branch', features_only=True).eval()
    assert feat.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert feat.feature_info.reduction() == [2, 4, 8, 16, 32]
    outs = feat(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 256, 512, 1024, 2048]
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4, 2]
    model.eval()
    final, inter = model.forward_intermediates(torch.randn(1, 3, 64, 64))
    assert [t.shape[1] for t in inter] == [64, 256, 512, 1024, 2048]


def _warm_start(src_name, name, filter_fn):
    src = timm.create_model(src_name).eval()
    model = timm.create_model(name).eval()
    src_sd, own = src.state_dict(), model.state_dict()
    sd = filter_fn(src_sd, model)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = [k for k in own if k in src_sd]
    initialized = [k for k in own if k not in src_sd]
    dropped = [k for k in src_sd if k not in own]
    for k in loaded:
        assert torch.equal(model.state_dict()[k], src_sd[k]), k
    return src, model, loaded, initialized, dropped


@pytest.mark.parametrize('src_name,name,replaced,new_per_layer', [
    ('resnet50', 'resnet50_convnn_branch', 16, ('conv.weight', 'convnn.aggregate.weight', 'fuse.bias', 'fuse.weight')),
    ('resnet18', 'resnet18_convnn', 16, ('aggregate.weight',)),
    ('vgg11_bn', 'vgg11_convnn_branch', 8,
     ('conv.bias', 'conv.weight', 'convnn.aggregate.bias', 'convnn.aggregate.weight', 'fuse.bias', 'fuse.weight')),
])
def test_warm_start_counts(src_name, name, replaced, new_per_layer):
    # each family's checkpoint_filter_fn, where timm's model files keep theirs (the README names them)
    filter_fn = vgg_filter if name.startswith('vgg') else resnet_filter
    src, model, loaded, initialized, dropped = _warm_start(src_name, name, filter_fn)
    # exactly the replaced 3x3 convs' tensors (weight, and bias where the conv had one) are dropped ...
    conv3 = {k.rsplit('.', 1)[0] for k, v in src.state_dict().items()
             if k.endswith('.weight') and v.dim() == 4 and v.shape[-2:] == (3, 3)}
    assert {k.rsplit('.', 1)[0] for k in dropped} == conv3 and len(conv3) == replaced
    assert all(k.rsplit('.', 1)[1] in ('weight', 'bias') for k in dropped)
    # ... every other source tensor (stem, 1x1 convs, norms, shortcuts, head) is loaded ...
    assert len(loaded) == len(src.state_dict()) - len(dropped)
    # ... and the only initialized tensors are the new ConvNN layers' own
    layers = {k.rsplit('.', 1)[0] for k in dropped}
    expect = sorted(f'{layer}.{t}' for layer in layers for t in new_per_layer)
    assert sorted(initialized) == expect
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


@pytest.mark.parametrize('src_name,name', [('resnet18_convnn', 'resnet18_convnn_branch'),
                                           ('resnet18_convnn_branch', 'resnet18_convnn'),
                                           ('vgg11_convnn', 'vgg11_convnn_branch')])
def test_checkpoint_of_another_convnn_variant_does_not_load(src_name, name, tmp_path):
    # the filter drops only the replaced convs' weight / bias: another variant's ConvNN tensors stay, so the strict
    # load refuses them instead of warm-starting with every ConvNN layer at its initialisation
    vgg = name.startswith('vgg')
    kwargs = dict(num_classes=3, mlp_ratio=0.01) if vgg else dict(num_classes=3)
    src = timm.create_model(src_name, **kwargs)
    sd = (vgg_filter if vgg else resnet_filter)(src.state_dict(), timm.create_model(name, **kwargs))
    src_convnn = {k for k in src.state_dict() if 'aggregate' in k}
    assert src_convnn and src_convnn <= set(sd)
    path = tmp_path / 'other_variant.pth'
    torch.save(src.state_dict(), path)
    with pytest.raises(RuntimeError, match=f'for {name} from .*does not match this architecture'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3),
                          **kwargs)


@pytest.mark.parametrize('wrapper', ['model', 'state_dict'])
@pytest.mark.parametrize('name', ['resnet18_convnn_branch', 'vgg11_convnn'])
def test_checkpoint_filters_unwrap_saved_checkpoints(name, wrapper):
    # a checkpoint saved as {'model': state_dict, ...} (torchvision's / DeiT's reference scripts) or
    # {'state_dict': state_dict, ...} (timm's train.py) holds the weights of the model: they all load, strictly
    vgg = name.startswith('vgg')
    kwargs = dict(num_classes=3, mlp_ratio=0.01) if vgg else dict(num_classes=3)  # (a light VGG pre-logits MLP)
    src, model = timm.create_model(name, **kwargs), timm.create_model(name, **kwargs)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    filter_fn = vgg_filter if vgg else resnet_filter
    state_dict = filter_fn({wrapper: src.state_dict(), 'epoch': 3}, model)
    model.load_state_dict(state_dict, strict=True)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_vgg_filter_converts_torchvision_checkpoints():
    # torchvision's VGG-11-BN checkpoint layout (Linear classifier) -> timm's (ConvMlp pre-logits, head): by
    # definition, timm's own vgg11_bn with the converted weights computes torchvision's model; the ConvNN model then
    # warm-starts from the same checkpoint with a strict load
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.vgg11_bn(num_classes=10).eval()
    tv_sd = tv.state_dict()
    model = timm.create_model('vgg11_convnn_branch', num_classes=10).eval()
    converted = vgg_filter({'state_dict': tv_sd}, model)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.state_dict()['pre_logits.fc1.weight'], tv_sd['classifier.0.weight'].view(4096, 512, 7, 7))
    reference = timm.create_model('vgg11_bn', num_classes=10).eval()
    reference.load_state_dict(vgg_filter(tv_sd, reference), strict=True)  # (no ConvNN layer: nothing dropped)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), tv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name, stem', [('vgg11_convnn', 'features.0.aggregate.weight'),
                                        ('vgg11_convnn_branch', 'features.0.convnn.aggregate.weight')])
def test_vgg_pretrained_weights_adapt_to_in_chans(name, stem, tmp_path, caplog):
    # VGG's first layer is a ConvNN layer: its pretrained aggregation weight (out, in, K) gets another in_chans by
    # timm's stem rule (timm.models.adapt_input_conv: the sum over RGB for 1 channel; repeated and scaled by 3 / n
    # otherwise), which timm itself only applies to 4-D conv weights (it would drop this one: random init)
    import logging
    torch.manual_seed(0)
    src = timm.create_model(name, mlp_ratio=0.01, num_classes=3)  # (a small pre-logits MLP: a light checkpoint)
    torch.save(src.state_dict(), tmp_path / 'w.pth')
    w = src.state_dict()[stem]
    for in_chans, expect in ((1, w.sum(1, keepdim=True)), (4, torch.cat([w, w[:, :1]], 1) * 3 / 4)):
        with caplog.at_level(logging.INFO):
            model = timm.create_model(name, mlp_ratio=0.01, num_classes=3, in_chans=in_chans, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.pth'), num_classes=3))
        assert torch.allclose(model.state_dict()[stem], expect)
        assert 'Unable to convert' not in caplog.text and 'Loading unchanged' not in caplog.text
        assert f'{stem} pretrained weights from 3 to {in_chans} channel(s)' in caplog.text
        rest = {k: v for k, v in model.state_dict().items() if k != stem and 'features.0.conv.weight' not in k}
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in rest.items())
        assert model(torch.randn(1, in_chans, 32, 32)).shape == (1, 3)
        caplog.clear()


def test_outputs_keep_the_input_memory_format_and_empty_batches_run():
    # like timm's resnet18: NCHW in, contiguous NCHW features out (view(B, -1) works); channels-last in and out;
    # an empty batch gives empty logits, forward and backward
    torch.manual_seed(0)
    model = timm.create_model('resnet18_convnn', num_classes=5).eval()
    layer = ConvNN2d(8, 16, stride=2)
    x = torch.randn(2, 8, 7, 7)
    assert layer(x).is_contiguous()
    assert layer(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(img)
        assert feats.is_contiguous() and feats.view(2, -1).shape == (2, 512 * 2 * 2)
        assert all(t.is_contiguous() for t in model.forward_intermediates(img, intermediates_only=True))
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl.forward_features(img.to(memory_format=torch.channels_last))
        assert out_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out_cl, feats)
    model.train()
    empty = model(torch.randn(0, 3, 64, 64))
    assert empty.shape == timm.create_model('resnet18', num_classes=5)(torch.randn(0, 3, 64, 64)).shape == (0, 5)
    empty.sum().backward()


@pytest.mark.parametrize('name', ['resnet18_convnn_branch', 'vgg11_convnn_branch'])
def test_branch_ratio_limits_in_models(name):
    zero = timm.create_model(name, branch_ratio=0.0, device='meta')
    assert not [m for m in zero.modules() if isinstance(m, ConvNN2d)]
    assert all(m.convnn is None and m.conv is not None for m in zero.modules() if isinstance(m, ConvNNBranch2d))
    one = timm.create_model(name, branch_ratio=1.0, device='meta')
    assert all(m.conv is None and m.convnn is not None for m in one.modules() if isinstance(m, ConvNNBranch2d))
    for bad in (-0.5, 1.01):
        with pytest.raises(ValueError, match=r'branch_ratio \(lambda\) must be in \[0, 1\]'):
            timm.create_model(name, branch_ratio=bad, device='meta')


@pytest.mark.parametrize('name', ['vgg11_convnn_branch', 'vgg11_convnn_branch_pe', 'resnet18_convnn_branch',
                                  'resnet18_convnn'])
def test_cifar_sized_input(name):
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name', ['vgg11_convnn', 'resnet18_convnn_branch'])
def test_train_step_under_autocast(name):
    # bf16 autocast (train.py --amp; here on the CPU): VGG's first ConvNN layer takes the fp32 image, the others and
    # ResNet's take autocast's bf16 activations. (Numbers are not compared with the fp32 step: from bf16 features the
    # top-K neighbour sets differ, and at random init the change compounds over the layers; the aggregation's
    # numerics under autocast are tested against their definition in test_operator.py.)
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    params = list(model.parameters())
    reached = [bool(g.any()) for g in torch.autograd.grad(model(x).logsumexp(-1).mean(), params)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().logsumexp(-1).mean(), params)
    assert all(g.dtype == p.dtype and bool(torch.isfinite(g).all()) for g, p in zip(grads, params))
    # the same parameters get a gradient (ResNet's zero-init last norm of each block stops it in fp32 as well)
    assert [bool(g.any()) for g in grads] == reached and any(reached)


@pytest.mark.parametrize('padding, dilation', [(1, 1), (2, 2), (0, 1), (2, 1), (1, 2)])
def test_conv_factory_replaces_same_padded_3x3_convs_only(padding, dilation):
    # the factory stands in for nn.Conv2d (timm's conv_layer hook): a 3x3 conv that keeps the map size (padding equal
    # to the dilation) becomes a ConvNN layer of the conv's output shape; ConvNN cannot shrink a map as a conv with
    # other padding does, so that is refused; other kernel sizes stay plain convs
    from timm_convnn.models._cnn import ConvNNConvFactory
    conv = nn.Conv2d(4, 6, 3, padding=padding, dilation=dilation)
    x = torch.randn(1, 4, 9, 9)
    for factory, kind in ((ConvNNConvFactory(), ConvNN2d), (ConvNNConvFactory(branch_ratio=0.5), ConvNNBranch2d)):
        if conv(x).shape[-2:] == x.shape[-2:]:
            layer = factory(4, 6, 3, padding=padding, dilation=dilation)
            assert type(layer) is kind and layer(x).shape == conv(x).shape
        else:
            with pytest.raises(ValueError, match=f'"same"-padded 3x3 convs; got padding={padding}, '
                                                 f'dilation={dilation}'):
                factory(4, 6, 3, padding=padding, dilation=dilation)
        plain = factory(4, 6, 1, padding=padding, dilation=dilation)
        assert type(plain) is nn.Conv2d and (plain.padding, plain.dilation) == ((padding,) * 2, (dilation,) * 2)


def test_resnet_output_stride_dilates_as_timm_does():
    # timm's ResNet with output_stride=8 dilates the 3x3 convs of layer3 / layer4 instead of striding: the branch
    # layers' conv path takes the stride, padding and dilation of the conv it replaces in timm's own resnet18, the
    # ConvNN path its stride; the feature maps are timm's
    model = timm.create_model('resnet18_convnn_branch', output_stride=8, device='meta')
    ref = dict(timm.create_model('resnet18', output_stride=8, device='meta').named_modules())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ConvNNBranch2d)}
    assert len(layers) == 16 and any(ref[n].dilation != (1, 1) for n in layers)
    for n, m in layers.items():
        conv = ref[n]
        assert (m.conv.kernel_size, m.conv.stride, m.conv.padding, m.conv.dilation) == \
            (conv.kernel_size, conv.stride, conv.padding, conv.dilation), n
        assert m.convnn.stride == conv.stride[0], n
    ours = timm.create_model('resnet18_convnn_branch', output_stride=8, features_only=True).eval()
    timms = timm.create_model('resnet18', output_stride=8, features_only=True).eval()
    assert ours.feature_info.reduction() == timms.feature_info.reduction()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert [f.shape for f in ours(x)] == [f.shape for f in timms(x)]


def test_convnn_kwargs_reach_every_layer():
    opts = dict(num_neighbors=5, candidates='random', num_samples=16, similarity='euclidean', weighting='softmax',
                coords='append')
    model = timm.create_model('resnet18_convnn_branch', **opts)
    convnn = [m for m in model.modules() if isinstance(m, ConvNN2d)]
    assert len(convnn) == 16
    for m in convnn:
        assert all(getattr(m, k) == v for k, v in opts.items())
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    pe = timm.create_model('vgg11_convnn_branch_pe', device='meta')
    assert all(m.coords == 'append' for m in pe.modules() if isinstance(m, ConvNN2d))
    with pytest.raises(TypeError):
        timm.create_model('resnet18_convnn', not_a_model_arg=1)
    with pytest.raises(TypeError, match='block= cannot be passed'):
        timm.create_model('resnet18_convnn', block=ConvNNBasicBlock)


def test_resnet50_branch_keeps_no_n_by_n_for_backward():
    model = timm.create_model('resnet50_convnn_branch').train()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    x = torch.randn(2, 3, 224, 224)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    n = 56 * 56  # stage-1 tokens
    assert max(sizes) < 2 * n * n  # (B, n, n) scores of the first stage would be 19.7 M elements
    assert max(sizes) < 2 * 64 * n * 9  # nor the (B, C, n, K) neighbour copy of a stage-1 layer (3.6 M)
    out.mean().backward()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='peak RSS accounting reads /proc (Linux only)')
def test_resnet50_branch_peak_memory_is_bounded():
    # forward + backward, 224 px, batch 8, CPU. Measured 816 MiB here vs 697 MiB for timm's resnet50
    # (benchmarks/peak_memory.py, README); the stated bound is 1 GiB.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    from peak_memory import measure_peak
    peak = measure_peak('resnet50_convnn_branch', batch_size=8, img_size=224)
    assert 0 < peak < 2 ** 30, peak / 2 ** 20


@pytest.mark.parametrize('name', ['resnet18_convnn', 'resnet18_convnn_branch'])
def test_grad_checkpointing_recomputes_the_same_neighbours(name):
    # timm's set_grad_checkpointing (train.py --grad-checkpointing) through the ResNet stages: each ConvNN layer runs
    # again in the backward, with the same gradients as without it. (VGG has none, as timm's VGG.)
    model = timm.create_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    layer = (ConvNN2d, ConvNNBranch2d)
    plain, plain_calls = _hooked_forward_backward(model, x, layer, False)
    ckpt, ckpt_calls = _hooked_forward_backward(model, x, layer, True)
    assert [plain_calls, ckpt_calls] == [len(_convnn_layers(model)), 2 * len(_convnn_layers(model))]
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
