"""Registers, spills and shared memory of the fused ConvNN kernels, compiled for a GPU target without a GPU.

    python benchmarks/kernel_resources.py                       # the default cases, sm_90 (H100 / H200)
    python benchmarks/kernel_resources.py fwd:N=197,K=16,warps=8 fwd:N=3137,K=16,block_m=64 bwd:K=9 sel:K=9,D=128

Triton compiles each kernel ahead of time (``triton.compile`` with a ``GPUTarget``) and ``cuobjdump -res-usage`` (it
ships with Triton's NVIDIA backend) reads the cubin: REG registers per thread, STACK bytes of local memory per thread
(spills), SHARED static shared memory; ``-sass`` gives the count of GPU-wide memory fences and L1 invalidations
(MEMBAR .GPU, CCTL: what an acquire-release atomic brings along), of fused multiply-adds (FFMA: none when the
compile options lack FMA contraction, see ``triton_attention.COMPILE_OPTIONS``), of block-wide barriers (BAR.SYNC /
RED / ARV: cross-warp reductions and exchanges wait at them) and of all instructions (static code size, a rough
guide to the work per program where loops are unrolled; not a timing). A kernel that spills runs
many times slower (the first 64-query row kernel: 27 KB of stack per thread, 20x slower than SDPA on an H200). Use the
Triton version the GPU machine has.

Kernels: fwd (the forward), bwd (its backward), sel (selection alone, what ConvNN2d and the other layers the forward
does not cover use on CUDA). Case keys: N (tokens; <= ROW_TOKENS runs the row kernel, more the streaming one), K, D
(head dim / similarity channels), dtype (bf16 | fp16 | fp32), cand (1: a candidate list of r tokens, default 128;
streamed, or with row=1 ranked as one row like CONFIG fwd_listed='row'; bwd: the dense per-token sums of CONFIG
bwd_listed='dense', block_c list positions at a time, 0: the built-in choice), block_m (0: the built-in choice), warps
(0: the built-in choice), stages, topk (1: the row kernel's bitonic selection), pairs (1: its rounds two keys at a
time, CONFIG fwd_select='pairs'), thr (1: a streamed case over all tokens takes the threshold passes of CONFIG
fwd_stream='threshold'), packed (1: the row kernel ranks packed int32 keys, 0: exact ones; default: built in,
packed for bf16 / fp16), drop (1: attention dropout, the softmax weights times a noise tensor in fwd / bwd), dot (how
fp32 features multiply: tf32x3, the default ``triton_attention.FP32_DOT``, or ieee),
aligned (1, the default: compile as ``triton.jit`` specialises the kernels at run time for head dims divisible by 16
(contiguous tensors or timm's permuted qkv views alike), i.e. every pointer 16-byte aligned and every stride divisible
by 16, which vectorises loads and atomics; 0: no such assumption, far more registers).
"""
import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from timm_convnn.layers import triton_attention as ta

DEFAULT_CASES = ('fwd:N=197,K=16', 'fwd:N=197,K=9', 'fwd:N=197,K=16,packed=0', 'fwd:N=197,K=16,topk=1',
                 'fwd:N=197,K=16,pairs=1', 'fwd:N=197,K=9,pairs=1', 'fwd:N=16385,K=16,cand=1,row=1,pairs=1',
                 'fwd:N=197,K=16,packed=1', 'fwd:N=197,K=16,topk=1,packed=1', 'fwd:N=3137,K=16',
                 'fwd:N=3137,K=16,cand=1', 'fwd:N=197,K=16,dtype=fp32', 'bwd:K=16', 'bwd:K=9',
                 'bwd:K=16,block_m=8,warps=1', 'sel:K=9', 'sel:K=9,D=128', 'sel:K=9,dtype=fp32',
                 'sel:K=9,D=128,dtype=fp32', 'sel:K=9,cand=1', 'sel:K=9,D=128,cand=1,dtype=fp32',
                 'fwd:N=3137,K=16,dtype=fp32', 'fwd:N=3137,K=16,cand=1,dtype=fp32', 'fwd:N=16385,K=16,cand=1,row=1',
                 'fwd:N=16385,K=16,cand=1,row=1,dtype=fp32', 'bwd:N=16385,K=16,cand=1',
                 'bwd:N=16385,K=16,cand=1,dtype=fp32', 'fwd:N=197,K=9,drop=1', 'bwd:K=9,drop=1',
                 'bwd:N=16385,K=16,cand=1,drop=1')
# GPU-wide memory fences and L1 invalidations (a CTA-scope MEMBAR comes with Hopper's asynchronous wgmma: harmless)
_FENCE = r'\bMEMBAR\.[A-Z.]*(?:GPU|SYS)\b|\bCCTL\.[A-Z.]+'


def _parse(case: str):
    kind, _, rest = case.partition(':')
    if kind not in ('fwd', 'bwd', 'sel'):
        raise ValueError(f'a case starts with fwd:, bwd: or sel:; got {case!r}')
    opts = dict(N=197, K=16, D=64, dtype='bf16', cand=0, row=0, r=128, block_m=0, warps=0, stages=3, topk=0, pairs=0,
                packed=-1, aligned=1, dot=ta._dot_f32(), block_c=0, thr=0, drop=0)
    for item in filter(None, rest.split(',')):
        key, _, value = item.partition('=')
        if key not in opts:
            raise ValueError(f'unknown case key {key!r} in {case!r}; keys: {", ".join(opts)}')
        opts[key] = value if key in ('dtype', 'dot') else int(value)
    return kind, opts


def _streams(kind: str, o: dict) -> bool:
    """Whether the case's forward / selection kernel streams its keys (the selection always does; the forward above
    ROW_TOKENS tokens, and for a candidate list unless row=1)."""
    if kind == 'sel':
        return True
    return not o['row'] if o['cand'] else o['N'] > ta.ROW_TOKENS


def _signature(kind: str, o: dict, arch: int = 90):
    p = '*' + o['dtype']
    if kind == 'fwd':
        sig = dict(Q=p, Kf=p, V=p, W='*fp32', O=p, IDX='*i32', P='*fp32', CAND='*i32', SCR_S='*fp32',
                   SCR_I='*i32', NOISE='*fp32', N='i32', M='i32', L='i32', H='i32', q_scale='fp32')
        stream = _streams(kind, o)
        block_m = o['block_m'] or ta._fwd_block_m(stream, o['dtype'] == 'fp32', o['K'], o['D'], bool(o['cand']),
                                                  _per_tile(stream, o) > 0, arch)
        const = dict(DQ=o['D'], DV=o['D'], NUM_K=o['K'], BLOCK_M=block_m,
                     BLOCK_N=ta.STREAM_BLOCK_N if stream else ta._pow2(o['r'] + 1 if o['cand'] else o['N']),
                     BLOCK_DQ=ta._pow2(o['D']),
                     BLOCK_DV=ta._pow2(o['D']), BLOCK_K=ta._pow2(o['K'], 2), F32=o['dtype'] == 'fp32',
                     DOT_F32=o['dot'], STREAM=stream, CANDIDATES=bool(o['cand']),
                     TOPK=bool(o['topk']) and not stream and not o['cand'], PAIRS=bool(o['pairs']) and not stream,
                     PACKED=(bool(o['packed']) if o['packed'] >= 0 else ta._use_packed_keys(o['dtype'] == 'fp32'))
                     and not stream, PER_TILE=_per_tile(stream, o), CAP=ta._stream_cap(o['K']),
                     DROPOUT=bool(o['drop']))
        fn = ta._convnn_fwd_kernel
    elif kind == 'sel':
        sig = dict(Q=p, Kf=p, IDX='*i32', S='*fp32', CAND='*i32', QIDX='*i32', SCR_S='*fp32', SCR_I='*i32', N='i32',
                   M='i32', L='i32', G='i32')
        block_m = o['block_m'] or ta._fwd_block_m(True, o['dtype'] == 'fp32', o['K'], o['D'], bool(o['cand']),
                                                  _per_tile(True, o) > 0, arch)
        const = dict(DQ=o['D'], NUM_K=o['K'], BLOCK_M=block_m,
                     BLOCK_N=ta.STREAM_BLOCK_N, BLOCK_DQ=ta._pow2(o['D']), BLOCK_K=ta._pow2(o['K'], 2),
                     F32=o['dtype'] == 'fp32', DOT_F32=o['dot'],
                     CANDIDATES=bool(o['cand']), PER_TILE=_per_tile(True, o), CAP=ta._stream_cap(o['K']))
        fn = ta._convnn_select_kernel
    else:
        sig = dict(GO=p, Q=p, Kf=p, V=p, W='*fp32', IDX='*i32', P='*fp32', DQo=p, DKo='*fp32', DVo='*fp32',
                   DWo='*fp32', CAND='*i32', INV='*i32', NOISE='*fp32', N='i32', M='i32', L='i32', H='i32',
                   DW_COPIES='i32', q_scale='fp32')
        block_m = o['block_m'] or _bwd_launch(o)[0]
        dense = bool(o['cand'])  # a candidate list's backward: the dense per-token sums (CONFIG bwd_listed='dense')
        # ROW_COPIES is 1 unless asked for, which triton.jit specialises as a constant
        const = dict(DQ=o['D'], DV=o['D'], NUM_K=o['K'], BLOCK_M=block_m,
                     BLOCK_DQ=ta._pow2(o['D']), BLOCK_DV=ta._pow2(o['D']), BLOCK_K=ta._pow2(o['K'], 2), ROW_COPIES=1,
                     DENSE=dense, BLOCK_C=o['block_c'] or _bwd_launch(o)[2],
                     DENSE_DOT=(o['dot'] if o['dtype'] == 'fp32' else 'tf32') if dense else 'ieee',
                     DROPOUT=bool(o['drop']))
        fn = ta._convnn_bwd_kernel
    sig.update({s: 'i32' for s in fn.arg_names if s.startswith('stride')})
    sig.update({c: 'constexpr' for c in const})
    return fn, sig, const


def _per_tile(stream: bool, o: dict) -> int:
    """PER_TILE of a forward / selection case: with thr=1 (CONFIG fwd_stream='threshold') what the launch passes."""
    return ta._tile_values(o['N'], o['K']) if o['thr'] and stream and not o['cand'] else 0


def _bwd_launch(o: dict):
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[o['dtype']]
    return ta._bwd_launch(dtype, o['N'], o['K'], o['D'], o['D'], bool(o['cand']))


def resources(case: str, arch: int = 90) -> dict:
    kind, o = _parse(case)
    if o['warps']:
        warps = o['warps']
    elif kind == 'bwd':
        warps = _bwd_launch(o)[1]
    else:
        stream = _streams(kind, o)
        warps = ta._fwd_warps(stream, o['dtype'] == 'fp32', bool(o['cand']), _per_tile(stream, o) > 0)
    fn, sig, const = _signature(kind, o, arch)
    attrs = {}
    if o['aligned']:  # what triton.jit specialises at run time: 16-byte aligned pointers, strides divisible by 16
        attrs = {(i,): [['tt.divisibility', 16]] for i, name in enumerate(fn.arg_names)
                 if name not in const and (sig[name].startswith('*') or name.startswith('stride'))}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget('cuda', arch, 32),
                              options=dict(num_warps=warps, num_stages=o['stages'], **ta.COMPILE_OPTIONS))
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(compiled.asm['cubin'])
        f.flush()
        text = subprocess.run([tool, '-res-usage', f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, '-sass', f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r'REG:(\d+) STACK:(\d+) SHARED:(\d+)', text)
    if m is None:
        raise RuntimeError(f'no resource line in cuobjdump output:\n{text}')
    return dict(case=case, registers=int(m.group(1)), stack_bytes=int(m.group(2)), shared_bytes=int(m.group(3)),
                fences=len(re.findall(_FENCE, sass)), fence_ops=sorted(set(re.findall(_FENCE, sass))),
                ffma=len(re.findall(r'\bFFMA\b', sass)), barriers=len(re.findall(r'\bBAR\.(?:SYNC|RED|ARV)\b', sass)),
                instructions=len(re.findall(r'^\s+/\*[0-9a-f]{4,}\*/', sass, re.M)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('cases', nargs='*', default=list(DEFAULT_CASES))
    p.add_argument('--arch', type=int, default=90, help='compute capability x 10 (90: H100 / H200; 80: A100, 86: '
                   'RTX 30xx, 89: RTX 40xx / L4, 100: B200, 120: RTX 50xx); block_m / warps 0: the built-in choice '
                   'for that GPU')
    args = p.parse_args()
    reason = ta.triton_unavailable_reason(torch.device('cuda'))
    if reason is not None:
        raise SystemExit(reason)
    print(f'triton {triton.__version__}, sm_{args.arch}')
    for case in args.cases:
        r = resources(case, args.arch)
        flag = '  SPILLS' if r['stack_bytes'] else ''
        print(f'{case:40s} registers {r["registers"]:3d}  stack {r["stack_bytes"]:5d} B  shared {r["shared_bytes"]} B'
              f'  FFMA {r["ffma"]}  instructions {r["instructions"]}  barriers {r["barriers"]}'
              f'  fences {r["fences"]} {" ".join(r["fence_ops"])}'
              f'{flag}', flush=True)


if __name__ == '__main__':
    main()
