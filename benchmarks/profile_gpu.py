"""Where a model's time goes on a GPU: torch.profiler's kernel table for one inference forward and one training step
(bf16 autocast), per backend. For a device session deciding what to speed up next; not part of the harness.

    python benchmarks/profile_gpu.py resnet50_convnn_branch vit_base_convnn_all_k16 --batch 256 --out prof.txt
    python benchmarks/profile_gpu.py --op random:16385:1 all:16385:1 --kernel-config fwd_listed=row bwd_listed=dense

``--op MODE:N:B`` profiles the attention core instead (``ConvNNAttention.convnn_mix``, 6 heads x 64, K 16, r 128,
forward + backward in bf16 as the harness times it), with the wall time per call next to the summed GPU kernel time:
which kernels the time goes to, and whether the host (Python, dispatch, launches) is what the GPU waits on. ``--device
cpu`` runs the same on CPU (CPU activities only; to check the script without a GPU).
"""
import argparse
import sys
import time

import torch
import timm
from torch.autograd import DeviceType

import timm_convnn  # noqa: F401  (registers the models)
from timm_convnn.bench import _kernel_config, attention_core
from timm_convnn.layers import set_backend, triton_attention


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


def profile_op(spec: str, device: str, backend: str, rows: int, iters: int = 20) -> str:
    """torch.profiler's table for ``iters`` forward + backward calls of the attention core ``MODE:N:B``, and the wall
    time per call against the summed self time of the device kernels."""
    mode, n, batch = spec.split(':')
    n, batch = int(n), int(batch)
    set_backend(backend)
    heads, d, dtype = 6, 64, torch.bfloat16
    layer = attention_core(n, heads, d, 16, mode, 128, device)
    q, k, v = (torch.randn(batch, heads, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(batch, heads, n, d, device=device, dtype=dtype)
    cuda = torch.device(device).type == 'cuda'

    def call():
        layer.convnn_mix(q, k, v).backward(grad_out)
        q.grad = k.grad = v.grad = None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        call()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    sync()
    wall_ms = (time.perf_counter() - t0) / iters * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            call()
        sync()
    events = prof.key_averages()
    # the device's own events (kernels, memsets, copies): the ops that launch them carry the same time again
    kernel_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3 / iters
    table = events.table(sort_by='self_cuda_time_total' if cuda else 'self_cpu_time_total', row_limit=rows,
                         max_name_column_width=50)
    config = {key: value for key, value in triton_attention.CONFIG.items() if value is not None}
    return (f'== attention core {mode}, n {n}, batch {batch}, {heads} heads x {d}, K 16, bf16, fwd + bwd [{backend}]'
            f'{" " + str(config) if config else ""}: wall {wall_ms:.3f} ms per call, device kernels '
            f'{kernel_ms:.3f} ms\n{table}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='*')
    p.add_argument('--op', nargs='*', default=[], metavar='MODE:N:B', help='attention-core cases to profile')
    p.add_argument('--device', default='cuda', help='for --op (cuda, or cpu to check the script)')
    p.add_argument('--kernel-config', nargs='*', default=[], metavar='KEY=VALUE',
                   help='fused-kernel launch settings (triton_attention.CONFIG) for the run')
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--backends', nargs='+', default=['auto'])
    p.add_argument('--rows', type=int, default=25)
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    triton_attention.CONFIG.update(_kernel_config(args.kernel_config))
    text = []
    for spec in args.op:
        for backend in args.backends:
            text.append(profile_op(spec, args.device, backend, args.rows))
            print(text[-1], flush=True)
    for name in args.models:
        for backend in args.backends:
            text.append(profile(name, args.batch, backend, args.rows))
            print(text[-1], flush=True)
            if args.out:
                with open(args.out, 'w') as f:
                    f.write('\n'.join(text))


if __name__ == '__main__':
    sys.exit(main())
