"""Host time of one fused ConvNN attention call (what the CPU spends before the GPU has work), measured without a GPU.

    python benchmarks/host_overhead.py                      # ViT-Ti and ViT-B attention shapes, batch 1, K 16
    python benchmarks/host_overhead.py --heads 6 --tokens 785 --batch-size 8

The fused Triton kernels are replaced by launches that do nothing and the fused path is forced on CPU tensors
(``fused_memory.stub_fused_kernels``): what is timed is the Python and PyTorch work around the launches (argument
checks, layouts, output allocation, autograd), not Triton's own launch, nor any arithmetic of the kernels. On a GPU
this is what a small batch waits on: at batch 1 a ViT layer's kernels take microseconds.

Each call path runs in the same process, interleaved: ``eager`` (what eager code runs: ``fused_attention`` calls the
launches through an ``autograd.Function``) and ``dispatcher`` (through the registered ``torch.library`` custom op,
what ``torch.compile`` and ``torch.jit.trace`` record), each without grad (inference) and forward + backward. The
inputs are timm's permuted views of one qkv buffer, as the models hand them over. The least of ``--repeats`` timings of
``--calls`` calls each (the two paths interleaved), in CPU time of the calling thread (``time.thread_time``): host
times on a shared machine only ever come out too long, and wall time there also counts time the thread was not run.

On a CPU the stubbed path still does real work that a GPU would run asynchronously (the backward's zero-filled
gradient buffers and the sum of dw's copies), so the forward + backward numbers overstate a GPU host's time by that
much; the difference between the two paths is host work either way.
"""
import argparse
import time

import torch

from fused_memory import stub_fused_kernels
from timm_convnn.layers import triton_attention
from timm_convnn.layers.functional import dot_scale


def _inputs(batch: int, heads: int, tokens: int, head_dim: int, num_neighbors: int):
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, requires_grad=True)
    weight = torch.ones(heads * head_dim, 1, num_neighbors, requires_grad=True)
    return qkv, weight


def _call(qkv: torch.Tensor, weight: torch.Tensor, num_neighbors: int, backward: bool):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with torch.set_grad_enabled(backward):
        out, _, _ = triton_attention.fused_attention(q, k, v, weight, num_neighbors, None, dot_scale(q.shape[-1]))
        if backward:
            out.sum().backward()


def _time(fn, calls: int) -> float:
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls


def measure(batch: int, heads: int, tokens: int, head_dim: int, num_neighbors: int, calls: int,
            repeats: int) -> dict:
    """Microseconds per call: {(path, pass): us}, path 'eager' | 'dispatcher', pass 'forward' | 'forward+backward'."""
    qkv, weight = _inputs(batch, heads, tokens, head_dim, num_neighbors)
    eager = triton_attention._eager
    paths = {'eager': eager, 'dispatcher': lambda *tensors: False}
    result = {}
    try:
        for backward in (False, True):
            name = 'forward+backward' if backward else 'forward'
            for path, rule in paths.items():  # warm-up: caches, first-call paths
                triton_attention._eager = rule
                _time(lambda: _call(qkv, weight, num_neighbors, backward), max(1, calls // 4))
            samples = {path: [] for path in paths}
            for _ in range(repeats):  # interleaved: both paths see the same machine load
                for path, rule in paths.items():
                    triton_attention._eager = rule
                    samples[path].append(_time(lambda: _call(qkv, weight, num_neighbors, backward), calls))
            for path in paths:
                result[(path, name)] = min(samples[path]) * 1e6
    finally:
        triton_attention._eager = eager
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--heads', type=int, nargs='+', default=[3, 12], help='attention heads (ViT-Ti 3, ViT-B 12)')
    p.add_argument('--tokens', type=int, default=197)
    p.add_argument('--head-dim', type=int, default=64)
    p.add_argument('--num-neighbors', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--calls', type=int, default=300)
    p.add_argument('--repeats', type=int, default=15)
    args = p.parse_args()
    stub_fused_kernels()
    torch.set_num_threads(1)
    print(f'torch {torch.__version__}, batch {args.batch_size}, {args.tokens} tokens, head dim {args.head_dim}, '
          f'K {args.num_neighbors}; host us per fused call (kernels stubbed out)')
    print('| heads | pass | eager | dispatcher | dispatcher / eager |')
    print('|---|---|---|---|---|')
    for heads in args.heads:
        r = measure(args.batch_size, heads, args.tokens, args.head_dim, args.num_neighbors, args.calls, args.repeats)
        for name in ('forward', 'forward+backward'):
            e, d = r[('eager', name)], r[('dispatcher', name)]
            print(f'| {heads} | {name} | {e:.0f} | {d:.0f} | {d / e:.2f} |')


if __name__ == '__main__':
    main()
