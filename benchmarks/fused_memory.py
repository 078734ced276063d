"""Peak memory of one training step on the fused GPU path, measured without a GPU.

    python benchmarks/fused_memory.py                                   # ViT-B ConvNN vs timm's ViT-B, batch 32
    python benchmarks/fused_memory.py --models vit_tiny_convnn_random vit_tiny_patch16_224 --batch-size 64

The fused Triton kernels are replaced by launches that do nothing, and the fused path is forced on CPU tensors: every
tensor the path allocates and every tensor autograd keeps for the backward is real, only the kernels' arithmetic is
missing (the outputs are uninitialised memory, so the numbers of the step mean nothing). One step under bf16 autocast
(as the GPU harness runs), after one warm-up step; the number is the peak of the bytes held by tensors created during
the step (``timm_convnn.bench._LiveTensorBytes``), parameter gradients included. timm's models run their own attention
(CPU SDPA keeps what the GPU one keeps: the output and its log-sum-exp), so the ratio is the fused path's saved
activations against SDPA's, which is what the GPU harness's peak-memory ratio measures, up to allocator effects.
"""
import argparse

import timm
import torch

import timm_convnn  # noqa: F401  (registers the ConvNN models)
from timm_convnn.bench import _LiveTensorBytes
from timm_convnn.layers import set_backend, triton_attention


class _NoLaunch:
    """Stands in for a ``triton.jit`` kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_fused_kernels() -> None:
    """Route ``auto`` / ``triton`` dispatch to the fused path on any device, with kernels that do nothing."""
    triton_attention._convnn_fwd_kernel = _NoLaunch()
    triton_attention._convnn_bwd_kernel = _NoLaunch()
    triton_attention._convnn_select_kernel = _NoLaunch()
    triton_attention.triton_unavailable_reason = lambda device: None
    triton_attention.use_fused = lambda supported, device: supported
    set_backend('triton')


def train_step_peak(name: str, batch_size: int, img_size: int = 224) -> int:
    """Peak live tensor bytes of one forward + backward of ``name`` (bf16 autocast, CPU)."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size).train()
    x = torch.randn(batch_size, 3, img_size, img_size)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    step()
    with _LiveTensorBytes() as live:
        step()
    return live.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['vit_base_convnn_all_k16', 'vit_base_patch16_224'],
                   help='models to measure; ratios are to the last one')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    args = p.parse_args()
    stub_fused_kernels()
    peaks = {name: train_step_peak(name, args.batch_size, args.img_size) for name in args.models}
    ref = peaks[args.models[-1]]
    for name, peak in peaks.items():
        print(f'{name:32s} batch {args.batch_size:4d}  peak {peak / 2 ** 20:9.1f} MiB  x{peak / ref:.3f}')


if __name__ == '__main__':
    main()
