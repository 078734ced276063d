"""Peak host memory of one training step (forward + backward), ConvNN models next to timm's, CPU, same run.

    python benchmarks/peak_memory.py                       # resnet50_convnn_branch vs resnet50, 224 px, batch 8
    python benchmarks/peak_memory.py --models vit_tiny_convnn_all vit_tiny_patch16_224 --batch-size 32

Each model runs in a fresh subprocess (glibc told to return freed memory, see timm_convnn.utils.memory); the number
is the growth of the process's resident-set peak during the second training step (the first one warms up).
"""
import argparse
import json
import os
import subprocess
import sys

from timm_convnn.utils.memory import MALLOC_ENV

_STEP = r'''
import json, sys, torch, timm, timm_convnn
from timm_convnn.utils import peak_rss_delta
name, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = timm.create_model(name, num_classes=10).train()
x = torch.randn(batch, 3, size, size)
def step():
    model(x).logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
step()
print(json.dumps(peak_rss_delta(step)))
'''


def measure_peak(name: str, batch_size: int = 8, img_size: int = 224, threads: int = 0) -> int:
    """Bytes of resident-set growth during one forward + backward step of ``name``."""
    env = dict(os.environ, **MALLOC_ENV)
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    out = subprocess.run([sys.executable, '-c', _STEP, name, str(batch_size), str(img_size)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'{name}: peak memory run failed\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['resnet50', 'resnet50_convnn_branch'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    args = parser.parse_args()
    peaks = {m: measure_peak(m, args.batch_size, args.img_size) for m in args.models}
    base = peaks[args.models[0]]
    print(f'| model | peak MiB (fwd+bwd, batch {args.batch_size}, {args.img_size} px, CPU) | vs {args.models[0]} |')
    print('|---|---|---|')
    for m, p in peaks.items():
        print(f'| `{m}` | {p / 2 ** 20:.0f} | {p / base:.2f}x |')


if __name__ == '__main__':
    main()
