"""Zero-touch registration: installing timm-convnn is enough, programs never have to ``import timm_convnn``.

Every check runs in a fresh interpreter (the hook acts at interpreter start and on the first ``import timm``), from a
scratch working directory so the repository is not on ``sys.path``. The tests expect the README's install
(``pip install -e ".[test]"``): its ``timm_convnn-autoload.pth`` is what they exercise; the wheel and editable
install paths are also built and checked from scratch in throwaway environments.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import timm
import timm_convnn  # noqa: F401  (this process builds the fixtures; the child processes never import it)
from timm_convnn import hub

from .hub_cache import HubCache, add_timm_stand_in

ROOT = Path(__file__).resolve().parents[1]
PTH = 'timm_convnn-autoload.pth'
HEAVY = ('torch', 'timm', 'timm_convnn', 'numpy')
CONVNN_NAMES = timm.list_models('*convnn*')


def _python(code, *args, cwd, extra_env=None, python=sys.executable, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ('TIMM_CONVNN_AUTOLOAD', 'PYTHONPATH')}
    env.update(OMP_NUM_THREADS='1', **(extra_env or {}))
    out = subprocess.run([str(python), '-c', code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f'child failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}')
    return out


_START_STATE = ('import sys\n'
                'heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)\n'
                'hooked = any(type(f).__name__ == "_TimmImportHook" for f in sys.meta_path)\n'
                'print(json.dumps(dict(hook_module="_timm_convnn_autoload" in sys.modules, hooked=hooked, '
                'heavy=heavy)))'
                % (HEAVY,))


def test_interpreter_start_installs_the_hook_and_imports_nothing_heavy(tmp_path):
    out = _python('import json\n' + _START_STATE, cwd=tmp_path)
    assert json.loads(out.stdout) == dict(hook_module=True, hooked=True, heavy=[]), (
        f'{PTH} is not active in this environment: reinstall with pip install -e ".[test]"')


def test_a_program_that_never_imports_the_plugin(tmp_path):
    cache = HubCache(tmp_path / 'hub')
    # a registered convnn tag with weights (warm start from a stand-in of timm's repo), and an exported checkpoint
    source = timm.models.get_pretrained_cfg('vit_tiny_convnn_random').hf_hub_id.split('/', 1)[1]
    _, weights = add_timm_stand_in(cache, tmp_path, source)
    model = timm.create_model('vit_tiny_convnn_random', img_size=32, patch_size=4, num_neighbors=6).eval()
    cache.add_folder('org/zero-touch', hub.save(model, tmp_path / 'export'))
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    with torch.no_grad():
        expect = model(x)
    code = (
        'import sys, torch\n'
        'from safetensors.torch import load_file\n'
        'assert "timm_convnn" not in sys.modules\n'
        'import timm\n'
        'names = timm.list_models("*convnn*")\n'
        'm = timm.create_model("vit_base_convnn_all_k16")\n'
        'assert type(m.blocks[0].attn).__module__.startswith("timm_convnn"), type(m.blocks[0].attn)\n'
        'tagged = timm.create_model("vit_tiny_convnn_random", pretrained=True)\n'
        'sd, src = tagged.state_dict(), load_file(sys.argv[1])\n'
        'shared = [k for k in sd if k in src]\n'
        'assert len(shared) > 100 and all(torch.equal(sd[k], src[k]) for k in shared)\n'
        'hub_model = timm.create_model("hf-hub:org/zero-touch", pretrained=True).eval()\n'
        'with torch.no_grad():\n'
        '    torch.save(hub_model(torch.load(sys.argv[2], weights_only=True)), sys.argv[3])\n'
        'print(",".join(names))\n')
    out = _python(code, weights, tmp_path / 'x.pt', tmp_path / 'y.pt', cwd=tmp_path,
                  extra_env=dict(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hub')))
    assert out.stdout.split()[-1].split(',') == CONVNN_NAMES
    assert torch.equal(torch.load(tmp_path / 'y.pt', weights_only=True), expect)


def test_autoload_off_and_explicit_registration_still_work(tmp_path):
    code = ('import sys, timm\n'
            'assert timm.list_models("*convnn*") == [] and "timm_convnn" not in sys.modules\n'
            'import timm_convnn\n'
            'print(len(timm.list_models("*convnn*")))\n')
    for off in ('0', 'OFF'):
        out = _python(code, cwd=tmp_path, extra_env=dict(TIMM_CONVNN_AUTOLOAD=off))
        assert int(out.stdout) == len(CONVNN_NAMES)
    # the launcher registers the models itself
    probe = tmp_path / 'probe.py'
    probe.write_text('import timm\nprint(len(timm.list_models("*convnn*")))\n')
    out = _python('import runpy, sys; sys.argv = ["timm_convnn.run", sys.argv[1]]; '
                  'runpy.run_module("timm_convnn.run", run_name="__main__")', probe, cwd=tmp_path,
                  extra_env=dict(TIMM_CONVNN_AUTOLOAD='0'))
    assert int(out.stdout) == len(CONVNN_NAMES)


_REGISTRY = ('import json, sys, timm\n'
             'from timm.models import _registry as reg\n'
             'out = {}\n'
             'for name, fn in sorted(reg._model_entrypoints.items()):\n'
             '    tags = sorted(reg._model_with_tags[name])\n'
             '    cfgs = {t: reg._model_pretrained_cfgs[t].to_dict() for t in tags\n'
             '            if t in reg._model_pretrained_cfgs}\n'
             '    out[name] = dict(module=reg._model_to_module[name], fn=fn.__module__, tags=tags, cfgs=cfgs)\n'
             'json.dump(out, open(sys.argv[1], "w"), default=str)\n')


def test_autoload_overwrites_no_timm_name(tmp_path):
    before, after = tmp_path / 'off.json', tmp_path / 'on.json'
    _python(_REGISTRY, before, cwd=tmp_path, extra_env=dict(TIMM_CONVNN_AUTOLOAD='0'))
    on = _python(_REGISTRY, after, cwd=tmp_path)
    assert 'Overwriting' not in on.stderr
    timm_reg, reg = json.loads(before.read_text()), json.loads(after.read_text())
    assert len(timm_reg) > 1000 and not any('convnn' in n for n in timm_reg)
    changed = [n for n in timm_reg if reg.get(n) != timm_reg[n]]
    assert not changed, f'autoload changed timm registrations: {changed[:10]}'
    added = sorted(set(reg) - set(timm_reg))
    assert added == CONVNN_NAMES
    assert all(reg[n]['fn'].startswith('timm_convnn.models.') for n in added)


@pytest.mark.parametrize('error', ['ImportError', 'RuntimeError'])
def test_a_broken_plugin_never_breaks_timm(error, tmp_path):
    # e.g. a torch the plugin cannot use: importing timm still works, and one warning names the cause
    fake = tmp_path / 'fake' / 'timm_convnn'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text(f'raise {error}("simulated: libtorch_cpu.so is broken")\n')
    code = ('import timm\n'
            'import timm.models\n'
            'm = timm.create_model("resnet18", num_classes=3)\n'
            'print(len(timm.list_models("*convnn*")), sum(p.numel() for p in m.parameters()) > 0)\n')
    out = _python(code, cwd=tmp_path, extra_env=dict(PYTHONPATH=str(fake.parent)))
    assert out.stdout.split() == ['0', 'True']
    assert out.stderr.count('RuntimeWarning') == 1, out.stderr
    assert f'could not register its models with timm: {error}: simulated: libtorch_cpu.so is broken' in out.stderr
    assert 'TIMM_CONVNN_AUTOLOAD=0' in out.stderr


def test_probing_for_timm_does_not_consume_the_hook(tmp_path):
    # libraries (transformers, ...) call importlib.util.find_spec("timm") to see whether it is installed
    code = ('import importlib.util, sys\n'
            'assert importlib.util.find_spec("timm") is not None and "timm" not in sys.modules\n'
            'import timm\n'
            'print(len(timm.list_models("*convnn*")), type(timm.__loader__).__name__, '
            'type(timm.__spec__.loader).__name__)\n')
    out = _python(code, cwd=tmp_path)
    n, loader, spec_loader = out.stdout.split()
    assert int(n) == len(CONVNN_NAMES)
    assert loader == spec_loader != '_RegisterAfterExec'  # timm's module keeps its own loader


def _scratch_env(tmp_path, name):
    """A venv without pip whose interpreter also sees this environment's packages (torch, timm) as plain path
    entries: this environment's .pth files (its own timm-convnn install) are not processed there."""
    env_dir = tmp_path / name
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(env_dir)], check=True)
    python = env_dir / ('Scripts/python.exe' if os.name == 'nt' else 'bin/python')
    site = Path(_python('import sysconfig; print(sysconfig.get_paths()["purelib"])', cwd=tmp_path,
                        python=python).stdout.strip())
    (site / '_parent_env.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    return python, site


def _pip(python, *args):
    out = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), *args, '--quiet',
                          '--disable-pip-version-check'], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize('kind', ['wheel', 'editable'])
def test_wheel_and_editable_installs_register_on_import_timm(kind, tmp_path):
    python, site = _scratch_env(tmp_path, kind)
    if kind == 'wheel':
        wheels = tmp_path / 'wheels'
        out = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--quiet', '-w', str(wheels),
                              str(ROOT)], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        _pip(python, 'install', '--no-deps', str(next(wheels.glob('timm_convnn-*.whl'))))
        assert (site / PTH).is_file() and (site / '_timm_convnn_autoload.py').is_file()
        expected_home = site / 'timm_convnn'
    else:
        _pip(python, 'install', '--no-deps', '-e', str(ROOT))
        assert (site / PTH).is_file()
        expected_home = ROOT / 'timm_convnn'
    start = json.loads(_python('import json\n' + _START_STATE, cwd=tmp_path, python=python).stdout)
    assert start == dict(hook_module=True, hooked=True, heavy=[])
    code = ('import sys, timm\n'
            'print(len(timm.list_models("*convnn*")), sys.modules["timm_convnn"].__file__)\n')
    n, where = _python(code, cwd=tmp_path, python=python).stdout.split()
    assert int(n) == len(CONVNN_NAMES) and Path(where).parent == expected_home
    # uninstalling removes the start-up file with the package
    _pip(python, 'uninstall', '--yes', 'timm-convnn')
    assert not (site / PTH).exists()
    start = json.loads(_python('import json\n' + _START_STATE, cwd=tmp_path, python=python).stdout)
    assert start == dict(hook_module=False, hooked=False, heavy=[])
