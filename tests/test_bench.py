"""The benchmark harness: its paper-style implementation is the same operator, its memory meter counts right, and
``timm-convnn bench`` writes JSON, markdown and a plot. (Speed itself is measured by the harness, never asserted.)"""
import json

import pytest
import torch

from timm_convnn.bench import _LiveTensorBytes, measure, paper_convnn_attention
from timm_convnn.cli import main as cli_main
from timm_convnn.layers import ConvNNAttention
from timm_convnn.layers import triton_attention


@pytest.mark.parametrize('mode', ['all', 'random', 'spatial'])
def test_paper_style_code_is_the_same_operator(mode):
    torch.manual_seed(0)
    heads, d, n = 2, 8, 50  # 1 prefix token + 7 x 7 patches
    layer = ConvNNAttention(heads * d, num_heads=heads, num_neighbors=6, candidates=mode, num_samples=20,
                            num_prefix_tokens=1, grid_size=(7, 7)).double().eval()
    with torch.no_grad():
        layer.aggregate.weight.normal_()
    q, k, v = (torch.randn(2, heads, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours = layer.convnn_mix(q, k, v)
    cand = layer._candidate_ids(n, q.device)
    assert (cand is None) == (mode == 'all')
    ref = paper_convnn_attention(q, k, v, layer.aggregate.weight.view(heads, d, 6), 6, cand)
    assert (ours - ref).abs().max() < 1e-12
    g = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-10


def test_live_tensor_meter():
    mode = _LiveTensorBytes()
    with mode:
        a = torch.zeros(1024, 256)  # 1 MiB
        b = a + 1  # 2 MiB live
        del a
        c = b * 2  # still 2 MiB live: a was freed
        del b, c
        d = torch.zeros(3 * 1024, 256)  # 3 MiB
        view = d[:10]  # a view: no new bytes
        del d, view
    assert mode.peak == 3 * 2 ** 20 and mode.current == 0
    # measure() reports the peak above what existed before the call
    keep = torch.zeros(4096, 256)
    res = measure(lambda: keep * 3, torch.device('cpu'), warmup=0, iters=1)
    assert res['peak_bytes'] == keep.numel() * 4 and res['ms'] > 0


def test_convnn_core_keeps_far_less_than_the_paper_style_code():
    torch.manual_seed(0)
    heads, d, n, kk = 6, 16, 3137, 16  # the 56 x 56 map of the memory target
    layer = ConvNNAttention(heads * d, num_heads=heads, num_neighbors=kk)
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    w = layer.aggregate.weight.detach().view(heads, d, kk)

    def step(fn):
        return lambda: fn().sum().backward()
    ours = measure(step(lambda: layer.convnn_mix(q, k, v)), torch.device('cpu'), warmup=0, iters=1)['peak_bytes']
    paper = measure(step(lambda: paper_convnn_attention(q, k, v, w, kk)), torch.device('cpu'), warmup=0,
                    iters=1)['peak_bytes']
    n_by_n = heads * n * n * 4
    assert paper > 2 * n_by_n  # dense scores + topk's dense gradient
    assert ours < 0.5 * n_by_n  # one bounded score slice at a time; nothing n x n or (B, H, D, n, K) kept
    assert paper / ours > 5, (paper, ours)  # the performance issue's memory target at n = 3137


def test_bench_counts_the_layers_that_run_fused_kernels(monkeypatch):
    # read from a meta-device forward, each layer counted once: the fused forward, or the top-K selection alone
    from timm_convnn.bench import _fused_layers
    from timm_convnn.layers import get_backend, set_backend, triton_attention
    monkeypatch.setattr(triton_attention, 'triton_unavailable_reason', lambda device: None)  # as if Triton ran
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    vit = dict(img_size=96, patch_size=8, depth=3)  # 144 patches: more than the 64 random candidates
    saved = get_backend()
    try:
        set_backend('auto')
        assert _fused_layers('vit_tiny_convnn_all_k16', vit, cuda, None) == 3
        assert _fused_layers('vit_tiny_convnn_all_k16', dict(vit, weighting='ones'), cuda, None) == 3
        assert _fused_layers('vit_tiny_convnn_random', vit, cuda, None) == 3  # sampled candidates too
        assert _fused_layers('vit_tiny_convnn_random', dict(vit, weighting='ones'), cuda, None) == 3  # selection
        assert _fused_layers('resnet50_convnn_branch', {}, cuda, 64) == 7  # stages 1 and 2 (64 / 128 channels)
        assert _fused_layers('resnet50_convnn_branch', {}, cpu, 64) == 0
        assert _fused_layers('resnet50_convnn_branch', dict(candidates='random'), cuda, 64) == 7
        assert _fused_layers('vit_tiny_convnn_random', vit, cpu, None) == 0
        set_backend('triton')
        assert _fused_layers('vit_tiny_convnn_random', vit, cpu, None) == 3
        assert _fused_layers('resnet50_convnn_branch', {}, cpu, 64) == 7
        set_backend('torch')
        assert _fused_layers('resnet50_convnn_branch', {}, cuda, 64) == 0
        assert _fused_layers('vit_tiny_convnn_random', vit, cuda, None) == 0
    finally:
        set_backend(saved)


def test_bench_cli_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / 'bench'
    assert cli_main(['bench', '--ops', '--models', '--device', 'cpu', '--tokens', '65', '--neighbors', '9',
                     '--modes', 'all', 'random', '--heads', '2', '--head-dim', '16', '--num-samples', '16',
                     '--warmup', '0', '--iters', '1', '--pairs', 'vit_tiny_convnn_random:vit_tiny_patch16_224',
                     '--model-kwargs', 'img_size=32', 'patch_size=4', 'depth=2', '--batch-size', '2',
                     '--backends', 'auto', 'torch', '--op-batches', '65:3', '--kernel-config', 'bwd_row_copies=2',
                     '--out', str(out)]) == 0
    result = json.loads((out / 'results.json').read_text())
    # the kernel launch settings hold for the run only, and are recorded with its results
    assert result['kernel_config'] == {'bwd_row_copies': 2} and triton_attention.CONFIG['bwd_row_copies'] is None
    assert result['environment']['device'] == 'cpu' and result['environment']['torch'] == torch.__version__
    ops = result['ops']
    assert sorted({(r['impl'], r['mode']) for r in ops}) == [
        ('convnn', 'all'), ('convnn', 'random'), ('paper', 'all'), ('paper', 'random'), ('sdpa', 'dense')]
    assert all(r['pass_'] in ('fwd', 'fwd+bwd') and r['ms'] > 0 and r['time_vs_sdpa'] > 0 for r in ops)
    # CPU tensors: 'auto' runs the PyTorch path, so the two backends are one timed case, labelled with what ran
    assert sorted(r['backend'] for r in ops if r['impl'] == 'convnn' and r['pass_'] == 'fwd') == ['torch', 'torch']
    assert [(r['model'], r['backend'], r['fused_layers']) for r in result['models']] == [
        ('vit_tiny_convnn_random', 'torch', 0), ('vit_tiny_patch16_224', None, 0)]
    sdpa = [r for r in ops if r['impl'] == 'sdpa']
    assert all(r['time_vs_sdpa'] == 1.0 for r in sdpa)
    models = {r['model']: r for r in result['models']}
    convnn = models['vit_tiny_convnn_random']
    assert convnn['baseline'] == 'vit_tiny_patch16_224' and convnn['img_size'] == 32
    assert convnn['train_vs_baseline'] == pytest.approx(
        convnn['train_img_s'] / models['vit_tiny_patch16_224']['train_img_s'])
    md = (out / 'results.md').read_text()
    assert md.splitlines()[0].endswith(', fp32, bwd_row_copies=2.')
    assert ops[0]['batch'] == 3
    assert '| convnn (torch) | 65 | 3 | 9 | random (r 16) | fwd+bwd |' in md
    assert '| vit_tiny_convnn_random (torch) | 2 | 32 |' in md and '| vit_tiny_patch16_224 | 2 | 32 |' in md
    from PIL import Image
    assert Image.open(out / 'ops.png').size[0] > 300


@pytest.mark.parametrize('args, message', [
    (['--op-batches', '65:x'], "--op-batches takes N:B with positive integers; got '65:x'"),
    (['--op-batches', '65:0'], "--op-batches takes N:B with positive integers; got '65:0'"),
    (['--models', '--pairs', 'vit_tiny_convnn_all'], "--pairs takes CONVNN:TIMM; got 'vit_tiny_convnn_all'"),
    (['--models', '--pairs', 'vit_tiny_convn_all:vit_tiny_patch16_224'],
     "unknown model 'vit_tiny_convn_all'; did you mean: vit_tiny_convnn_all"),
    (['--tokens', '197', '1'], '--tokens must be >= 2 (a class token and at least one patch); got 1'),
    (['--neighbors', '0'], '--neighbors must be >= 1; got 0'),
    (['--iters', '0'], '--iters must be >= 1; got 0'),
    (['--modes', 'grid'], "--modes takes all, random, spatial; got 'grid'"),
    (['--modes', 'all', 'random', '--neighbors', '9', '16', '--num-samples', '12'],
     '--num-samples r must be >= every K of --neighbors for --modes random; got r=12, K=16'),
    (['--kernel-config', 'fwd_blockm=32'],
     "--kernel-config takes KEY=VALUE items with KEY one of fwd_block_m, fwd_warps"),
    (['--kernel-config', 'fwd_block_m'], "got 'fwd_block_m'"),
    (['--device', 'gpu0'], "--device 'gpu0' is not a torch device"),
    pytest.param(['--device', 'cuda'], '--device cuda: torch sees no CUDA device here; use --device cpu',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a CUDA device')),
])
def test_bench_cli_rejects_bad_options(tmp_path, capsys, args, message):
    argv = ['bench', '--device', 'cpu', '--out', str(tmp_path / 'b')]
    argv += args if '--models' in args else ['--ops'] + args
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    # before anything is timed or written
    assert 'ms' not in captured.out and not (tmp_path / 'b' / 'results.json').exists(), captured.out


def _run_benchmark_script(tmp_path, script: str, argv: list, before: str = '', context: str = '',
                          after: str = '') -> str:
    """benchmarks/``script`` run as __main__ with ``argv`` in a fresh interpreter (the benchmarks folder on its path,
    as when run from there): the source lines ``before``, the run (inside ``with context:`` if given), ``after``.
    Returns its stdout; fails on a non-zero exit."""
    import os
    import subprocess
    import sys
    folder = os.path.join(os.path.dirname(__file__), '..', 'benchmarks')
    run = f'runpy.run_path({os.path.join(folder, script)!r}, run_name="__main__")\n'
    code = (f'import runpy, sys\nsys.path.insert(0, {folder!r})\n{before}sys.argv = [sys.argv[0]] + {argv!r}\n'
            + (f'with {context}:\n    {run}' if context else run) + after)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_fused_memory_script_runs_the_fused_path_without_a_gpu(tmp_path):
    # benchmarks/fused_memory.py: the fused path forced on CPU with kernels that do nothing (what autograd keeps is
    # real); the ConvNN model must have gone through the fused op, and its peak is reported against timm's. A dispatch
    # mode sees the custom op (with one active, the fused path does not take the eager shortcut)
    seen = ('calls = []\n'
            'from torch.utils._python_dispatch import TorchDispatchMode\n'
            'class Seen(TorchDispatchMode):\n'
            '    def __torch_dispatch__(self, func, types, args=(), kwargs=None):\n'
            '        if "convnn_attention" in str(func): calls.append(str(func))\n'
            '        return func(*args, **(kwargs or {}))\n')
    stdout = _run_benchmark_script(
        tmp_path, 'fused_memory.py',
        ['--models', 'vit_tiny_convnn_all_k16', 'vit_tiny_patch16_224', '--batch-size', '2', '--img-size', '64'],
        before=seen, context='Seen()', after='print("CALLS", len(calls))\n')
    lines = stdout.splitlines()
    convnn, = [line for line in lines if line.startswith('vit_tiny_convnn_all_k16')]
    timm_line, = [line for line in lines if line.startswith('vit_tiny_patch16_224')]
    assert timm_line.endswith('x1.000') and 'MiB' in convnn
    # 12 blocks, two train steps (warm-up and measured): a forward and a backward op per block and step
    assert lines[-1] == 'CALLS 48', lines[-1]


def test_stream_rounds_counts_a_blocks_merge_rounds(tmp_path):
    # benchmarks/stream_rounds.py models the streaming forward's merge loop: a tile costs as many rounds as the block's
    # busiest query has insertions from it. Query 0 sees ever larger scores (every tile puts K = 4 into its buffer),
    # query 1 ever smaller ones (only the first tile does): 4 tiles of 8 keys -> 16 rounds, 16 and 4 insertions
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'stream_rounds.py')
    spec = importlib.util.spec_from_file_location('stream_rounds', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    up = torch.arange(32.)
    assert module.merge_rounds(up[None], 4, 8) == (16, 16.)
    assert module.merge_rounds(up.flip(0)[None], 4, 8) == (4, 4.)
    assert module.merge_rounds(torch.stack([up, up.flip(0)]), 4, 8) == (16, 10.)
    stdout = _run_benchmark_script(tmp_path, 'stream_rounds.py', ['--tokens', '300', '--neighbors', '4', '--blocks',
                                                                  '2', '--block-queries', '16', '--smooth', '0'])
    line = stdout.splitlines()[-1]
    assert '16 queries per block  K  4' in line and 'merge rounds per block' in line, stdout
    # --threshold: the keys that CONFIG fwd_stream='threshold' keeps per query, at least those scoring the K-th
    # largest of the tiles' best values (1 or 2 per tile here); from too few values, all keys; equal values once
    assert module.threshold_counts(up[None], 4, 8, 1).tolist() == [25]  # tile maxima 7, 15, 23, 31: >= 7
    assert module.threshold_counts(up[None], 4, 8, 2).tolist() == [10]  # 7, 6, 15, 14, ..., 31, 30: >= 22
    assert module.threshold_counts(up[None, :16], 4, 8, 1).tolist() == [16]  # 2 values for K 4
    assert module.threshold_counts(torch.ones(1, 8), 2, 4, 2).tolist() == [8]  # values 1, -inf, 1, -inf
    stdout = _run_benchmark_script(tmp_path, 'stream_rounds.py', ['--tokens', '300', '--neighbors', '4', '--blocks',
                                                                  '2', '--block-queries', '16', '--smooth', '0',
                                                                  '--threshold'])
    line = stdout.splitlines()[-1]
    assert '4 per tile, keeps' in line and 'of blocks over 64' in line, stdout


def test_host_overhead_script_times_both_call_paths(tmp_path):
    # benchmarks/host_overhead.py: the host side of a fused call (kernels stubbed out), eager and through the
    # dispatcher; the dispatcher route must really have gone through the custom op, the eager one around it
    count = ('from timm_convnn.layers import triton_attention as ta\n'
             'seen = {"op": 0, "eager": 0}\n'
             'op, fn = ta._convnn_attention, ta._EagerAttention.apply\n'
             'ta._convnn_attention = lambda *a: seen.__setitem__("op", seen["op"] + 1) or op(*a)\n'
             'ta._EagerAttention.apply = lambda *a: seen.__setitem__("eager", seen["eager"] + 1) or fn(*a)\n')
    stdout = _run_benchmark_script(tmp_path, 'host_overhead.py',
                                   ['--heads', '2', '--tokens', '20', '--calls', '2', '--repeats', '2'],
                                   before=count, after='print("SEEN", seen["op"], seen["eager"])\n')
    rows = [line.split(' | ') for line in stdout.splitlines() if line.startswith('| 2 |')]
    assert [r[1] for r in rows] == ['forward', 'forward+backward'] and all(float(r[2]) > 0 for r in rows), stdout
    # per pass: 2 warm-up calls (calls // 4, at least 1: 1 here) and 2 x 2 timed calls per path
    assert stdout.splitlines()[-1] == 'SEEN 10 10', stdout


def test_profile_script_op_mode_runs_on_cpu():
    # benchmarks/profile_gpu.py --op (a device session's view of where the attention core's time goes), checked on CPU
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
    try:
        from profile_gpu import profile_op
    finally:
        sys.path.pop(0)
    from timm_convnn.layers import get_backend, set_backend
    before = get_backend()
    try:
        # (rows: every op of the call is listed, whatever the order of their times on this machine)
        text = profile_op('random:50:1', 'cpu', 'torch', rows=200, iters=2)
    finally:
        set_backend(before)
    head = text.splitlines()[0]
    assert head.startswith('== attention core random, n 50, batch 1') and 'wall ' in head, head
    assert 'aten::topk' in text  # the PyTorch path's selection ran and was profiled


_PARSE_ONLY = '''
import argparse, json, runpy, shlex, sys

class Parsed(Exception):
    pass

parse = argparse.ArgumentParser.parse_args

def parse_only(self, args=None, namespace=None):
    parse(self, args, namespace)  # exits 2 with argparse's message on an unknown flag or a bad value
    raise Parsed

argparse.ArgumentParser.parse_args = parse_only
for line in json.loads(sys.argv[1]):
    script, *args = shlex.split(line)
    sys.argv = [script] + args
    try:
        runpy.run_path(script, run_name='__main__')
    except Parsed:
        print('parsed', script, flush=True)
    else:
        sys.exit(script + ' ran past its argument parsing')
'''


def test_measure_counts_page_faults():
    # memory handed back to the OS and touched again faults in page by page, which CPU timings include: measure()
    # reports the host's minor page faults per timed call
    mmap = pytest.importorskip('mmap')
    pytest.importorskip('resource', reason='page faults are counted through getrusage (Unix)')
    pages = 256

    def touch_fresh_pages():
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        for offset in range(0, pages * mmap.PAGESIZE, mmap.PAGESIZE):
            m[offset] = 1
        m.close()

    assert measure(touch_fresh_pages, torch.device('cpu'), 1, 3, memory=False)['faults'] >= pages
    assert measure(lambda: None, torch.device('cpu'), 1, 3, memory=False)['faults'] < pages // 4


def _gpu_check_commands(root):
    """The ``python benchmarks/*.py ...`` command lines of benchmarks/gpu_check.sh, continuation lines joined, up to
    the output redirection / pipe."""
    import re
    text = _gpu_check_text(root)
    lines = []
    for match in re.finditer(r'python (benchmarks/\w+\.py[^|\n]*?)(?: 2>&1| >|\||$)', text, flags=re.M):
        lines.append(match.group(1).replace('"$out', '"/tmp/gpu-check-out'))
    return lines


def _gpu_check_text(root):
    """benchmarks/gpu_check.sh with its continuation lines joined."""
    return (root / 'benchmarks' / 'gpu_check.sh').read_text().replace('\\\n', ' ')


def test_gpu_check_script_commands_parse(tmp_path):
    # device time is counted in minutes and a GPU is drawn rarely: every benchmark command of the device script must
    # at least be accepted by its script's argument parser (checked here without running it), and the CUDA test
    # selection must select the CUDA tests
    import pathlib
    import re
    import shlex
    import subprocess
    import sys
    root = pathlib.Path(__file__).parent.parent
    lines = _gpu_check_commands(root)
    assert len(lines) >= 12 and {line.split()[0] for line in lines} == {
        'benchmarks/bench.py', 'benchmarks/kernel_sweep.py', 'benchmarks/profile_gpu.py', 'benchmarks/gpu_summary.py'}
    out = subprocess.run([sys.executable, '-c', _PARSE_ONLY, json.dumps(lines)], cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('parsed ') == len(lines)
    # --kernel-config items name launch settings the fused kernels have (checked after parsing, at run time)
    from timm_convnn.bench import _kernel_config
    configs = [shlex.split(line.split('--kernel-config', 1)[1].split(' --', 1)[0])
               for line in lines if '--kernel-config' in line]
    assert len(configs) >= 3 and all(_kernel_config(items) for items in configs)
    # its two pytest stages (built-in launches, then the opt-in ones: -m "not optin" / -m optin) split the CUDA tests
    marks = re.findall(r'python -m pytest .*? -m (".*?"|\w+) tests/test_triton\.py', _gpu_check_text(root))
    assert sorted(marks) == ['"not optin"', 'optin'], marks
    selected = {mark: _collected(root, 'cuda and not compile', shlex.split(mark)) for mark in [''] + marks}
    assert len(selected['']) >= 40 and all(selected[mark] for mark in marks)
    assert selected[marks[0]] | selected[marks[1]] == selected[''] and not selected[marks[0]] & selected[marks[1]]
    # the compile stage: the CUDA torch.compile tests, which the tests stages leave out
    keyword, = re.findall(r'python -m pytest -v -rs -k "([^"]*)" tests/test_triton\.py', _gpu_check_text(root))
    compiled = _collected(root, keyword, None)
    assert compiled and all('compile' in test_id for test_id in compiled) and not compiled & selected['']
    # the scripts stage: timm's scripts on the GPU, the tests of tests/test_scripts.py that need CUDA and only those
    keyword, = re.findall(r'python -m pytest .*? -k (\w+) tests/test_scripts\.py', _gpu_check_text(root))
    import tests.test_scripts as scripts
    on_cuda = {name for name, test in vars(scripts).items()
               if name.startswith('test_') and scripts.needs_cuda.mark in getattr(test, 'pytestmark', [])}
    selected = _collected(root, keyword, None, 'tests/test_scripts.py')
    assert len(selected) == 4 and {line.split('::')[1].split('[')[0] for line in selected} == on_cuda  # 3 + 1 param


def test_gpu_summary_reads_a_stored_h200_run(tmp_path):
    # what the next GPU session reads its decisions from (benchmarks/gpu_summary.py), on the stored H200 run of
    # 2026-11-30 laid out as gpu_check.sh lays out its output: ratios recomputed here from the raw rows, the target
    # verdicts (1.103x train memory is above 1.1x, which two decimals would hide), test counts of a finished quiet log
    # and of a -v log cut short, a variant run, the sweep's fastest launch, and what the budget skipped
    import pathlib
    import shutil
    import subprocess
    import sys
    root = pathlib.Path(__file__).parent.parent
    stored = root / 'benchmarks' / 'results'
    for folder, source in (('models', 'h200-models'), ('ops', 'h200-ops')):
        (tmp_path / folder).mkdir()
        shutil.copy(stored / source / 'results.json', tmp_path / folder)
    models = json.loads((stored / 'h200-models' / 'results.json').read_text())
    (tmp_path / 'compile').mkdir()
    (tmp_path / 'compile' / 'results.json').write_text(json.dumps(dict(models, models=[
        r for r in models['models'] if r['model'] in ('vit_base_convnn_all_k16', 'vit_base_patch16_224')
        and r['backend'] != 'torch'])))
    (tmp_path / 'variant-pairs').mkdir()
    (tmp_path / 'variant-pairs' / 'results.json').write_text(json.dumps(dict(models, kernel_config={
        'fwd_select': 'pairs'})))
    shutil.copy(stored / 'h200-kernel-sweep-b256.json', tmp_path / 'sweep.json')
    shutil.copy(stored / 'h200-test.log', tmp_path / 'test.log')
    (tmp_path / 'test-optin.log').write_text('tests/test_triton.py::test_a[x] PASSED  [ 50%]\n'
                                            'tests/test_triton.py::test_b[y] FAILED  [100%]\n')
    (tmp_path / 'skipped.txt').write_text('skipped, 3 s of the budget left: python benchmarks/bench.py --ops\n')

    def summary(folder):
        run = subprocess.run([sys.executable, str(root / 'benchmarks' / 'gpu_summary.py'), str(folder)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout

    out = summary(tmp_path)
    rows = {(r['model'], r['backend']): r for r in models['models']}
    vit, timm_vit = rows[('vit_base_convnn_all_k16', 'triton')], rows[('vit_base_patch16_224', None)]
    infer = vit['infer_img_s'] / timm_vit['infer_img_s']
    memory = vit['train_peak_bytes'] / timm_vit['train_peak_bytes']
    assert f'target infer_vs_baseline: {infer:.3f}, NOT met (>= 0.8)' in out and 0.69 < infer < 0.70
    assert f'target train_memory_vs_baseline: {memory:.3f}, NOT met (<= 1.1)' in out and 1.1 < memory < 1.105
    assert 'target train_vs_baseline: 0.794, met (>= 0.7)' in out
    assert out.count('- vit_base_convnn_all_k16 [triton], variant-pairs (fwd_select=pairs): inference 0.70x') == 1
    assert out.count('- vit_base_convnn_all_k16 [triton], built in, torch.compile: inference 0.70x') == 1
    ops = json.loads((stored / 'h200-ops' / 'results.json').read_text())['ops']
    sdpa = next(r['ms'] for r in ops if r['impl'] == 'sdpa' and r['n'] == 16385 and r['pass_'] == 'fwd+bwd')
    fused = {(r['mode'], r['K']): r['ms'] for r in ops if r['backend'] == 'triton' and r['n'] == 16385
             and r['pass_'] == 'fwd+bwd'}
    assert (f"n 16385, all, K 16, built in: {fused[('all', 16)] / sdpa:.2f}x SDPA's time; target time / SDPA's: "
            f"{fused[('all', 16)] / sdpa:.3f}, NOT met (<= 1)") in out
    speed_up = sdpa / fused[('random', 16)]
    assert f"random r 128, K 16, built in: 0.52x SDPA's time; target speed-up: {speed_up:.3f}, NOT met" in out
    assert 'n 3137' not in out  # the large-n targets start at 4096 tokens
    assert '- test.log: 11 deselected, 20 passed\n' in out
    assert '- test-optin.log: 1 failed, 1 passed (cut short' in out
    assert '  - failing: tests/test_triton.py::test_b[y]' in out and 'test_a' not in out
    assert 'sweep.json 256x12x197 fwd K 16: fastest 0.936 ms (block_m=64 warps=8 select=topk keys=packed' in out
    assert '- skipped, 3 s of the budget left: python benchmarks/bench.py --ops' in out

    empty = tmp_path / 'empty'
    empty.mkdir()
    out = summary(empty)
    assert '- test.log: missing' in out and '- test-compile.log: missing' in out
    assert '- no model-level results' in out and '- no operator-level results' in out


def test_model_ratios_are_written_as_each_pair_completes(monkeypatch):
    # a run cut short (a later pair failing, or the stage's time limit) keeps the ratios of the pairs it completed:
    # gpu_summary shows only rows that name their baseline
    from timm_convnn import bench
    monkeypatch.setattr(bench, '_fused_layers', lambda *a: 0)

    def timed(name, *args):
        if name == 'resnet50':
            raise RuntimeError('out of memory')
        return dict(model=name, infer_img_s=50. if 'convnn' in name else 100., train_img_s=10., train_peak_bytes=4,
                    infer_faults=None, train_faults=None)
    monkeypatch.setattr(bench, '_bench_model', timed)
    rows, seen = [], []
    pairs = [('vit_tiny_convnn_all', 'vit_tiny_patch16_224'), ('resnet50_convnn_branch', 'resnet50')]
    with pytest.raises(RuntimeError, match='out of memory'):
        bench.model_benchmark(torch.device('cpu'), pairs, 2, None, False, False, False, 0, 1, {}, ('auto',),
                              log=lambda line: seen.append([dict(r) for r in rows]), rows=rows)
    first = rows[0]
    assert first['model'] == 'vit_tiny_convnn_all' and first['baseline'] == 'vit_tiny_patch16_224'
    assert first['infer_vs_baseline'] == 0.5 and 'baseline' in seen[1][0]  # (in the results written with the pair)


def _gpu_check_dry(tmp_path, stages, budget):
    """benchmarks/gpu_check.sh with GPU_CHECK_DRY=1 (commands printed with their limits, each as if it took them all)
    in ``tmp_path``: (return code, stdout, stderr)."""
    import os
    import pathlib
    import subprocess
    script = pathlib.Path(__file__).parent.parent / 'benchmarks' / 'gpu_check.sh'
    env = dict(os.environ, GPU_CHECK_DRY='1', GPU_CHECK_STAGES=stages, GPU_CHECK_BUDGET_S=str(budget))
    env.pop('OUT', None)
    out = subprocess.run(['bash', str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr


def test_gpu_check_script_runs_stages_in_order_within_its_budget(tmp_path):
    # a GPU session has minutes: the stages run in the order asked for, and a command that the budget no longer
    # covers is skipped (and named) rather than started and cut short
    import pathlib
    import re
    text = _gpu_check_text(pathlib.Path(__file__).parent.parent)
    defined = re.findall(r'^stage_(\w+)\(\) \{', text, flags=re.M)
    default = re.search(r'stages="\$\{GPU_CHECK_STAGES:-([\w ]+)\}"', text).group(1).split()
    assert sorted(default) == sorted(defined) and len(defined) >= 10  # the default runs every stage once

    rc, out, err = _gpu_check_dry(tmp_path, 'row tests', 300)
    assert rc == 0, err
    lines = out.splitlines()
    assert [line for line in lines if line.startswith('==')] == ['== row (0 s)', '== tests (165 s)']
    # row: two ViT-B runs (90 + 75 s); tests: 300 - 165 - 20 s for packing = 115 s of its 260
    assert lines[1].startswith('[0 s] timeout 90 python benchmarks/bench.py --models') and 'fwd_select=topk' in lines[1]
    assert lines[2].startswith('[90 s] timeout 75 ') and 'fwd_select=pairs' in lines[2]
    assert lines[4].startswith('[165 s] timeout 115 python -m pytest') and 'not\\ optin' in lines[4]
    assert not (tmp_path / 'gpu-out' / 'skipped.txt').exists()

    rc, out, err = _gpu_check_dry(tmp_path, 'tests row', 290)  # 290 - 260 - 20: 10 s left for the row stage
    assert rc == 0, err
    assert '[0 s] timeout 260 python -m pytest' in out and '[260 s] timeout' not in out
    skipped = (tmp_path / 'gpu-out' / 'skipped.txt').read_text().splitlines()
    assert len(skipped) == 2 and all(
        line.startswith('skipped (stage row), 10 s of the budget left: python benchmarks/bench.py') for line in skipped)

    # a budget in decimal seconds (from a status reading) is whole seconds; anything else stops before any work
    rc, out, err = _gpu_check_dry(tmp_path, 'tests row', 290.7)
    assert rc == 0 and '[0 s] timeout 260 python -m pytest' in out and 'syntax error' not in err, err
    rc, out, err = _gpu_check_dry(tmp_path, 'tests', 'lots')
    assert rc == 2 and "GPU_CHECK_BUDGET_S must be seconds, got 'lots'" in err and 'timeout' not in out

    rc, out, err = _gpu_check_dry(tmp_path, 'tests nonsense', 300)  # checked before anything runs
    assert rc == 2 and "unknown stage 'nonsense'" in err and 'timeout' not in out


def _collected(root, keyword, mark, path='tests/test_triton.py'):
    """Test ids pytest collects from ``path`` for ``-k keyword`` (and ``-m`` mark, if given)."""
    import subprocess
    import sys
    options = ['-m', *mark] if mark else []
    selection = subprocess.run(
        [sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', '-k', keyword, *options,
         path], cwd=root, capture_output=True, text=True, timeout=600)
    assert selection.returncode == 0, selection.stdout[-3000:]
    return {line for line in selection.stdout.splitlines() if '::' in line}


def test_ratios_to_sdpa_are_time_and_memory_over_sdpas_for_the_same_n_and_pass():
    from timm_convnn.bench import _add_ratios

    def row(impl, n, pass_, ms, peak):
        return dict(impl=impl, n=n, pass_=pass_, ms=ms, peak_bytes=peak)
    rows = [row('sdpa', 65, 'fwd', 2., 100), row('sdpa', 65, 'fwd+bwd', 4., 400), row('convnn', 65, 'fwd', 6., 50),
            row('convnn', 65, 'fwd+bwd', 2., 800), row('paper', 197, 'fwd', 1., 10)]  # (no SDPA row at n 197)
    _add_ratios(rows)
    assert [(r.get('time_vs_sdpa'), r.get('memory_vs_sdpa')) for r in rows] == [
        (1., 1.), (1., 1.), (6. / 2., 50 / 100), (2. / 4., 800 / 400), (None, None)]


def test_pair_ratios_are_the_convnn_model_over_its_timm_baseline():
    from timm_convnn.bench import _pair_ratios
    convnn = dict(model='c', infer_img_s=50., train_img_s=30., train_peak_bytes=600, infer_peak_bytes=7)
    base = dict(model='t', infer_img_s=100., train_img_s=10., train_peak_bytes=200, infer_peak_bytes=999)
    rows = [convnn, base]
    _pair_ratios([('c', 't')], {'c': convnn, 't': base}, rows)
    assert (convnn['baseline'], convnn['infer_vs_baseline'], convnn['train_vs_baseline'],
            convnn['train_memory_vs_baseline']) == ('t', 50. / 100., 30. / 10., 600 / 200)
    assert 'baseline' not in base


@pytest.mark.parametrize('args, message', [
    (['--pairs', 'vit_tiny_convnn_random:vit_tiny_patch16_224:vit_tiny_patch16_224'],
     "--pairs takes CONVNN:TIMM; got 'vit_tiny_convnn_random:vit_tiny_patch16_224:vit_tiny_patch16_224'"),
    (['--pairs', 'vit_tiny_convnn_random:vit_tiny_patch16_224', '--model-kwargs', '=1'],
     "--model-kwargs takes KEY=VALUE items; got '=1'"),
    # (the fused kernels on CPU tensors: refused before anything is timed, not after the SDPA cases)
    (['--backends', 'torch', 'triton'], '--backends triton: '),
])
def test_bench_checks_pairs_and_model_kwargs_before_timing(tmp_path, args, message):
    from timm_convnn import bench
    from timm_convnn.cli import build_parser
    parsed = build_parser().parse_args(['bench', '--models', '--device', 'cpu', '--out', str(tmp_path / 'b')] + args)
    with pytest.raises(ValueError, match=message.replace('(', r'\(')):
        bench._check_args(parsed)


def test_bench_without_a_level_checks_the_model_kwargs_before_timing(tmp_path):
    # neither --ops nor --models times both levels: --model-kwargs is checked before the operator level is timed
    from timm_convnn import bench
    from timm_convnn.cli import build_parser
    parsed = build_parser().parse_args(['bench', '--device', 'cpu', '--out', str(tmp_path / 'b'), '--pairs',
                                        'vit_tiny_convnn_random:vit_tiny_patch16_224', '--model-kwargs', 'bogus=1'])
    with pytest.raises(ValueError, match="vit_tiny_convnn_random does not take {'bogus': 1}"):
        bench._check_args(parsed)
