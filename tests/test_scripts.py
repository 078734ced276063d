"""timm's own scripts with ConvNN models: launcher, configs, train/validate/benchmark on the digits ImageFolder.

timm ships train.py / validate.py / benchmark.py / inference.py only in its git repository (not in the wheel or sdist),
so the tests that run them need ``TIMM_SCRIPTS_DIR`` (a folder holding them) and are skipped without it.
"""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import timm
import torch
import timm_convnn  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = os.environ.get('TIMM_SCRIPTS_DIR')
TIMM_SCRIPTS = ('train.py', 'validate.py', 'benchmark.py', 'inference.py')
needs_scripts = pytest.mark.skipif(
    not SCRIPTS, reason=f'TIMM_SCRIPTS_DIR is not set: timm\'s {" / ".join(TIMM_SCRIPTS)} are not in timm\'s wheel or '
                        'sdist; point it at a checkout of timm\'s repository to run these tests')
CONFIGS = sorted((ROOT / 'configs').glob('*.yaml'))
ENV = dict(os.environ, OMP_NUM_THREADS='2')


def _run(args, timeout=900, check=True, env=None):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f'{" ".join(map(str, args))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n'
                             f'{out.stderr[-5000:]}')
    return out


@needs_scripts
def test_timm_scripts_dir_holds_the_scripts():
    # one clear failure for a TIMM_SCRIPTS_DIR that lacks a script, rather than "can't open file" in each test using it
    missing = [name for name in TIMM_SCRIPTS if not (Path(SCRIPTS) / name).is_file()]
    assert not missing, f'TIMM_SCRIPTS_DIR={SCRIPTS} lacks {", ".join(missing)} (copy them from timm\'s repository)'


# -- always: launcher, configs, shell launchers -------------------------------------------------------------------

def test_launcher_runs_a_script_as_main_with_models_registered(tmp_path):
    script = tmp_path / 'probe.py'
    # one write(2) per process: under torchrun both ranks share the stdout pipe, and print()'s separate pieces
    # interleaved ("argvargv ['--b'] ..."); a single write below PIPE_BUF bytes is atomic
    script.write_text('import os, sys, timm\n'
                      'assert __name__ == "__main__"\n'
                      'assert "vit_tiny_convnn_random" in timm.list_models("*convnn*")\n'
                      'line = f"argv {sys.argv[1:]} script {sys.argv[0].endswith(\'probe.py\')}\\n"\n'
                      'os.write(1, line.encode())\n')
    out = _run([sys.executable, '-m', 'timm_convnn.run', str(script), '--a', '1'])
    assert "argv ['--a', '1'] script True" in out.stdout
    # and under torchrun (two processes on the CPU)
    out = _run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m', 'timm_convnn.run',
                str(script), '--b'])
    assert out.stdout.count("argv ['--b'] script True") == 2
    missing = _run([sys.executable, '-m', 'timm_convnn.run', str(tmp_path / 'nope.py')], check=False)
    assert missing.returncode == 2 and 'no such script' in missing.stderr  # (python's own code for it)


def test_launcher_gives_randaugment_its_zero_bit_posterize_on_every_pillow():
    # timm's RandAugment posterizes to 0 bits at level 10 (PosterizeIncreasing), which Pillow < 13 made a black image
    # and Pillow >= 13 refuses: the launcher gives timm's op the black image back there, and leaves other bits alone
    # (a subprocess: the patch is the launched script's, not this test process's)
    code = '''
import PIL, numpy as np
from PIL import Image, ImageOps
from timm.data.auto_augment import AugmentOp
from timm_convnn.run import posterize_zero_bits_as_black
img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
def op(level):
    return np.asarray(AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=level)(img))
try:
    ImageOps.posterize(img, 0)
    refuses = False
except ValueError:
    refuses = True
    try:
        op(10)
        raise AssertionError('timm posterized to 0 bits on a Pillow that refuses them')
    except ValueError:
        pass
assert posterize_zero_bits_as_black() == refuses
assert op(10).shape == (4, 4, 3) and not op(10).any()  # 0 bits: black
assert (op(5) == np.asarray(ImageOps.posterize(img, 2))).all()  # other levels: Pillow's own
print('pillow', PIL.__version__, 'refuses 0 bits:', refuses)
'''
    out = _run([sys.executable, '-c', code])
    assert 'refuses 0 bits' in out.stdout


def test_patched_randaugment_pickles_for_spawned_workers(tmp_path):
    # DataLoader workers started with spawn / forkserver (macOS's and Windows' default) get the transform pickled
    # and unpickle it in a fresh interpreter: the patched op must pickle by name and work there, unpatched
    import pickle
    from timm.data import create_transform
    from timm_convnn import run
    saved = run.auto_augment.posterize, dict(run.auto_augment.NAME_TO_OP)
    try:
        patched = run.posterize_zero_bits_as_black()  # (Pillow >= 13; older ones keep timm's op)
        tf = create_transform(32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1')
        (tmp_path / 'tf.pkl').write_bytes(pickle.dumps(tf))
    finally:
        run.auto_augment.posterize = saved[0]
        run.auto_augment.NAME_TO_OP.clear()
        run.auto_augment.NAME_TO_OP.update(saved[1])
    code = f'''
import pickle, numpy as np
from PIL import Image
tf = pickle.loads(open({str(tmp_path / 'tf.pkl')!r}, 'rb').read())
ops = [op for t in tf.transforms if hasattr(t, 'ops') for op in t.ops if op.name == 'PosterizeIncreasing']
assert ops, 'no posterize op in the policy'
img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
assert not np.asarray(ops[0].aug_fn(img, 0)).any()  # 0 bits: black, in a process that never patched timm
print('ok', ops[0].aug_fn.__module__)
'''
    module = 'timm_convnn.run' if patched else 'timm.data.auto_augment'
    assert _run([sys.executable, '-c', code]).stdout.strip() == f'ok {module}'


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_config_names_a_registered_model(config):
    cfg = yaml.safe_load(config.read_text())
    assert cfg['model'] in timm.list_models('*convnn*')
    assert all('-' not in k for k in cfg), 'YAML keys are train.py dests (underscores)'


@pytest.mark.parametrize('script', ['train_single.sh', 'train_torchrun.sh', 'train_multinode.sh'])
def test_shell_launchers_print_the_command(script, tmp_path):
    path = ROOT / 'train_scripts' / script
    out = _run(['bash', str(path), '--help'])
    assert out.stdout.startswith(f'usage: train_scripts/{script} CONFIG DATA_DIR')
    env = dict(ENV, TIMM_SCRIPTS_DIR=str(tmp_path), DRY_RUN='1', MASTER_ADDR='10.0.0.1', NNODES='2', NODE_RANK='1',
               NPROC='4')
    out = _run(['bash', str(path), 'configs/x.yaml', '/data', '--epochs', '1'], env=env)
    line = out.stdout.strip()
    assert f'-m timm_convnn.run {tmp_path}/train.py -c configs/x.yaml --data-dir /data --epochs 1' in line
    if script != 'train_single.sh':
        assert '--nproc_per_node 4' in line
    if script == 'train_multinode.sh':
        assert '--nnodes 2' in line and '--node_rank 1' in line and '--rdzv_endpoint 10.0.0.1:29500' in line
    assert _run(['bash', str(path)], check=False).returncode == 2


# -- with timm's scripts -----------------------------------------------------------------------------------------

@needs_scripts
def test_config_keys_are_train_py_options():
    import importlib.util
    spec = importlib.util.spec_from_file_location('timm_train_script', Path(SCRIPTS) / 'train.py')
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # defines the parser; main() runs only as __main__
    dests = {a.dest for a in train.parser._actions} | {a.dest for a in train.config_parser._actions}
    for config in CONFIGS:
        unknown = set(yaml.safe_load(config.read_text())) - dests
        assert not unknown, f'{config.name}: not train.py options: {unknown}'


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('digits')
    _run([sys.executable, '-m', 'timm_convnn', 'digits', str(root), '--img-size', '32'])
    return root


VIT_ARGS = ['--model', 'vit_tiny_convnn_random', '--model-kwargs', 'img_size=32', 'patch_size=4', 'embed_dim=32',
            'depth=2', 'num_heads=2']
DATA_ARGS = ['--num-classes', '10', '--input-size', '3', '32', '32', '--mean', '0.5', '0.5', '0.5', '--std', '0.5',
             '0.5', '0.5', '--crop-pct', '1.0', '--interpolation', 'bicubic', '--device', 'cpu', '-j', '0']
TRAIN_ARGS = ['--epochs', '1', '--warmup-epochs', '0', '--opt', 'adamw', '--lr', '2e-3', '-b', '64', '--hflip', '0',
              '--scale', '0.75', '1', '--color-jitter', '0', '--checkpoint-hist', '1', '--log-interval', '10']


def _summary(run_dir):
    with open(run_dir / 'summary.csv') as f:
        return [r for r in csv.DictReader(f) if r['epoch'] != 'epoch']  # a resumed run repeats the header


@pytest.fixture(scope='module')
def trained_vit(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    _run([sys.executable, '-m', 'timm_convnn.run', f'{SCRIPTS}/train.py', '--data-dir', str(digits_dir),
          '--output', str(out), '--experiment', 'vit', '--model-ema', *VIT_ARGS, *DATA_ARGS, *TRAIN_ARGS])
    return out / 'vit'


@needs_scripts
def test_train_vit_via_launcher_then_validate_reproduces_top1(trained_vit, digits_dir):
    rows = _summary(trained_vit)
    assert len(rows) == 1 and (trained_vit / 'model_best.pth.tar').exists()
    # trained with --model-ema: train.py reports (and selects on) the EMA weights' metrics
    # validate.py unmodified and without the launcher: the autoload hook registers the models
    out = _run([sys.executable, f'{SCRIPTS}/validate.py', '--data-dir', str(digits_dir),
                '--checkpoint', str(trained_vit / 'model_best.pth.tar'), '--use-ema', '-b', '64', *VIT_ARGS,
                *DATA_ARGS])
    result = json.loads(out.stdout[out.stdout.index('--result') + len('--result'):])
    assert result['top1'] == pytest.approx(float(rows[0]['eval_top1']), abs=1e-3)


@needs_scripts
def test_train_resnet_via_device_modules_and_resume(digits_dir, tmp_path):
    # (with --grad-checkpointing: timm's set_grad_checkpointing, whose numerics test_cnn.py checks)
    args = ['--data-dir', str(digits_dir), '--output', str(tmp_path), '--experiment', 'resnet',
            '--device-modules', 'timm_convnn', '--model', 'resnet18_convnn_branch', '--grad-checkpointing',
            *DATA_ARGS, *TRAIN_ARGS]
    # --device-modules registers the models by itself: autoload off here
    env = dict(ENV, TIMM_CONVNN_AUTOLOAD='0')
    _run([sys.executable, f'{SCRIPTS}/train.py', *args], env=env)
    run = tmp_path / 'resnet'
    assert len(_summary(run)) == 1
    out = _run([sys.executable, f'{SCRIPTS}/train.py', *args, '--resume', str(run / 'last.pth.tar'),
                '--epochs', '2'], env=env)
    assert re.search(r'Restoring model state from checkpoint|Loaded checkpoint', out.stdout + out.stderr)
    assert [r['epoch'] for r in _summary(run)] == ['0', '1']
    from timm_convnn.hub import read_train_summary
    assert read_train_summary(run / 'summary.csv')['epochs'] == 2


@pytest.fixture(scope='module')
def digits_subset(digits_dir, tmp_path_factory):
    """8 training and 4 validation images per class: a recipe's first epoch in seconds."""
    import shutil
    root = tmp_path_factory.mktemp('digits_subset')
    for split, count in (('train', 8), ('validation', 4)):
        for cls in sorted((digits_dir / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for image in sorted(cls.iterdir())[:count]:
                shutil.copy(image, root / split / cls.name / image.name)
    return root


# per recipe: what makes its first epoch small here (data, batch, and for the large models a small model)
RECIPE_OVERRIDES = {
    'cifar10_vgg11_convnn_branch_paper': [],
    'cifar10_vit_tiny_convnn_paper': ['--input-size', '3', '32', '32', '--model-kwargs', 'num_heads=1', 'img_size=32',
                                      'patch_size=4', 'depth=2'],
    'digits_vit_tiny_convnn': [],
    'imagenet_resnet50_convnn_branch': ['--img-size', '32'],
    'imagenet_vit_base_convnn_all_k16': ['--img-size', '32', '--model-kwargs', 'img_size=32', 'patch_size=4',
                                         'depth=1', 'embed_dim=64', 'num_heads=2'],
}


@needs_scripts
@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_trains_an_epoch_with_train_py(config, digits_subset, tmp_path):
    # each recipe, unchanged but for data and size, through the launcher: one epoch and its evaluation. The paper
    # recipes' constant lr is sched 'constant' (the repository's train.py fails on 'none'); the ImageNet recipes'
    # RandAugment runs under the launcher's posterize fix on Pillow >= 13
    args = [sys.executable, '-m', 'timm_convnn.run', f'{SCRIPTS}/train.py', '-c', str(config), '--dataset', '',
            '--data-dir', str(digits_subset), '--train-split', 'train', '--val-split', 'validation',
            '--num-classes', '10', '--epochs', '1', '--warmup-epochs', '0', '-b', '16', '--workers', '0',
            '--device', 'cpu', '--output', str(tmp_path), '--experiment', 'run', '--amp-dtype', 'bfloat16',
            *RECIPE_OVERRIDES[config.stem]]
    _run(args, timeout=600)
    rows = _summary(tmp_path / 'run')
    assert len(rows) == 1 and float(rows[0]['eval_top1']) >= 0
    if 'paper' in config.stem:
        assert float(rows[0]['lr']) == yaml.safe_load(config.read_text())['lr']  # held constant


@needs_scripts
@pytest.mark.parametrize('bench', ['inference', 'train'])
def test_benchmark_py(bench):
    out = _run([sys.executable, f'{SCRIPTS}/benchmark.py', '--bench', bench,  # zero-touch: no launcher
                '--device', 'cpu', '--num-warm-iter', '1', '--num-bench-iter', '5', '-b', '4', *VIT_ARGS,
                '--img-size', '32'])
    result = json.loads(out.stdout[out.stdout.index('--result') + len('--result'):])
    key = 'infer_samples_per_sec' if bench == 'inference' else 'train_samples_per_sec'
    assert result['model'] == 'vit_tiny_convnn_random' and result[key] > 0


@needs_scripts
def test_inference_py_zero_touch(trained_vit, digits_dir, tmp_path):
    out = _run([sys.executable, f'{SCRIPTS}/inference.py', str(digits_dir / 'validation'), '--checkpoint',
                str(trained_vit / 'model_best.pth.tar'), '-b', '64', '--topk', '3', '--results-dir', str(tmp_path),
                '--results-format', 'csv', '--no-console-results', *VIT_ARGS, *DATA_ARGS])
    with open(next(tmp_path.glob('*.csv'))) as f:
        rows = list(csv.DictReader(f))
    images = sorted(p.name for p in (digits_dir / 'validation').rglob('*.png'))
    assert sorted(Path(r['filename']).name for r in rows) == images
    for r in rows:  # top-3 class probabilities of the trained convnn model, best first
        probs = [float(v) for v in r['prob'].strip('[]').split()]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


@needs_scripts
def test_export_a_real_train_py_checkpoint(trained_vit, tmp_path, monkeypatch):
    # issue "Hub": converting a train.py checkpoint (EMA or not) is one command
    from timm_convnn import hub
    from .hub_cache import use_cache
    for ema in (False, True):
        out = tmp_path / f'export-{ema}'
        _run([sys.executable, '-m', 'timm_convnn', 'export', str(trained_vit / 'model_best.pth.tar'), str(out)]
             + (['--ema'] if ema else []))
        card = (out / 'README.md').read_text()
        assert '| epochs | 1 |' in card and "| `model` | `'vit_tiny_convnn_random'` |" in card
        cache = use_cache(monkeypatch, tmp_path / 'hub')
        cache.add_folder(f'org/digits-{ema}', out)
        model = timm.create_model(f'hf-hub:org/digits-{ema}', pretrained=True)
        arch, sd, _ = hub.load_train_checkpoint(trained_vit / 'model_best.pth.tar', use_ema=ema)
        assert all((model.state_dict()[k] == v).all() for k, v in sd.items())


# -- on a CUDA GPU (benchmarks/gpu_check.sh, stage scripts): the same scripts on the fused Triton kernels -------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (the fused Triton kernels under timm's scripts; the CPU tests above run the PyTorch path)")
CUDA_ENV = dict(ENV, TIMM_CONVNN_BACKEND='triton')  # an error, not the PyTorch path, where Triton cannot run
# every script through the launcher: on the GPU machine the package may run from the source tree (PYTHONPATH, no
# install: benchmarks/gpu_check.sh), without the start-up hook that registers the models (zero-touch: the CPU tests)
CUDA_DATA_ARGS = [a if a != 'cpu' else 'cuda' for a in DATA_ARGS]
CUDA_VIT_ARGS = ['--model', 'vit_tiny_convnn_all_k16', '--model-kwargs', 'img_size=32', 'patch_size=4',
                 'embed_dim=64', 'depth=2', 'num_heads=2']
# long enough to learn (the later options win): on the CPU this model reached 50-64 % top-1 after 5 epochs with seeds 0,
# 1 and 2 (the first 1-2 epochs near chance)
CUDA_LEARNS = ['--epochs', '5', '--lr', '1e-3', '-b', '32', '--sched', 'constant']


@pytest.fixture(scope='module')
def cuda_trained_vit(digits_dir, tmp_path_factory):
    # --amp: train.py's default float16 autocast with its loss scaler, what most timm users train with (the harness
    # times bf16); the row kernel's forward and backward in half precision
    out = tmp_path_factory.mktemp('cuda-runs')
    _run([sys.executable, '-m', 'timm_convnn.run', f'{SCRIPTS}/train.py', '--data-dir', str(digits_dir), '--output',
          str(out), '--experiment', 'vit', '--amp', *CUDA_VIT_ARGS, *CUDA_DATA_ARGS, *TRAIN_ARGS, *CUDA_LEARNS],
         env=CUDA_ENV)
    return out / 'vit'


@needs_scripts
@needs_cuda
def test_cuda_train_py_fp16_amp_then_validate_py_reproduces_top1(cuda_trained_vit, digits_dir):
    rows = _summary(cuda_trained_vit)
    assert [r['epoch'] for r in rows] == ['0', '1', '2', '3', '4']
    for r in rows:  # float16 overflow in the kernels would show as inf / nan losses (the scaler skips such steps)
        assert all(math.isfinite(float(r[k])) for k in ('train_loss', 'eval_loss')), r
    best = max(float(r['eval_top1']) for r in rows)  # model_best: the best epoch's weights
    assert best >= 30, rows  # learns: 10 % is chance on the digits
    # the same batches as train.py's evaluation (-b 32): the eval kernels are deterministic, so the same top-1
    out = _run([sys.executable, '-m', 'timm_convnn.run', f'{SCRIPTS}/validate.py', '--data-dir', str(digits_dir),
                '--checkpoint', str(cuda_trained_vit / 'model_best.pth.tar'), '--amp', '-b', '32', *CUDA_VIT_ARGS,
                *CUDA_DATA_ARGS], env=CUDA_ENV)
    result = json.loads(out.stdout[out.stdout.index('--result') + len('--result'):])
    assert result['top1'] == pytest.approx(best, abs=1e-3)


@needs_scripts
@needs_cuda
def test_cuda_train_py_resnet_branch_bf16_selection_kernel(digits_dir, tmp_path):
    # ConvNN2d on CUDA: the selection kernel, PyTorch aggregation; bf16 autocast hands it fp32 cosine features
    _run([sys.executable, '-m', 'timm_convnn.run', f'{SCRIPTS}/train.py', '--data-dir', str(digits_dir), '--output',
          str(tmp_path), '--experiment', 'resnet', '--amp', '--amp-dtype', 'bfloat16', '--model',
          'resnet18_convnn_branch', *CUDA_DATA_ARGS, *TRAIN_ARGS], env=CUDA_ENV)
    rows = _summary(tmp_path / 'resnet')
    assert len(rows) == 1 and all(math.isfinite(float(rows[0][k])) for k in ('train_loss', 'eval_loss')), rows


@needs_scripts
@needs_cuda
@pytest.mark.parametrize('bench', ['inference', 'train'])
def test_cuda_benchmark_py(bench):
    out = _run([sys.executable, '-m', 'timm_convnn.run', f'{SCRIPTS}/benchmark.py', '--bench', bench, '--device',
                'cuda', '--amp', '--num-warm-iter', '2', '--num-bench-iter', '5', '-b', '64', *CUDA_VIT_ARGS,
                '--img-size', '32'], env=CUDA_ENV)
    result = json.loads(out.stdout[out.stdout.index('--result') + len('--result'):])
    key = 'infer_samples_per_sec' if bench == 'inference' else 'train_samples_per_sec'
    assert result['model'] == 'vit_tiny_convnn_all_k16' and result[key] > 0


def test_launcher_without_a_script_prints_its_usage_and_fails(capsys):
    # as python without a script to run: usage and exit 2; --help asked for: usage and exit 0
    from timm_convnn import run
    for argv, code in (([], 2), (['--help'], 0), (['-h'], 0)):
        with pytest.raises(SystemExit) as info:
            run.main(argv)
        assert info.value.code == code, argv
        assert 'python -m timm_convnn.run PATH/TO/train.py' in capsys.readouterr().out


def test_launcher_puts_the_script_folder_first_on_the_path(tmp_path, monkeypatch):
    # as `python SCRIPT` does: a script importing a module next to it (train.py's own helpers) finds it
    from timm_convnn import run
    monkeypatch.setattr(run, 'posterize_zero_bits_as_black', lambda: False)  # (leave timm's RandAugment alone)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    (tmp_path / 'sibling_of_probe_7f3a.py').write_text('VALUE = 42\n')
    (tmp_path / 'probe.py').write_text('import sys, sibling_of_probe_7f3a\n'
                                       'sys.modules["_probe_result_7f3a"] = (sibling_of_probe_7f3a.VALUE, sys.argv)\n')
    monkeypatch.delitem(sys.modules, 'sibling_of_probe_7f3a', raising=False)
    monkeypatch.delitem(sys.modules, '_probe_result_7f3a', raising=False)
    run.main([str(tmp_path / 'probe.py'), '--x'])
    assert sys.modules.pop('_probe_result_7f3a') == (42, [str(tmp_path / 'probe.py'), '--x'])
    assert sys.path[0] == str(tmp_path)
    sys.modules.pop('sibling_of_probe_7f3a', None)


def test_zero_bit_posterize_is_black_in_the_images_mode_and_size():
    import numpy as np
    from PIL import Image, ImageOps
    from timm_convnn.run import posterize_or_black
    for mode in ('L', 'RGB'):
        img = Image.new(mode, (3, 2), 200 if mode == 'L' else (200, 100, 50))
        black = posterize_or_black(img, 0)
        assert (black.mode, black.size) == (mode, (3, 2)) and not np.asarray(black).any()
        assert np.array_equal(np.asarray(posterize_or_black(img, 2)), np.asarray(ImageOps.posterize(img, 2)))
