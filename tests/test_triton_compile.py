"""The fused Triton kernels compiled ahead of time for an H100 / H200 and the other NVIDIA GPUs they serve, on any
machine (no GPU): registers, spills, fences and FMA contraction, read from the cubin by
``benchmarks/kernel_resources.py``. A file of its own so that ``pytest -n 2 --dist loadfile`` runs it beside
``test_triton.py``'s interpreter test (each takes minutes).
"""
import os
import sys

from timm_convnn.layers import triton_attention

from .test_triton import _require_kernels


def _resources(monkeypatch):
    """``kernel_resources.resources``, compiling as the kernels run: with FMA contraction only where the launch asks
    for it (COMPILE_OPTIONS does; Triton 3.10's default, which 3.9 warns about)."""
    _require_kernels('compiled')
    monkeypatch.setenv('TRITON_DEFAULT_FP_FUSION', '0')
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
    try:
        from kernel_resources import resources
    finally:
        sys.path.pop(0)
    return resources


def test_fused_kernels_compile_for_sm90_without_spills_or_fences(monkeypatch):
    # ahead-of-time compilation for an H100 / H200 on any machine: a kernel that spills registers to local memory
    # runs many times slower (the first 64-query row kernel spilled 27 KB per thread and ran 20x slower than SDPA)
    resources = _resources(monkeypatch)
    # compiled as triton.jit specialises them at run time (aligned pointers, strides divisible by 16); the built-in
    # launch configurations (the streaming kernel on 64 queries for bf16), and the opt-in row selections
    # The no-spill bar is CI's Triton (3.8, 3.9); older ones keep some stack in a few kernels, slower but not wrong
    # (3.4: the fp32-input forwards, up to 2.4 KB; 3.5 / 3.6: 16-32 bytes at K 64), see MIN_TRITON.
    no_spills = triton_attention._version(triton_attention.triton.__version__) >= (3, 8)
    # (bf16 row-kernel cases: packed keys built in, packed=0 the exact ones)
    for case in ('fwd:N=197,K=16', 'fwd:N=197,K=16,topk=1,packed=0', 'fwd:N=197,K=16,packed=0',
                 'fwd:N=197,K=16,topk=1', 'fwd:N=3137,K=16', 'fwd:N=3137,K=9,cand=1', 'fwd:N=3137,K=64',
                 'fwd:N=3137,K=16,cand=1,dtype=fp32', 'fwd:N=3137,K=9,cand=1,D=128,dtype=fp32', 'bwd:K=16',
                 'bwd:K=16,N=3137', 'sel:K=9', 'sel:K=9,D=128', 'sel:K=64', 'sel:K=9,D=128,dtype=fp32',
                 'sel:K=9,cand=1', 'sel:K=9,D=128,cand=1,dtype=fp32', 'fwd:N=16385,K=16,cand=1,row=1',
                 'bwd:N=16385,K=16,cand=1', 'bwd:N=16385,K=32,cand=1', 'fwd:N=16385,K=16,cand=1,row=1,dtype=fp32',
                 'bwd:N=16385,K=16,cand=1,dtype=fp32', 'fwd:N=197,K=16,block_m=64,warps=8,topk=1',
                 'fwd:N=197,K=16,pairs=1', 'fwd:N=16385,K=16,thr=1', 'sel:K=9,D=128,N=3137,dtype=fp32,thr=1',
                 # attention dropout (the softmax weights times its noise), forward and backward
                 'fwd:N=197,K=16,drop=1', 'fwd:N=3137,K=16,drop=1', 'bwd:K=16,drop=1', 'bwd:K=16,dtype=fp32,drop=1',
                 'bwd:N=16385,K=16,cand=1,drop=1'):
        r = resources(case, arch=90)
        assert 0 < r['registers'] <= 255, r
        assert r['stack_bytes'] == 0 or not no_spills, r
        # relaxed atomics: an acquire-release one brings a GPU-wide fence and an L1 invalidation along
        assert r['fences'] == 0, r
        # multiply-adds contracted, as the kernels were tested and timed (the selection alone has no fp32 products:
        # its dot products run on the tensor cores, 3xTF32 ones for fp32 features)
        assert r['ffma'] > 0 or case.startswith('sel:'), r


def test_fused_kernels_compile_for_other_nvidia_gpus_without_large_spills(monkeypatch):
    # the built-in launches on the other GPUs the kernels serve (compute capability >= MIN_CAPABILITY: A100 sm_80,
    # RTX 30xx / A10 sm_86, B200 sm_100, RTX 50xx sm_120; sm_89 compiles as sm_86): no kernel keeps more than 256 bytes
    # of stack (the fp32-input row kernel keeps 96-248; a launch with 104 timed like a spill-free one on the H200), and
    # the fp32 products that stream on 64 queries on Hopper stream on 16 there, spill-free (on 64: 168 bytes to 8 KB).
    # Checked with triton 3.8 and 3.9 (2026-12-02)
    resources = _resources(monkeypatch)
    streamed_fp32 = ('fwd:N=3137,K=16,dtype=fp32', 'fwd:N=3137,K=16,cand=1,dtype=fp32', 'sel:K=9,dtype=fp32',
                     'sel:K=9,D=128,dtype=fp32')
    assert all(triton_attention._fwd_block_m(True, True, 16, d, listed, arch=arch) == expected
               for d, listed in ((64, False), (128, False), (64, True))
               for arch, expected in ((80, 16), (86, 16), (100, 16), (120, 16), (90, 64)))
    # (half / bf16 products: 64 queries, but 32 on sm_100, where 64 spill 88 / 360 bytes under triton 3.8 / 3.9)
    for arch in (80, 86, 100, 120):
        for case in ('fwd:N=197,K=16', 'fwd:N=197,K=16,dtype=fp16', 'fwd:N=197,K=16,dtype=fp32', 'fwd:N=3137,K=16',
                     'fwd:N=3137,K=9,cand=1', 'bwd:K=16', 'bwd:K=16,dtype=fp32', 'bwd:N=16385,K=16,cand=1', 'sel:K=9',
                     'sel:K=9,cand=1') + streamed_fp32:
            r = resources(case, arch=arch)
            assert 0 < r['registers'] <= 255 and r['stack_bytes'] <= 256, (arch, r)
            assert r['stack_bytes'] == 0 or case not in streamed_fp32, (arch, r)
