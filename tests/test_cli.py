"""The command line: the operator self-check reports measured numbers and fails red; the console script exists."""
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from timm_convnn import cli, selfcheck


def test_console_script_installed():
    eps = [ep for ep in entry_points(group='console_scripts') if ep.name == 'timm-convnn']
    assert len(eps) == 1 and eps[0].load() is cli.main
    script = Path(sys.executable).parent / 'timm-convnn'
    exe = str(script) if script.exists() else shutil.which('timm-convnn')
    assert exe, 'the timm-convnn console script is not installed (pip install -e .)'
    out = subprocess.run([exe, '--version'], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith('timm-convnn ')


def test_selfcheck_prints_measurements():
    out = subprocess.run([sys.executable, '-m', 'timm_convnn', 'selfcheck', '--quick'], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert 'all identities hold' in text
    rows = re.findall(r'^(attention|convolution) identity .* ([0-9.]+e[-+][0-9]+) +([0-9.]+e[-+][0-9]+) +ok$',
                      text, flags=re.M)
    assert len(rows) == 6, text
    for _, err, tol in rows:
        assert float(err) <= float(tol)
    assert len(re.findall(r'K=16 +[0-9.]+ ms +[0-9.]+ ms +[0-9.]+x', text)) == 2, text
    status = r'^fused GPU kernels: (available with triton \S+ on |off, the PyTorch path runs: |not used here, no CUDA)'
    assert re.search(status, text, flags=re.M), text


def test_selfcheck_says_why_the_fused_kernels_are_off(monkeypatch):
    if selfcheck.triton_attention.triton is None:
        assert 'triton is not installed' in selfcheck.fused_kernels_status()
        return
    monkeypatch.setattr(selfcheck.triton_attention, '_INSTALL_REASON', selfcheck.triton_attention._too_old('3.3.1'))
    assert selfcheck.fused_kernels_status() == (
        'fused GPU kernels: off, the PyTorch path runs: triton 3.3.1 is too old for the fused ConvNN kernels (they '
        'need triton >= 3.4, which torch >= 2.8 brings)')
    monkeypatch.setattr(selfcheck.triton_attention.triton, '__version__', '3.8.0')
    monkeypatch.setattr(selfcheck.triton_attention, '_INSTALL_REASON', selfcheck.triton_attention._too_old('3.8.0'))
    expected = 'available with triton 3.8.0 on ' if torch.cuda.is_available() else \
        'not used here, no CUDA GPU on this machine (triton 3.8.0 can run them on an NVIDIA GPU of compute '
    assert selfcheck.fused_kernels_status().startswith('fused GPU kernels: ' + expected)


def test_selfcheck_reports_failure(monkeypatch, capsys):
    # a broken identity must turn the exit status red
    real = selfcheck._conv_identity

    def broken(*args):
        c = real(*args)
        c.error = 1.0
        return c

    monkeypatch.setattr(selfcheck, '_conv_identity', broken)
    assert cli.main(['selfcheck', '--quick']) == 1
    assert 'FAIL' in capsys.readouterr().out


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_digits_into_an_unwritable_path_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('')
    assert cli.main(['digits', str(tmp_path / 'a_file' / 'digits')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-convnn digits: error: cannot write the digits ImageFolder to ') and 'a_file' in err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f'timm-convnn {command}: error: '), err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_demo_and_bench_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch):
    # argparse's own error (exit 2) for epochs; a file where the export folder goes is found before training
    for epochs in ('0', '-1', 'x'):
        with pytest.raises(SystemExit) as info:
            cli.main(['demo', '--epochs', epochs])
        assert info.value.code == 2
    assert 'argument --epochs: ' in capsys.readouterr().err
    (tmp_path / 'a_file').write_text('')
    import timm_convnn.demo
    monkeypatch.setattr(timm_convnn.demo, 'run_demo', lambda **kw: pytest.fail('trained before checking --out-dir'))
    assert cli.main(['demo', '--out-dir', str(tmp_path / 'a_file')]) == 2
    assert 'a_file is a file, not a folder' in _one_line_error(capsys, 'demo')
    # bench: --model-kwargs items and names the models do not take, and --out, before anything is timed
    pair = ['--models', '--pairs', 'vit_tiny_convnn_random:vit_tiny_patch16_224', '--out', str(tmp_path / 'b')]
    assert cli.main(['bench', *pair, '--model-kwargs', 'bogus=1']) == 2
    assert "vit_tiny_convnn_random does not take {'bogus': 1}" in _one_line_error(capsys, 'bench')
    assert cli.main(['bench', *pair, '--model-kwargs', 'img_size']) == 2
    assert "--model-kwargs takes KEY=VALUE items; got 'img_size'" in _one_line_error(capsys, 'bench')
    assert cli.main(['bench', '--ops', '--out', str(tmp_path / 'a_file')]) == 2
    assert 'is a file, not a folder' in _one_line_error(capsys, 'bench')
    assert not (tmp_path / 'b').exists()


def test_digits_without_scikit_learn_says_what_to_install(tmp_path, capsys, monkeypatch):
    for name in ('sklearn', 'sklearn.datasets'):  # (an import of either then raises ImportError)
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(['digits', str(tmp_path / 'd')]) == 2
    assert 'pip install "timm-convnn[demo]"' in _one_line_error(capsys, 'digits')


def test_unknown_pretrained_tag_names_the_valid_tags(tmp_path, capsys):
    # timm raises "RuntimeError: Invalid pretrained tag", naming no valid tag
    assert cli.main(['info', 'vit_tiny_convnn_all.bogus_tag']) == 2
    err = _one_line_error(capsys, 'info')
    assert "unknown pretrained tag 'bogus_tag' for vit_tiny_convnn_all; its tags: from_timm_augreg_in21k_ft_in1k" in err
    assert cli.main(['neighbors', 'resnet18_convnn.bogus', '--img-size', '32', '--out', str(tmp_path / 'x.png')]) == 2
    assert "unknown pretrained tag 'bogus' for resnet18_convnn; its tags: from_timm_a1_in1k" in _one_line_error(
        capsys, 'neighbors')
    assert not (tmp_path / 'x.png').exists()
    assert cli.main(['info', 'vit_tiny_convnn_all.from_timm_augreg_in21k_ft_in1k', '--json']) == 0


def test_neighbors_model_kwargs_the_model_does_not_take(tmp_path, capsys):
    argv = ['neighbors', 'vit_tiny_convnn_random', '--out', str(tmp_path / 'x.png'), '--model-kwargs', 'foo=1']
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, 'neighbors')
    assert 'cannot create vit_tiny_convnn_random with foo=1: ' in err and "unexpected keyword argument 'foo'" in err
    assert cli.main(['neighbors', 'resnet18_convnn', '--out', str(tmp_path / 'x.png'), '--model-kwargs',
                     'img_size=64']) == 2  # CNNs take no img_size
    assert "unexpected keyword argument 'img_size'" in _one_line_error(capsys, 'neighbors')
    assert not (tmp_path / 'x.png').exists()


def test_neighbors_out_is_checked_before_the_model_runs(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, '_create_model', lambda *a, **k: ran.append(1))
    for out, message in ((tmp_path / 'x.txt', "not an image file extension PIL writes: '.txt'"),
                         (tmp_path / 'x.psd', "not an image file extension PIL writes: '.psd'"),  # (PIL reads it)
                         (tmp_path / 'nowhere' / 'x.png', f'no folder {tmp_path / "nowhere"}')):
        assert cli.main(['neighbors', 'resnet18_convnn', '--img-size', '32', '--out', str(out)]) == 2
        assert message in _one_line_error(capsys, 'neighbors')
    assert not ran


def test_files_that_are_not_checkpoints_are_one_line_errors(tmp_path, capsys):
    import torch
    (tmp_path / 'junk.pth').write_bytes(b'junk\n')  # torch's weights-only unpickler: KeyError
    torch.save([torch.ones(2)], tmp_path / 'list.pth')  # timm's loader: 'list' object has no attribute 'items'
    cases = [('junk.pth', 'is not a readable'), ('list.pth', 'is not a')]
    for name, message in cases:
        path = str(tmp_path / name)
        neighbors = ['neighbors', 'resnet18_convnn', '--img-size', '32', '--checkpoint', path,
                     '--out', str(tmp_path / 'x.png')]
        for argv in (neighbors, ['export', path, str(tmp_path / 'out')], ['push', path, 'org/x', '--dry-run']):
            assert cli.main(argv) == 2, argv
            err = _one_line_error(capsys, argv[0])
            assert message in err and path in err
    assert not (tmp_path / 'x.png').exists()


def test_img_size_must_be_positive(tmp_path, capsys):
    from timm_convnn.data import write_digits_imagefolder
    digits = ['digits', str(tmp_path / 'd')]
    neighbors = ['neighbors', 'resnet18_convnn', '--out', str(tmp_path / 'x.png')]
    for argv, size in ((digits, '0'), (digits, '-3'), (neighbors, '0')):
        with pytest.raises(SystemExit) as info:
            cli.main(argv + ['--img-size', size])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f'argument --img-size: must be a positive number of pixels, got {size}' in err and 'Traceback' not in err
    with pytest.raises(ValueError, match='img_size must be a positive whole number of pixels, got 0'):
        write_digits_imagefolder(tmp_path / 'd', img_size=0)
    assert not (tmp_path / 'd').exists() and not (tmp_path / 'x.png').exists()


def test_neighbors_feeds_models_of_one_channel_grayscale(tmp_path, capsys):
    from PIL import Image
    from timm_convnn.viz import figure_size
    out = tmp_path / 'grey.png'
    base = ['neighbors', 'resnet18_convnn', '--img-size', '32', '--layers', 'layer1.0.conv1', '--out', str(out)]
    assert cli.main(base + ['--model-kwargs', 'in_chans=1']) == 0  # the conv rejected the 3-channel input
    assert Image.open(out).size == figure_size(1)
    out.unlink()
    assert cli.main(base + ['--model-kwargs', 'in_chans=4']) == 2
    assert 'the model takes 4 input channels (in_chans=4); images convert to 3 (RGB) or 1 (grayscale) only' in \
        _one_line_error(capsys, 'neighbors')
    assert not out.exists()


def test_neighbors_img_size_builds_the_vit_for_it(tmp_path, capsys):
    import torch
    # --img-size alone builds a fixed-size ViT for that size; --model-kwargs img_size=N alone makes the input N
    small = ['patch_size=4', 'depth=1']
    runs = {'img-size': ['--img-size', '32', '--model-kwargs'] + small,
            'model-kwargs': ['--model-kwargs', 'img_size=32'] + small,
            'both': ['--img-size', '32', '--model-kwargs', 'img_size=32'] + small}
    for run, extra in runs.items():
        torch.manual_seed(0)  # the same random init in every run
        assert cli.main(['neighbors', 'vit_tiny_convnn_random', '--out', str(tmp_path / f'{run}.png')] + extra) == 0
        assert 'query pixel (16, 16)' in capsys.readouterr().out
    assert (tmp_path / 'img-size.png').read_bytes() == (tmp_path / 'both.png').read_bytes()
    assert (tmp_path / 'model-kwargs.png').read_bytes() == (tmp_path / 'both.png').read_bytes()
    assert cli.main(['neighbors', 'vit_tiny_convnn_random', '--out', str(tmp_path / 'x.png'), '--img-size', '64',
                     '--model-kwargs', 'img_size=32'] + small) == 2
    assert 'Conflicting input image sizes' in _one_line_error(capsys, 'neighbors')


def test_neighbors_img_size_with_pretrained_vit_weights(tmp_path, monkeypatch, capsys):
    # timm resamples the 224 px position embedding of the warm-start weights to the 64 px model
    from .hub_cache import add_timm_stand_in, use_cache
    add_timm_stand_in(use_cache(monkeypatch, tmp_path / 'hub'), tmp_path, 'vit_tiny_patch16_224.augreg_in21k_ft_in1k')
    argv = ['neighbors', 'vit_tiny_convnn_all', '--pretrained', '--img-size', '64', '--layers', 'blocks.0.attn',
            '--out', str(tmp_path / 'x.png')]
    assert cli.main(argv) == 0
    assert 'query pixel (32, 32)' in capsys.readouterr().out


def test_cli_defaults_are_the_api_defaults():
    # `timm-convnn demo` trains as long as run_demo() does, `timm-convnn digits` writes the size the API writes
    import inspect
    from timm_convnn.data import write_digits_imagefolder
    from timm_convnn.demo import run_demo
    parser = cli.build_parser()
    assert parser.parse_args(['demo']).epochs == inspect.signature(run_demo).parameters['epochs'].default
    assert parser.parse_args(['digits', 'd']).img_size == \
        inspect.signature(write_digits_imagefolder).parameters['img_size'].default


def test_model_kwargs_items_without_a_value_are_argparse_errors(tmp_path, capsys):
    for argv in (['neighbors', 'resnet18_convnn', '--out', str(tmp_path / 'x.png')],
                 ['export', str(tmp_path / 'c.pth'), str(tmp_path / 'out')]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv + ['--model-kwargs', 'in_chans'])
        assert info.value.code == 2
        assert "argument --model-kwargs: expected KEY=VALUE, got 'in_chans'" in capsys.readouterr().err
    assert not (tmp_path / 'x.png').exists() and not (tmp_path / 'out').exists()


def test_neighbors_pretrained_and_checkpoint_are_exclusive(tmp_path, capsys):
    argv = ['neighbors', 'resnet18_convnn', '--pretrained', '--checkpoint', str(tmp_path / 'missing.pth'),
            '--out', str(tmp_path / 'x.png')]
    assert cli.main(argv) == 2
    assert 'use --pretrained or --checkpoint, not both' in _one_line_error(capsys, 'neighbors')
    assert not (tmp_path / 'x.png').exists()


def test_neighbors_counts_a_layer_named_twice_once(tmp_path, capsys):
    out = tmp_path / 'x.png'
    argv = ['neighbors', 'resnet18_convnn', '--img-size', '32', '--out', str(out), '--layers', 'layer1.0.conv1',
            'layer1.0.conv1']
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith(f'wrote {out} (') and ': 1 ConvNN layers of resnet18_convnn, query pixel' in text, text


def test_selfcheck_marks_each_failing_identity_and_times_both_candidate_modes(monkeypatch, capsys):
    real, timed = selfcheck._conv_identity, []

    def broken(*args):
        c = real(*args)
        c.error = 1.0
        return c

    monkeypatch.setattr(selfcheck, '_conv_identity', broken)
    monkeypatch.setattr(selfcheck, '_speed', lambda *a: timed.append(a[5]) or [f'{a[5]:>7} K={a[4]:<3}'])
    assert selfcheck.run_selfcheck(quick=True) == 1
    text = capsys.readouterr().out
    assert len(re.findall(r'^convolution identity .* FAIL$', text, flags=re.M)) == 3, text
    assert len(re.findall(r'^attention identity .* ok$', text, flags=re.M)) == 3, text
    assert '3 identity check(s) FAILED' in text and sorted(timed) == ['all', 'random']


def test_selfcheck_speed_ratio_is_convnn_time_over_sdpa_time(monkeypatch):
    times = iter([2.0, 6.0])
    monkeypatch.setattr(selfcheck, '_time_ms', lambda fn, repeats: next(times))
    cells = selfcheck._speed(1, 17, 32, 2, 4, 'all', 1)
    convnn_ms, sdpa_ms, ratio = (float(c.strip().rstrip('msx ')) for c in cells[1:])
    assert sorted([convnn_ms, sdpa_ms]) == [2.0, 6.0] and ratio == pytest.approx(convnn_ms / sdpa_ms, abs=0.01)


def test_selfcheck_error_is_the_largest_deviation(monkeypatch):
    # an identity broken at one output element only must fail: the check reports max |diff|, not an average
    from timm_convnn import layers

    class OneOff(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            out = self.conv(x).clone()
            out.view(-1)[0] += 1e-3
            return out

    monkeypatch.setattr(layers.ConvNN2d, 'from_conv2d', staticmethod(OneOff))
    check = selfcheck._conv_identity(4, 6, 1, 3, torch.float64)
    assert check.error == pytest.approx(1e-3) and not check.ok
