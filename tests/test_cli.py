"""The command line: the operator self-check reports measured numbers and fails red; the console script exists."""
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

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
    status = r'^fused GPU kernels: (available with triton \S+ \(|off, the PyTorch path runs: )'
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
    assert selfcheck.fused_kernels_status().startswith('fused GPU kernels: available with triton 3.8.0 (')


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
