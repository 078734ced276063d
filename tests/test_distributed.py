"""ConvNN models inside DistributedDataParallel (find_unused_parameters=False, as timm's train.py): two CPU processes
under torchrun with gloo, models registered by the autoload hook (see tests/ddp_step.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_ddp_two_processes_gradients_agree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_CONVNN_AUTOLOAD'}
    env['OMP_NUM_THREADS'] = '1'
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          str(HERE / 'ddp_step.py')], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith('DDP_RESULT '))
    results = json.loads(line[len('DDP_RESULT '):])
    assert sorted(results) == ['resnet_branch', 'vit_all', 'vit_random']
    for case, r in results.items():
        assert len(r['steps']) == 2, case
        for step in r['steps']:
            assert step['scale'] > 0, case  # real gradients
            assert step['ranks'] <= 1e-6 * step['scale'], (case, step)  # all-reduced: identical on both ranks
            if 'single_process' in step:  # DDP's average == the whole batch in one process
                assert step['single_process'] <= 1e-5 * max(step['scale'], 1.0), (case, step)
        assert r['params_ranks'] == 0.0, case  # the optimizer steps kept the replicas identical
