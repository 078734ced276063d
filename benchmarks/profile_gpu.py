"""Where a model's time goes on a GPU: torch.profiler's kernel table for one inference forward and one training step
(bf16 autocast), per backend. For a device session deciding what to speed up next; not part of the harness.

    python benchmarks/profile_gpu.py resnet50_convnn_branch vit_base_convnn_all_k16 --batch 256 --out prof.txt
"""
import argparse
import sys

import torch
import timm

import timm_convnn  # noqa: F401  (registers the models)
from timm_convnn.layers import set_backend


def profile(name: str, batch: int, backend: str, rows: int) -> str:
    set_backend(backend)
    model = timm.create_model(name).cuda()
    x = torch.randn(batch, *model.pretrained_cfg['input_size'], device='cuda')
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def infer():
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            model.eval()(x)

    def train():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = model.train()(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = []
    for label, fn in (('inference', infer), ('train step', train)):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by='cuda_time_total', row_limit=rows, max_name_column_width=70)
        out.append(f'== {name} [{backend}] {label}, batch {batch}, bf16 autocast\n{table}')
    del model, opt
    torch.cuda.empty_cache()
    return '\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='+')
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--backends', nargs='+', default=['auto'])
    p.add_argument('--rows', type=int, default=25)
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    text = []
    for name in args.models:
        for backend in args.backends:
            text.append(profile(name, args.batch, backend, args.rows))
            print(text[-1], flush=True)
            if args.out:
                with open(args.out, 'w') as f:
                    f.write('\n'.join(text))


if __name__ == '__main__':
    sys.exit(main())
