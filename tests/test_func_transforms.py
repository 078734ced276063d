"""``torch.func`` transforms through ConvNN (PyTorch path; the fused kernels under them: ``test_triton.py``): grad,
per-sample gradients (``vmap(grad)``), Jacobians, vmapped ensembles, each against plain autograd on the same model,
one sample or one model at a time; and second derivatives, which ConvNN does not have, refused where they are taken."""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import timm
from timm_convnn import ConvNN2d, ConvNNAttention
from timm_convnn.layers import functional
from timm_convnn.layers.func_support import fold_batch

SECOND_DERIVATIVE = r'ConvNN has no double backward \(the '


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, depth=2) if name.startswith('vit') else {}
    return timm.create_model(name, num_classes=3, **kwargs).eval()


def _autograd(module: torch.nn.Module, x: torch.Tensor) -> dict:
    """d sum(module(x) ** 2) / d parameters, by plain autograd."""
    module.zero_grad()
    module(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _check_per_sample_gradients(module: torch.nn.Module, x: torch.Tensor) -> None:
    params = {n: p.detach() for n, p in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def loss(p, inputs):
        return functional_call(module, (p, buffers), (inputs,)).square().sum()

    whole = grad(loss)(params, x)
    per_sample = vmap(grad(lambda p, sample: loss(p, sample[None])), in_dims=(None, 0))(params, x)
    expected = _autograd(module, x)
    for n in params:
        torch.testing.assert_close(whole[n], expected[n], msg=n)
    for i in range(x.shape[0]):
        expected = _autograd(module, x[i:i + 1])
        for n in params:
            torch.testing.assert_close(per_sample[n][i], expected[n], msg=f'{n}, sample {i}')


@pytest.mark.parametrize('name', ['vit_tiny_convnn_all_k16', 'vit_tiny_convnn_random', 'resnet18_convnn_branch'])
def test_per_sample_gradients_of_models_match_autograd(name):
    # the autograd Functions had no setup_context: every torch.func transform refused them
    _check_per_sample_gradients(_model(name), torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize('kwargs', [
    dict(num_neighbors=5),
    dict(num_neighbors=4, weighting='softmax', similarity='euclidean', stride=2, padding=1),
    dict(num_neighbors=3, candidates='random', num_samples=8, coords='append', aggregation='depthwise'),
], ids=['plain', 'softmax_strided', 'random_coords_depthwise'])
def test_per_sample_gradients_of_conv2d_layers_match_autograd(kwargs):
    torch.manual_seed(0)
    _check_per_sample_gradients(ConvNN2d(4, 4, **kwargs).eval(), torch.randn(3, 4, 7, 7))


def test_jacobian_of_attention_matches_autograd():
    torch.manual_seed(0)
    layer = ConvNNAttention(16, num_heads=2, num_neighbors=4).eval()
    x = torch.randn(1, 9, 16)
    # jacrev maps the backward over the output's 144 cotangents (the gradient Functions' vmap rules)
    torch.testing.assert_close(jacrev(layer)(x), torch.autograd.functional.jacobian(layer, x))


def test_vmapped_ensemble_matches_each_model():
    models = [_model('vit_tiny_convnn_all_k16') for _ in range(3)]
    for i, m in enumerate(models):  # three different models
        torch.manual_seed(i)
        for p in m.parameters():
            p.data.normal_(0, 0.1)
    params, buffers = stack_module_state(models)
    x = torch.randn(2, 3, 32, 32)
    # the weights are vmapped too: the aggregation folds the models into its groups (one call)
    out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models]))


def _nested_per_sample_gradients(layers, x, ensemble_outer: bool) -> dict:
    """Per-model, per-sample gradients by two nested vmaps (ensemble outside and samples inside, or the reverse),
    indexed [model, sample]."""
    params, buffers = stack_module_state(layers)

    def loss(p, b, t):
        return functional_call(layers[0], (p, b), (t[None],)).square().sum()

    if ensemble_outer:
        return vmap(vmap(grad(loss), in_dims=(None, None, 0)), in_dims=(0, 0, None))(params, buffers, x)
    out = vmap(vmap(grad(loss), in_dims=(0, 0, None)), in_dims=(None, None, 0))(params, buffers, x)
    return {n: g.transpose(0, 1) for n, g in out.items()}


@pytest.mark.parametrize('ensemble_outer', [True, False], ids=['ensemble_outer', 'samples_outer'])
@pytest.mark.parametrize('make, shape', [
    (lambda: ConvNNAttention(16, num_heads=2, num_neighbors=4), (3, 9, 16)),
    (lambda: ConvNNAttention(16, num_heads=2, num_neighbors=4, aggregation='standard'), (3, 9, 16)),
    (lambda: ConvNN2d(4, 4, num_neighbors=5, weighting='softmax'), (3, 4, 5, 5)),
], ids=['attention_depthwise', 'attention_standard', 'conv2d'])
def test_nested_vmaps_match_autograd(make, shape, ensemble_outer):
    # each vmap level folds its entries in turn (into the batch, the groups, or the runs of the batch over which the
    # aggregation's weight gradient is split); an outer level once mistook an inner level's runs for its groups
    torch.manual_seed(0)
    layers = [make().eval() for _ in range(2)]
    for m in layers:
        for p in m.parameters():
            p.data.normal_(0, 0.3)
    x = torch.randn(*shape)
    got = _nested_per_sample_gradients(layers, x, ensemble_outer)
    for e, m in enumerate(layers):
        for i in range(x.shape[0]):
            expected = _autograd(m, x[i:i + 1])
            for n in expected:
                # (fp32 sums in another order: up to 3e-5 on gradients of up to 80 here)
                torch.testing.assert_close(got[n][e, i], expected[n], rtol=1e-4, atol=1e-4,
                                           msg=f'{n}, model {e}, sample {i}')


def test_nested_per_sample_vmaps_match_autograd():
    # two nested per-sample levels (weights unmapped at both): the aggregation splits its weight gradient into the
    # product of both levels' entries
    torch.manual_seed(0)
    layer = ConvNNAttention(16, num_heads=2, num_neighbors=4, aggregation='standard').eval()
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(2, 3, 9, 16)
    loss = lambda p, t: functional_call(layer, p, (t[None],)).square().sum()
    got = vmap(vmap(grad(loss), in_dims=(None, 0)), in_dims=(None, 0))(params, x)
    for a in range(2):
        for b in range(3):
            expected = _autograd(layer, x[a, b:b + 1])
            for n in expected:
                torch.testing.assert_close(got[n][a, b], expected[n], rtol=1e-4, atol=1e-4, msg=f'{n}, sample {a}, {b}')


@pytest.mark.parametrize('m', [ConvNNAttention(16, 2, num_neighbors=4), ConvNN2d(4, 4, weighting='softmax')],
                         ids=['attention', 'conv2d'])
def test_second_derivatives_are_refused_where_they_are_taken(m):
    # the backward passes build their gradients without a graph: create_graph=True gives the first derivative (which
    # torch.func.grad always asks for), differentiating it again raises (before 2026-12-03 create_graph itself did)
    x = torch.randn(1, 9, 16) if isinstance(m, ConvNNAttention) else torch.randn(1, 4, 5, 5)
    x.requires_grad_()
    plain, = torch.autograd.grad(m(x).square().sum(), x)
    for out in (m(x).square().sum(), m(x).sum()):  # a differentiable, then a constant incoming gradient
        g, = torch.autograd.grad(out, x, create_graph=True)
        assert g.requires_grad
        with pytest.raises(RuntimeError, match=SECOND_DERIVATIVE):
            g.square().sum().backward()
    g, = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(g, plain)
    with pytest.raises(RuntimeError, match=SECOND_DERIVATIVE):
        grad(lambda t: grad(lambda u: m(u).square().sum())(t).square().sum())(x.detach())


@pytest.mark.parametrize('aggregation', ['depthwise', 'standard'])
def test_per_sample_gradients_take_one_aggregation_backward(aggregation, monkeypatch):
    # the samples fold into the batch of the aggregation's backward, which returns the weights' gradient per sample
    # (until 2026-12-03 a backward call per sample)
    calls = []
    name = f'_aggregate_{aggregation}_backward'
    real = getattr(functional, name)
    monkeypatch.setattr(functional, name, lambda *a: calls.append((tuple(a[0].shape), a[-1])) or real(*a))
    layer = ConvNNAttention(16, num_heads=2, num_neighbors=4, aggregation=aggregation).eval()
    _check_per_sample_gradients(layer, torch.randn(5, 9, 16))
    # grad of the batch, vmap(grad) over its 5 samples, then plain autograd 6 times
    assert calls[:2] == [((5, 2, 9, 8), 1), ((5, 2, 9, 8), 5)] and len(calls) == 8


_CALLS = []


class _Scale(torch.autograd.Function):
    """y[b, g, n, c] = x[b, g, n, c] * w[g, c]: weights per group, under fold_batch's rules with a limit of 4 groups a
    call (calls recorded in _CALLS)."""
    @staticmethod
    def forward(x, w):
        _CALLS.append(('forward', tuple(x.shape), tuple(w.shape)))
        return x * w[:, None, :]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        return _ScaleGradients.apply(g, *ctx.saved_tensors)

    @staticmethod
    def vmap(info, in_dims, *args):
        return fold_batch(0, weights=(1,), most_groups=4)(_Scale.apply, info, in_dims, *args)


class _ScaleGradients(torch.autograd.Function):
    @staticmethod
    def forward(g, x, w):
        _CALLS.append(('backward', tuple(g.shape), tuple(w.shape)))
        return g * w[:, None, :], (g * x).sum((0, 2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, *args):
        return fold_batch(0, 1, weights=(2,), weight_outputs=(1,), most_groups=4)(
            _ScaleGradients.apply, info, in_dims, *args)


def test_fold_batch_folds_into_groups_in_calls_of_at_most_most_groups():
    x, w = torch.randn(5, 2, 3, 4), torch.randn(2, 4)
    loss = lambda w_, x_: _Scale.apply(x_, w_).square().sum()
    _CALLS.clear()
    per_sample = vmap(grad(loss), in_dims=(None, 0))(w, x[:, None])
    # the forward folds the samples into the batch; the backward, whose weight gradient is per sample, into the groups:
    # 5 samples x 2 groups in calls of at most 4 groups
    assert _CALLS == [('forward', (5, 2, 3, 4), (2, 4))] + [('backward', (1, g, 3, 4), (g, 4)) for g in (4, 4, 2)]
    for i in range(5):
        w_ = w.clone().requires_grad_()
        (x[i:i + 1] * w_[:, None, :]).square().sum().backward()
        torch.testing.assert_close(per_sample[i], w_.grad)
    # an ensemble of 5 weights on one input: the forward folds them into the groups
    ws = torch.randn(5, 2, 4)
    _CALLS.clear()
    out = vmap(lambda w_: _Scale.apply(x, w_))(ws)
    assert _CALLS == [('forward', (5, g, 3, 4), (g, 4)) for g in (4, 4, 2)]
    torch.testing.assert_close(out, torch.stack([x * w_[:, None, :] for w_ in ws]))


def test_per_sample_gradients_in_training_with_random_candidates():
    # train() mode draws random candidates from torch's RNG: vmap refuses that by default, as for dropout, and with
    # randomness='same' every sample sees the one draw a plain forward makes from the same RNG state
    torch.manual_seed(0)
    layer = ConvNNAttention(16, num_heads=2, num_neighbors=4, candidates='random', num_samples=5).train()
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(3, 9, 16)

    def loss(p, t):
        return functional_call(layer, p, (t[None],)).square().sum()

    with pytest.raises(RuntimeError, match='randomness'):
        vmap(grad(loss), in_dims=(None, 0))(params, x)
    torch.manual_seed(1)
    got = vmap(grad(loss), in_dims=(None, 0), randomness='same')(params, x)
    for i in range(3):
        torch.manual_seed(1)
        expected = _autograd(layer, x[i:i + 1])
        for n in expected:
            torch.testing.assert_close(got[n][i], expected[n], msg=f'{n}, sample {i}')


def test_vmap_over_no_entries():
    # vmap allows a mapped dimension of size 0 (e.g. the per-sample gradients of an empty batch): the rules return
    # empty outputs of the right shapes (they once failed to unflatten a size-0 dimension)
    layer = ConvNNAttention(16, num_heads=2, num_neighbors=4).eval()
    assert vmap(layer)(torch.randn(0, 1, 9, 16)).shape == (0, 1, 9, 16)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    got = vmap(grad(lambda p, t: functional_call(layer, p, (t[None],)).sum()), in_dims=(None, 0))(
        params, torch.randn(0, 9, 16))
    assert {n: g.shape for n, g in got.items()} == {n: (0,) + p.shape for n, p in params.items()}
    assert vmap(ConvNN2d(4, 4, weighting='softmax').eval())(torch.randn(0, 1, 4, 5, 5)).shape == (0, 1, 4, 5, 5)
