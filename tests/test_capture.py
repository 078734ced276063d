""" Graph capture at one batch size, runs at others: torch.jit.trace (what timm's ``onnx_export`` traces with),
torch.export with a dynamic batch (the dynamo ONNX exporter's first step) and torch.compile(dynamic=True).

The PyTorch path works in chunks and blocks sized from memory budgets. Sized from the whole batch, their counts and
bounds were baked into a trace (a ViT-Ti traced at batch 4 failed at 32, a ResNet-18 at every other batch) and
specialised export / compile to one batch size. While capturing they are sized per sample (``_capturing``).
"""
import pytest
import torch
import timm

import timm_convnn  # noqa: F401
from timm_convnn import ConvNN2d, ConvNNBranch2d
from timm_convnn.layers import triton_attention

# a ResNet-18 with one basic block per stage keeps every kind of block (stride 1 and 2, with and without a
# downsampling shortcut) at half the layers: capturing and exporting cost time per layer (ONNX export of the full
# ResNet-18 took over a minute on two cores)
ONE_BLOCK_PER_STAGE = (1, 1, 1, 1)
CASES = [
    # the selection's query chunks (8 MiB score slices) depend on the batch from about 19 images on
    ('vit_tiny_convnn_all_k16', dict(depth=1), 224),
    # ConvNN heads next to attention heads
    ('vit_tiny_convnn_branch', dict(depth=1), 224),
    # listed candidates, ones weights, the standard aggregation (slot chunks)
    ('vit_tiny_convnn_random', dict(depth=1, weighting='ones', aggregation='standard'), 224),
    # ConvNN2d: the aggregation's query blocks depend on the batch
    ('resnet18_convnn_branch', dict(layers=ONE_BLOCK_PER_STAGE), 112),
]
BATCHES = (1, 3, 32)
# capturing a graph makes torch (and timm's exporter) warn: tracer warnings for values a trace takes as constants (the
# per-sample chunk sizes, which are), and deprecations of torch.jit.trace and of the TorchScript-based ONNX exporter
pytestmark = [
    pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning'),
    pytest.mark.filterwarnings('ignore:`torch.jit.trace:FutureWarning'),
    pytest.mark.filterwarnings('ignore::DeprecationWarning'),
]


def _model_and_inputs(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    return model, {b: torch.randn(b, 3, size, size) for b in (4,) + BATCHES}


@pytest.mark.parametrize('name, kwargs, size', CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize('capture', ['trace', 'export'])
def test_captured_graph_runs_at_every_batch_size(name, kwargs, size, capture):
    model, xs = _model_and_inputs(name, kwargs, size)
    with torch.no_grad():
        if capture == 'trace':
            graph = torch.jit.trace(model, xs[4])
        else:
            batch = torch.export.Dim('batch', min=1, max=1024)
            graph = torch.export.export(model, (xs[4],), dynamic_shapes=({0: batch},)).module()
        for b in BATCHES:
            torch.testing.assert_close(graph(xs[b]), model(xs[b]), msg=lambda m: f'batch {b}: {m}')


@pytest.mark.parametrize('name, kwargs, size', CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_torch_compile_dynamic_batch_compiles_once(name, kwargs, size):
    # (timm's ResNet itself recompiles for batches over 15: torch's conv2d guards on the batch)
    model, xs = _model_and_inputs(name, kwargs, size)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='eager', dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(xs[4]), model(xs[4]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for b in (3, 32):  # (batch 1 is specialised by torch itself)
                torch.testing.assert_close(compiled(xs[b]), model(xs[b]))


# torch.export with a dynamic image size: (model, kwargs, image sizes a multiple of, inputs after export at 96 x 96)
SIZE_CASES = [
    ('vit_tiny_convnn_all_k16', dict(depth=1, dynamic_img_size=True), 16, [(64, 64), (160, 80), (48, 112)]),
    # r 20 > 12 patches at 48 x 64: min(r, n) ids then, where eager takes every token
    ('vit_tiny_convnn_random', dict(depth=1, dynamic_img_size=True, num_samples=20), 16, [(48, 64), (128, 208)]),
    ('vit_tiny_convnn_spatial', dict(depth=1, dynamic_img_size=True, num_samples=20), 16, [(48, 64), (208, 96)]),
    ('vit_tiny_convnn_branch', dict(depth=1, dynamic_img_size=True), 16, [(64, 64), (112, 176)]),
    # ConvNN2d: padded 'all' candidates, the 1x1-conv fuse, stride-2 blocks; down to 2 x 2 maps in layer4
    ('resnet18_convnn_branch', dict(layers=ONE_BLOCK_PER_STAGE), 32, [(64, 64), (128, 96), (64, 160)]),
]


# torch 2.5 to 2.7's export specialises a dynamic image size to the traced one, in timm's own ViT too ("16*h was
# inferred to be a constant"), and its symbolic min / max in our layers; measured working with torch 2.8 and 2.14
needs_size_free_export = pytest.mark.skipif(
    triton_attention._version(torch.__version__) < (2, 8),
    reason="torch < 2.8's export specialises a dynamic image size (timm's own ViT too)")


def _export_for_every_size(model, multiple, example):
    """``model`` exported at 2 x 3 x ``example`` x ``example`` for any height and width that are multiples of
    ``multiple`` (2 to 32 of them), and any batch up to 64."""
    dim = torch.export.Dim
    h, w = dim('h', min=2, max=32), dim('w', min=2, max=32)
    shapes = ({0: dim('batch', min=1, max=64), 2: multiple * h, 3: multiple * w},)
    return torch.export.export(model, (torch.randn(2, 3, example, example),), dynamic_shapes=shapes).module()


@needs_size_free_export
@pytest.mark.parametrize('name, kwargs, multiple, sizes', SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_export_with_a_dynamic_image_size(name, kwargs, multiple, sizes):
    # one graph for every image size (and batch): the PyTorch path neither loops nor branches on a symbolic token count
    # (``timm_convnn.layers.symbolic``), so the graph computes what eager computes at sizes it was not traced at
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        graph = _export_for_every_size(model, multiple, 96)
        for i, (height, width) in enumerate(sizes):
            x = torch.randn(1 + i, 3, height, width)
            torch.testing.assert_close(graph(x), model(x), msg=lambda m: f'{height} x {width}: {m}')


@needs_size_free_export
def test_dynamic_size_graph_has_k_slots_at_every_size():
    # eager clamps K to the candidate count; the graph keeps K slots and leaves the missing ones empty (zero weight,
    # a zero row, sorted last in position order), so at sizes with fewer than K candidates it computes the same
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_convnn_all_k16', depth=1, num_classes=5, dynamic_img_size=True).eval()
    cnn = torch.nn.Sequential(  # listed candidates, position order, softmax; then padded 'all' with 'ones' weights
        ConvNN2d(3, 4, candidates='random', num_samples=12, neighbor_order='position', weighting='softmax'),
        ConvNN2d(4, 4, num_neighbors=16, padding=1)).eval()
    for model, multiple, example, sizes in [(vit, 16, 96, [(48, 64), (32, 32), (32, 80)]),
                                            (cnn, 1, 8, [(2, 3), (2, 2), (3, 2)])]:
        with torch.no_grad():
            graph = _export_for_every_size(model, multiple, example)
            for height, width in sizes:
                x = torch.randn(1, 3, height, width)
                torch.testing.assert_close(graph(x), model(x), msg=lambda m: f'{height} x {width}: {m}')


@pytest.mark.parametrize('name, kwargs, size', [CASES[2], CASES[3]], ids=[CASES[2][0], CASES[3][0]])
def test_onnx_export_with_timm(name, kwargs, size, tmp_path):
    # timm's own ONNX export (timm.utils.onnx, behind its onnx_export.py script) with the dynamo-based exporter: a
    # dynamic batch, and onnxruntime computes what the model computes. The TorchScript-based exporter (timm's
    # default) mis-converted ConvNN (a ViT-Ti's logits 0.27 off): it gets a clear error instead
    pytest.importorskip('onnxscript', reason='the dynamo-based ONNX exporter needs onnxscript (test extra)')
    if name.startswith('resnet') and triton_attention._version(torch.__version__) < (2, 7):
        pytest.skip("torch < 2.7's dynamo-based ONNX exporter cannot convert batch norm (timm's own resnet18 fails "
                    "too)")
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime runs the exported model (test extra)')
    from timm.utils.onnx import onnx_export
    model, xs = _model_and_inputs(name, kwargs, size)
    path = str(tmp_path / 'model.onnx')
    with pytest.raises(RuntimeError, match='dynamo-based exporter only.*use_dynamo=True'):
        onnx_export(model, path, input_size=(3, size, size), batch_size=4, use_dynamo=False)
    onnx_export(model, path, input_size=(3, size, size), batch_size=4, use_dynamo=True, check_forward=False)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    with torch.no_grad():
        for b in BATCHES:
            out = session.run(None, {session.get_inputs()[0].name: xs[b].numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(out), model(xs[b]), rtol=1e-4, atol=1e-5)


def _convnn2d_stack():
    # ConvNN2d with a stride and padded 'all' candidates, then the hybrid layer with random candidates (a ResNet-18
    # takes minutes through the ONNX exporter on two cores)
    return torch.nn.Sequential(ConvNN2d(3, 8, stride=2, padding=1), ConvNNBranch2d(8, 8, candidates='random',
                                                                                   num_samples=12))


@needs_size_free_export
@pytest.mark.parametrize('name, multiple', [('vit_tiny_convnn_random', 16), ('convnn2d_stack', 2)],
                         ids=['vit_tiny_convnn_random', 'convnn2d_stack'])
def test_onnx_export_with_a_dynamic_image_size(name, multiple, tmp_path):
    # timm's onnx_export(dynamic_size=True) with the dynamo-based exporter: onnxruntime runs the one graph at other
    # sizes to the eager result. (Spatial candidates: torch's ONNX exporter fails inside torch on the grid's
    # symbolic rounding; torch.export itself takes them, see above.)
    pytest.importorskip('onnxscript', reason='the dynamo-based ONNX exporter needs onnxscript (test extra)')
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime runs the exported model (test extra)')
    from timm.utils.onnx import onnx_export
    torch.manual_seed(0)
    if name == 'convnn2d_stack':
        model = _convnn2d_stack().eval()
    else:
        model = timm.create_model(name, num_classes=5, depth=1, dynamic_img_size=True, num_samples=20).eval()
    path = str(tmp_path / 'model.onnx')
    onnx_export(model, path, input_size=(3, 96, 96), batch_size=2, use_dynamo=True, dynamic_size=True,
                check_forward=False)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    with torch.no_grad():
        for i, (height, width) in enumerate([(96, 96), (2 * multiple, 4 * multiple), (5 * multiple, 3 * multiple)]):
            x = torch.randn(1 + i, 3, height, width)
            out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


_FUSED_EXPORT = '''
import json, torch, timm, timm_convnn
from timm_convnn.layers import set_backend
Dim = torch.export.Dim
torch.manual_seed(0)
result = {}
for name, kw in [('vit_tiny_convnn_all_k16', {}), ('vit_tiny_convnn_random', dict(num_samples=20, weighting='ones')),
                 ('vit_tiny_convnn_spatial', dict(num_samples=20))]:
    m = timm.create_model(name, img_size=48, patch_size=8, depth=1, num_classes=5, dynamic_img_size=True, **kw).eval()
    # a dynamic batch at 48 x 48, then a dynamic batch and image size (multiples of the patch)
    xs = {'b1': torch.randn(1, 3, 48, 48), 'b4': torch.randn(4, 3, 48, 48), 'b6': torch.randn(6, 3, 48, 48)}
    sized = {'32x56': torch.randn(1, 3, 32, 56), '64x40': torch.randn(3, 3, 64, 40)}
    with torch.no_grad():
        set_backend('torch')
        ref = {key: m(x) for key, x in {**xs, **sized}.items()}
        set_backend('triton')
        ep = torch.export.export(m, (xs['b4'],), dynamic_shapes=({0: Dim('batch', min=1, max=64)},))
        errors = {key: (ep.module()(x) - ref[key]).abs().max().item() for key, x in xs.items()}
        h, w = Dim('h', min=4, max=16), Dim('w', min=4, max=16)
        ep_sized = torch.export.export(m, (xs['b4'],), dynamic_shapes=({0: Dim('batch', min=1, max=64), 2: 8 * h,
                                                                        3: 8 * w},))
        errors.update({key: (ep_sized.module()(x) - ref[key]).abs().max().item() for key, x in sized.items()})
        ops = sorted({str(n.target) for g in (ep, ep_sized) for n in g.graph.nodes if 'timm_convnn' in str(n.target)})
        result[name] = [ops, errors]
print('RESULT', json.dumps(result))
'''


def test_export_keeps_the_fused_kernels_with_a_dynamic_batch_and_size(tmp_path):
    # on a GPU the layers run the fused Triton custom ops; their fake implementations let torch.export keep them in
    # the graph with a symbolic batch, and image size. Checked on CPU under Triton's interpreter against the PyTorch
    # path
    from tests.test_triton import run_interpreted
    result = run_interpreted(_FUSED_EXPORT, tmp_path, 'exported')
    assert result['vit_tiny_convnn_all_k16'][0] == ['timm_convnn.convnn_attention.default']
    assert result['vit_tiny_convnn_random'][0] == ['timm_convnn.convnn_select.default']
    assert result['vit_tiny_convnn_spatial'][0] == ['timm_convnn.convnn_attention.default']
    for name, (_, errors) in result.items():
        assert sorted(errors) == ['32x56', '64x40', 'b1', 'b4', 'b6'] and max(errors.values()) < 1e-5, (name, errors)


def test_public_functionals_capture_and_transform_with_their_checks():
    # the exported functionals check shapes and read their ids back; while a graph is captured (compile, export) and
    # under torch.func transforms those reads cannot happen and are skipped, the functionals still run
    from torch.func import vmap
    from timm_convnn.layers import gather_dot, neighbor_aggregate, select_neighbors
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 7, 4, generator=g)

    class Pipeline(torch.nn.Module):  # (the id lists as buffers: torch 2.5's export refuses closed-over tensors)
        def __init__(self):
            super().__init__()
            self.register_buffer('cand', torch.tensor([0, 2, 4, 6]))
            self.register_buffer('qid', torch.arange(5))
            self.register_buffer('weight', torch.ones(2, 4, 3))

        def forward(self, q, k):
            idx = select_neighbors(q, k, 3, self.cand, self.qid)
            rho = gather_dot(q, k, idx).softmax(-1)
            return neighbor_aggregate(k, idx, rho, self.weight, True)

    pipeline = Pipeline()
    ref = pipeline(q, k)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(pipeline, fullgraph=True)(q, k), ref)
    torch.testing.assert_close(torch.export.export(pipeline, (q, k)).module()(q, k), ref)
    # vmapped over a leading dimension of stacked inputs: per entry what the unbatched call gives
    qq, kk = torch.stack([q, 2 * q]), torch.stack([k, -k])
    idx = torch.stack([select_neighbors(q, k, 3), select_neighbors(2 * q, -k, 3)])
    got = vmap(lambda a, b, i: neighbor_aggregate(b, i, gather_dot(a, b, i).softmax(-1), torch.ones(2, 4, 3), True))(
        qq, kk, idx)
    for e in range(2):
        torch.testing.assert_close(
            got[e], neighbor_aggregate(kk[e], idx[e], gather_dot(qq[e], kk[e], idx[e]).softmax(-1),
                                       torch.ones(2, 4, 3), True))
