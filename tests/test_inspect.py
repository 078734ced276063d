"""Neighbour maps (timm_convnn.inspect, timm-convnn neighbors) and the model catalogue (timm-convnn list / info)."""
import json

import pytest
import torch
from PIL import Image

import timm
from timm_convnn.catalog import check_model_name, model_summary
from timm_convnn.cli import main as cli_main
from timm_convnn.inspect import convnn_layers, neighbors, record_neighbors
from timm_convnn.utils import count_params
from timm_convnn.viz import QUERY_RGB, figure_size, neighbor_map

VIT = dict(img_size=32, patch_size=4, depth=2)  # 8 x 8 patches + class token, 3 heads of 64


def _vit(**kw):
    return timm.create_model('vit_tiny_convnn_random', **{**VIT, **kw}).eval()


def test_vit_records_shapes_ranges_and_weights():
    model = _vit(num_samples=16)
    x = torch.randn(2, 3, 32, 32)
    maps = neighbors(model, x)
    assert list(maps) == ['blocks.0.attn', 'blocks.1.attn']
    for m in maps.values():
        assert m.query_grid == m.key_grid == (8, 8) and m.num_prefix_tokens == 1
        assert m.indices.shape == (2, 3, 65, 9) and m.indices.dtype == torch.int64
        assert m.indices.min() >= 0 and m.indices.max() < 65
        assert torch.allclose(m.weights.sum(-1), torch.ones(2, 3, 65))  # softmax over the K kept
        # random candidates: every query sees the class token, itself and the same 16 sampled patches
        others = m.indices[0, 0][m.indices[0, 0] != torch.arange(65).view(65, 1)]
        assert len(torch.unique(others)) <= 17
        rows, cols = m.positions()
        prefix = m.is_prefix()
        assert ((rows == -1) == prefix).all() and rows.max() < 8 and cols.max() < 8
        assert m.query_index(0, 0) == 1 and m.query_index(7, 7) == 64
    with pytest.raises(ValueError, match='outside its 8 x 8 query grid'):
        maps['blocks.0.attn'].query_index(8, 0)


def test_recording_changes_no_output_and_removes_its_hooks():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with record_neighbors(model) as rec:
            recorded = model(x)
    assert torch.equal(plain, recorded) and len(rec) == 2
    for layer in convnn_layers(model).values():
        assert not layer._forward_pre_hooks and not layer.aggregate._forward_hooks


def test_eval_is_deterministic_training_draws_are_recorded():
    model = _vit(num_samples=16)
    x = torch.randn(1, 3, 32, 32)
    a, b = neighbors(model, x), neighbors(model, x)
    assert all(torch.equal(a[k].indices, b[k].indices) for k in a)
    model.train()
    torch.manual_seed(0)
    c = neighbors(model, x)
    torch.manual_seed(1)
    d = neighbors(model, x)
    assert not torch.equal(c['blocks.0.attn'].indices, d['blocks.0.attn'].indices)  # fresh draws per forward


def test_coordinate_mode_selects_the_3x3_window():
    # ConvNN on coordinates only, euclidean: the K = 9 nearest pixels are the 3x3 window (stride 2 layers included)
    model = timm.create_model('resnet18_convnn', coords='only', similarity='euclidean', num_classes=3).eval()
    maps = neighbors(model, torch.randn(1, 3, 32, 32))
    assert len(maps) == 16 and maps['layer1.0.conv1'].layer == 'ConvNN2d'
    strided = 0
    for m in maps.values():
        assert m.weights is None and m.padding == 1
        rows, cols = m.positions()
        qh, qw = m.query_grid
        i = torch.arange(qh).view(qh, 1).expand(qh, qw).reshape(-1) * m.stride
        j = torch.arange(qw).view(1, qw).expand(qh, qw).reshape(-1) * m.stride
        got = torch.stack([rows[0, 0] - i[:, None], cols[0, 0] - j[:, None]], -1)  # offsets from each query
        window = sorted((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        for q in range(qh * qw):
            assert sorted(map(tuple, got[q].tolist())) == window, (m.name, q)
        strided += m.stride == 2
    assert strided == 3


def test_cnn_branch_records_padded_candidates():
    model = timm.create_model('resnet18_convnn_branch', num_classes=3).eval()
    maps = neighbors(model, torch.randn(1, 3, 64, 64))
    m = maps['layer1.0.conv1.convnn']
    assert m.key_grid == (16, 16) and m.query_grid == (16, 16) and m.indices.shape == (1, 1, 256, 9)
    assert m.indices.max() < 18 * 18
    assert maps['layer2.0.conv1.convnn'].query_grid == (8, 8)
    with pytest.raises(ValueError, match='has no ConvNN layer'):
        neighbors(timm.create_model('resnet18'), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r'images must be a \(B, C, H, W\) tensor; got a 3-D tensor'):
        neighbors(model, torch.randn(3, 32, 32))


def test_neighbors_cli_writes_the_png_of_the_checkpoint_it_loads(tmp_path, capsys):
    model = _vit(num_neighbors=5)
    torch.save(model.state_dict(), tmp_path / 'ckpt.pth')
    out = tmp_path / 'cli.png'
    args = ['neighbors', 'vit_tiny_convnn_random', '--checkpoint', str(tmp_path / 'ckpt.pth'), '--img-size', '32',
            '--query', '5,20', '--out', str(out), '--model-kwargs', 'img_size=32', 'patch_size=4', 'depth=2',
            'num_neighbors=5']
    assert cli_main(args) == 0
    assert 'wrote' in capsys.readouterr().out
    png = Image.open(out)
    assert png.size == figure_size(2) and png.mode == 'RGB'
    # the same picture from the API with the same weights: the CLI used the checkpoint, not a fresh init
    size, records, query = neighbor_map(model, str(tmp_path / 'api.png'), query=(5, 20), img_size=32)
    assert query == (5, 20) and size == png.size
    assert out.read_bytes() == (tmp_path / 'api.png').read_bytes()
    # the query cell is outlined: its colour is in the first panel
    assert QUERY_RGB in {png.getpixel((x, y)) for x in range(8, 232) for y in range(36, 260)}


def test_neighbors_cli_cnn_default_image(tmp_path):
    out = tmp_path / 'cnn.png'
    assert cli_main(['neighbors', 'resnet18_convnn_branch', '--img-size', '64', '--out', str(out),
                     '--layers', 'layer1.0.conv1.convnn', 'layer4.1.conv2.convnn', 'layer1.0.conv1.convnn']) == 0
    assert Image.open(out).size == figure_size(2)  # (a layer named twice: one panel)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli_main(['neighbors', 'vit_tiny_convn_random', '--out', str(tmp_path / 'x.png')]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'vit_tiny_convn_random'; did you mean: vit_tiny_convnn_random" in err
    base = ['neighbors', 'vit_tiny_convnn_random', '--img-size', '32', '--out', str(tmp_path / 'x.png'),
            '--model-kwargs', 'img_size=32', 'patch_size=4', 'depth=1']
    assert cli_main(base + ['--query', '32,0']) == 2
    err = capsys.readouterr().err
    assert 'query 32,0 is outside the 32x32 model input: X must be in [0, 31] and Y in [0, 31]' in err
    assert cli_main(base + ['--query', '3;4']) == 2
    assert "--query must be X,Y in pixels" in capsys.readouterr().err
    assert cli_main(base + ['--layers', 'blocks.7.attn']) == 2
    assert "no ConvNN layer named ['blocks.7.attn']; layers: blocks.0.attn" in capsys.readouterr().err
    assert cli_main(['info', 'resnet5O_convnn']) == 2
    assert 'did you mean: resnet50_convnn' in capsys.readouterr().err
    assert cli_main(['list', 'nothing_like_this']) == 2
    assert "no ConvNN model matches 'nothing_like_this'" in capsys.readouterr().err
    assert not (tmp_path / 'x.png').exists()
    with pytest.raises(ValueError, match='unknown model'):
        check_model_name('vit_convnn')


def test_neighbors_cli_bad_files_are_one_line_errors(tmp_path, capsys):
    # missing / damaged checkpoints and images name the file; a checkpoint of another shape says it does not fit
    torch.save(_vit(num_classes=3).state_dict(), tmp_path / 'other.pth')
    data = (tmp_path / 'other.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint\n')
    base = ['neighbors', 'vit_tiny_convnn_random', '--img-size', '32', '--out', str(tmp_path / 'x.png'),
            '--model-kwargs', 'img_size=32', 'patch_size=4', 'depth=2']
    cases = [(['--checkpoint', str(tmp_path / 'missing.pth')], 'no checkpoint file at '),
             (['--checkpoint', str(tmp_path / 'truncated.pth')], 'is not a readable torch checkpoint'),
             (['--checkpoint', str(tmp_path / 'garbage.pth')], 'is not a readable torch checkpoint'),
             (['--checkpoint', str(tmp_path / 'other.pth')],
              'does not fit vit_tiny_convnn_random: Error(s) in loading'),
             (['--image', str(tmp_path / 'missing.png')], 'cannot read the image'),
             (['--image', str(tmp_path / 'garbage.pth')], 'cannot read the image')]
    for extra, message in cases:
        assert cli_main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith('timm-convnn neighbors: error: ') and message in err and extra[1] in err, err
        assert 'Traceback' not in err and 'weights_only' not in err
    assert not (tmp_path / 'x.png').exists()


def test_neighbors_cli_missing_pretrained_weights_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from .hub_cache import use_cache
    use_cache(monkeypatch, tmp_path / 'hub')  # offline, empty: timm's weights for the warm start are not there
    argv = ['neighbors', 'vit_tiny_convnn_random', '--pretrained', '--out', str(tmp_path / 'x.png')]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-convnn neighbors: error: Could not load pretrained weights for vit_tiny_convnn_random')
    assert 'not in the local Hugging Face cache' in err and 'Traceback' not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'x.png').exists()


def test_list_rows_match_the_models(capsys):
    assert cli_main(['list', 'vit_tiny_convnn_random', '--no-flops']) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith('| vit_')]
    assert [r.split(' | ')[0] for r in rows] == ['| vit_tiny_convnn_random', '| vit_tiny_convnn_random_k16']
    cells = [c.strip() for c in rows[0].strip('|').split('|')]
    params = count_params(timm.create_model('vit_tiny_convnn_random', device='meta')) / 1e6
    assert cells[1] == f'{params:.2f}' and cells[3:8] == ['ConvNNAttention', 'random', '9', '32', 'dot']
    assert cells[8] == 'from_timm_augreg_in21k_ft_in1k'
    s = model_summary('resnet18_convnn_branch')
    assert s['candidates'] == 'all' and s['num_samples'] is None and s['branch_ratio'] == 0.5
    assert s['num_layers'] == 16 and 1.0 < s['gflops'] < 20.0  # 224 px, ConvNN 3x3s + timm's other convs
    # a tagged name is summarised as its architecture, tags included
    tagged = model_summary('vit_tiny_convnn_random.from_timm_augreg_in21k_ft_in1k', flops=False)
    assert tagged['tags'] == ['from_timm_augreg_in21k_ft_in1k']


def test_info_json(capsys):
    assert cli_main(['info', 'vit_small_convnn_spatial_k16', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['convnn_options']['num_neighbors'] == 16 and info['convnn_options']['candidates'] == 'spatial'
    assert list(info['convnn_layers'].values()) == [12]
    assert info['default_pretrained_cfg']['architecture'] == 'vit_small_convnn_spatial_k16'
    tag = 'vit_small_convnn_spatial_k16.from_timm_augreg_in21k_ft_in1k'
    assert info['pretrained_tags'][tag]['hf_hub_id'] == 'timm/vit_small_patch16_224.augreg_in21k_ft_in1k'
    assert cli_main(['info', 'resnet50_convnn_branch']) == 0
    text = capsys.readouterr().out
    assert 'branch_ratio = 0.5' in text and 'timm/resnet50.a1_in1k' in text
    counts = [int(line.split(' x ')[0]) for line in text.splitlines() if ' x ConvNN2d(' in line]
    assert sum(counts) == 16 and len(counts) == 7  # 16 ConvNN 3x3s in 7 distinct shapes / strides


def test_list_gflops_column_unless_no_flops(capsys):
    from timm_convnn.utils import count_flops
    name = 'vit_tiny_convnn_random_k16'
    flops = count_flops(timm.create_model(name, device='meta'), (3, 224, 224)) / 1e9
    for extra, gflops in (([], f'{flops:.2f}'), (['--no-flops'], '-')):
        assert cli_main(['list', name] + extra) == 0
        rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(f'| {name} |')]
        assert len(rows) == 1 and [c.strip() for c in rows[0].strip('|').split('|')][2] == gflops, (extra, rows)


def test_query_index_and_positions_are_raster_order_on_a_non_square_grid():
    from timm_convnn.inspect import LayerNeighbors
    # a class token, then 2 rows of 3 patch tokens
    m = LayerNeighbors('x', 'ConvNNAttention', torch.arange(7).view(1, 1, 1, 7), None, (2, 3), (2, 3),
                       num_prefix_tokens=1)
    assert [m.query_index(r, c) for r in range(2) for c in range(3)] == [1, 2, 3, 4, 5, 6]
    for r, c in ((2, 0), (0, 3), (-1, 0)):
        with pytest.raises(ValueError, match='outside its 2 x 3 query grid'):
            m.query_index(r, c)
    rows, cols = m.positions()
    assert rows.flatten().tolist() == [-1, 0, 0, 0, 1, 1, 1] and cols.flatten().tolist() == [-1, 0, 1, 2, 0, 1, 2]


def test_strided_cnn_layer_on_an_odd_map_records_every_output_pixel():
    from timm_convnn.layers import ConvNN2d
    model = torch.nn.Sequential(ConvNN2d.from_conv2d(torch.nn.Conv2d(4, 8, 3, stride=2, padding=1))).eval()
    x = torch.randn(1, 4, 15, 15)
    with torch.no_grad():
        out_hw = tuple(model(x).shape[-2:])
    m = neighbors(model, x)['0']
    assert m.query_grid == out_hw == (8, 8) and m.key_grid == (15, 15) and m.stride == 2
    assert m.indices.shape[2] == out_hw[0] * out_hw[1]


def test_a_layer_run_twice_is_recorded_twice():
    from timm_convnn.layers import ConvNN2d
    layer = ConvNN2d.from_conv2d(torch.nn.Conv2d(4, 4, 3, padding=1))
    maps = neighbors(torch.nn.Sequential(layer, layer).eval(), torch.randn(1, 4, 6, 6))
    assert list(maps) == ['0', '0#2']


def test_list_pattern_word_matches_as_a_substring():
    from timm_convnn.catalog import convnn_model_names
    every = timm.list_models('*convnn*')
    assert convnn_model_names('random') == [n for n in every if 'random' in n]
    assert 'vit_tiny_convnn_random' in convnn_model_names('random')
    assert convnn_model_names('vit_tiny*') == [n for n in every if n.startswith('vit_tiny')]


def test_figure_size_fits_its_panels_in_rows_of_at_most_four():
    from timm_convnn.viz import COLUMNS, PAD, PANEL, TITLE
    assert COLUMNS == 4
    width = lambda cols, panel=PANEL: cols * (panel + PAD) + PAD  # noqa: E731
    height = lambda rows, panel=PANEL: rows * (panel + TITLE + PAD) + PAD  # noqa: E731
    assert figure_size(1) == (width(1), height(1)) and figure_size(3) == (width(3), height(1))
    assert figure_size(4) == (width(4), height(1)) and figure_size(5) == (width(4), height(2))
    assert figure_size(9) == (width(4), height(3)) and figure_size(2, panel=100) == (width(2, 100), height(1, 100))


def test_query_x_is_the_column_and_y_the_row(tmp_path):
    # query (x 28, y 2) of a 32 px input on 8 x 8 patches: the outlined cell is the top-right one of the panel
    from timm_convnn.viz import PAD, PANEL, TITLE
    out = tmp_path / 'q.png'
    neighbor_map(_vit(depth=1), str(out), query=(28, 2), layers=['blocks.0.attn'], img_size=32)
    png, cell = Image.open(out), PANEL // 8

    def outlined(row, col):
        x0, y0 = PAD + col * cell, PAD + TITLE + row * cell
        return QUERY_RGB in {png.getpixel((x, y)) for x in range(x0, x0 + cell) for y in range(y0, y0 + cell)}
    assert outlined(0, 7) and not outlined(7, 0)
