"""Launch-configuration sweep of the fused ConvNN kernels on a CUDA GPU (``triton.testing.do_bench``, medians in ms),
next to SDPA forward / forward+backward on the same bf16 tensors. Prints one line per case and writes JSON.

    python benchmarks/kernel_sweep.py --out sweep.json
    python benchmarks/kernel_sweep.py --shapes --select 64x3136x3364x64 --neighbors 9 --out select.json

Shapes up to ``ROW_TOKENS`` tokens run the row kernel, larger ones the streaming kernel. ``--select`` times the
selection kernel alone (what ``ConvNN2d`` runs on CUDA; BxNxMxD: batch, queries, candidates, channels; 64x3136x3364x64
is a ResNet-50 stage-1 layer at batch 64) against the PyTorch selection (score slices, ``torch.topk``), over all
candidates and over 64 sampled ones.
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='kernel_sweep.json')
    p.add_argument('--shapes', nargs='*', default=['64x12x197', '1x6x3137'], help='BxHxN')
    p.add_argument('--select', nargs='*', default=[], help='BxNxMxD: the selection kernel alone')
    p.add_argument('--fp32', action='store_true',
                   help='fp32 inputs (timm validate.py / benchmark.py without AMP): 4 vs 8 warps (compiled for sm_90 '
                        'by triton 3.8, the fp32 row kernel with ieee products spills 456 bytes per thread on 4 warps, '
                        'none on 8) and tf32x3 vs ieee products; with --select, fp32 cosine features (a cosine '
                        'ConvNN2d under CUDA autocast)')
    p.add_argument('--neighbors', type=int, nargs='+', default=[9, 16])
    p.add_argument('--contention', nargs='*', default=[], metavar='BxHxN',
                   help='the backward on a sampled-candidate selection (every query\'s K neighbours among the same 128 '
                        'tokens, as with candidates=random, r 128) against the same op on neighbours spread over all '
                        'N tokens: whether the dk / dv atomics on the shared rows serialise')
    p.add_argument('--short', action='store_true',
                   help='only the launches that competed on 2026-11-29 / 30 (row kernel: packed rounds on 16 / 32 / '
                        '64 queries, 64 x 8 and 16 x 8, rounds in pairs on 16 x 4 and 64 x 8, packed topk on 64 x 8, '
                        'exact on 16; streaming kernel: the merge loop on 64 x 4, the threshold passes on 64 x 4, '
                        '32 x 4, 64 x 8, 16 x 4; backward: 16 x 4, 8 x 1, 16 x 2, 32 x 4), e.g. at a GPU-bound batch')
    args = p.parse_args()
    import triton
    from timm_convnn.layers import triton_attention as ta
    op = torch.ops.timm_convnn.convnn_attention
    rows = []

    def save():  # after every case: a sweep cut short keeps what it timed
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=1)

    for shape in args.shapes:
        B, H, N = (int(x) for x in shape.split('x'))
        g = torch.Generator(device='cuda').manual_seed(0)
        dtype = torch.float32 if args.fp32 else torch.bfloat16
        q, k, v = (torch.randn(B, H, N, 64, device='cuda', dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        qs, ks = F.normalize(q.float(), dim=-1).to(dtype), F.normalize(k.float(), dim=-1).to(dtype)
        go = torch.randn_like(v)
        sdpa_f = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
        sdpa_fb = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v).backward(go))
        print(f'{shape}: sdpa fwd {sdpa_f:.4f} ms  fwd+bwd {sdpa_fb:.4f} ms', flush=True)
        for K in args.neighbors:
            w = torch.randn(H * 64, 1, K, device='cuda', requires_grad=True)
            # (block_m, warps, selection, keys, fp32 products, streaming); the most informative first (a stage cut
            # short keeps what it timed).
            if args.fp32:  # and how fp32 features multiply (triton_attention.FP32_DOT)
                fwd_configs = [(16, nw, None, None, dot, None) for nw in (4, 8) for dot in ('tf32x3', 'ieee')]
            elif N <= ta.ROW_TOKENS:  # the row kernel: K rounds or one bitonic topk, exact or packed int32 keys
                # (64 queries on 4 warps: Hopper's wgmma gives each warp 16 whole rows, so the ranking reductions
                # stay inside a warp; exact-key rounds spill there, packed ones do not)
                # ('pairs': the rounds take two keys at a time, packed keys only)
                # Compiled for sm_90 by triton 3.6 (bf16, K 16; benchmarks/kernel_resources.py), per program:
                # registers, instructions per thread, block-wide barriers: 16 x 4 rounds 110 / 2,976 / 54 (the
                # built-in; 744 warp instructions per query), pairs 80 / 3,128 / 30; 64 x 8 bitonic 127 / 5,432 / 9;
                # 64 x 4 rounds 254 / 7,928 / 6 (495 per query, its rounds without a barrier); 16 x 2 rounds
                # 143 / 4,984 / 85, pairs 141 / 5,216 / 61; 16 x 1 rounds 255 / 9,112 / 17 (570 per query; 32 bytes
                # of spills under 3.6, 104 under 3.8, none under 3.9)
                fwd_configs = [(16, 4, None, 'packed'), (16, 4, 'pairs', 'packed'), (64, 8, 'topk', 'packed'),
                               (64, 8, None, 'packed'), (64, 8, 'pairs', 'packed'), (32, 4, 'pairs', 'packed'),
                               (32, 4, None, 'packed'), (16, 8, None, 'packed'), (64, 4, None, 'packed'),
                               (16, 4, None, 'exact'), (16, 4, 'topk', 'packed'), (64, 4, 'topk', 'packed'),
                               (16, 4, 'topk', 'exact'), (32, 4, None, 'exact'), (16, 8, None, 'exact'),
                               (64, 8, None, 'exact')]
                fwd_configs += [(16, 2, None, 'packed'), (16, 2, 'pairs', 'packed'), (16, 1, None, 'packed'),
                                (64, 4, 'pairs', 'packed')]
                if args.short:
                    fwd_configs = [(16, 4, None, 'packed'), (16, 4, 'pairs', 'packed'), (64, 8, 'topk', 'packed'),
                                   (64, 4, None, 'packed'), (64, 8, None, 'packed'), (64, 8, 'pairs', 'packed'),
                                   (16, 2, None, 'packed'), (16, 2, 'pairs', 'packed'), (16, 1, None, 'packed'),
                                   (32, 4, None, 'packed'), (16, 8, None, 'packed'), (16, 4, None, 'exact')]
                fwd_configs = [c + (None, None) for c in fwd_configs]
            else:  # the streaming kernel: the merge loop, or the threshold passes (CONFIG fwd_stream='threshold';
                # 64 queries on 4 warps keep 243-246 registers compiled for sm_90 under triton 3.6 / 3.8, 32 on 4
                # warps 128-201, 64 on 8 warps 175-182)
                fwd_configs = [(64, 4, 'merge'), (64, 4, 'threshold'), (32, 4, 'threshold'), (64, 8, 'threshold'),
                               (16, 4, 'threshold')]
                if not args.short:
                    fwd_configs += [(bm, nw, stream) for bm, nw, stream in itertools.product(
                        (16, 32, 64), (4, 8), ('merge', 'threshold')) if (bm, nw, stream) not in fwd_configs]
                fwd_configs = [(bm, nw, None, None, None, stream) for bm, nw, stream in fwd_configs]
            for bm, nw, select, keys, dot, stream in fwd_configs:
                ta.CONFIG.update(fwd_block_m=bm, fwd_warps=nw, fwd_select=select, fwd_keys=keys, fp32_dot=dot,
                                 fwd_stream=stream if stream == 'threshold' else None)
                try:
                    t = triton.testing.do_bench(lambda: op(qs, ks, v, w, K))
                except Exception as e:  # noqa: BLE001  (report and go on: a config can exceed resources)
                    t, err = float('nan'), repr(e)[:200]
                else:
                    err = None
                packed = ta._use_packed_keys(args.fp32) and N <= ta.ROW_TOKENS  # what the kernel ranked
                rows.append(dict(shape=shape, dtype=str(dtype)[6:], K=K, kernel='fwd', block_m=bm, warps=nw,
                                 select=select or stream or 'rounds', keys='packed' if packed else 'exact', dot=dot,
                                 ms=t, x_sdpa=t / sdpa_f, error=err))
                save()
                print(f'  fwd K {K:2d} BM {bm:2d} warps {nw} {rows[-1]["select"]:9s} {rows[-1]["keys"]:6s}'
                      + (f' {dot:6s}' if dot else '') + ': '
                      f'{t:.4f} ms  x{t / sdpa_f:.2f} SDPA fwd'
                      + (f'  {err}' if err else ''), flush=True)
            ta.CONFIG.update(fwd_block_m=None, fwd_warps=None, fwd_select=None, fwd_keys=None, fp32_dot=None,
                             fwd_stream=None)
            out, idx, pr = op(qs, ks, v, w, K)
            bwd = torch.ops.timm_convnn.convnn_attention_backward
            # dw copies: 1 is one (H, K, DV) block updated by every program (the layout before DW_COPIES).
            # 8 queries on one warp: no barrier at all and about half the instructions per query of 16 on 4 warps
            # (sm_90 SASS, K 16), at 217 registers
            bwd_configs = [(16, 4, None), (8, 1, None), (8, 2, None), (16, 4, 1), (16, 2, None), (16, 8, None),
                           (32, 4, None), (32, 8, None)]
            if args.fp32:
                bwd_configs = [(16, 4, None), (16, 8, None)]
            elif args.short:
                bwd_configs = [(16, 4, None), (8, 1, None), (16, 2, None), (32, 4, None)]
            for bm, nw, copies in bwd_configs:
                ta.CONFIG.update(bwd_block_m=bm, bwd_warps=nw, bwd_dw_copies=copies)
                try:
                    t = triton.testing.do_bench(lambda: bwd(go, qs, ks, v, w, idx, pr))
                except Exception as e:  # noqa: BLE001
                    t, err = float('nan'), repr(e)[:200]
                else:
                    err = None
                copies = copies or ta.DW_COPIES
                rows.append(dict(shape=shape, dtype=str(dtype)[6:], K=K, kernel='bwd', block_m=bm, warps=nw,
                                 dw_copies=copies, ms=t, x_sdpa=t / (sdpa_fb - sdpa_f), error=err))
                save()
                print(f'  bwd K {K:2d} BM {bm:2d} warps {nw} dw copies {copies:2d}: {t:.4f} ms  '
                      f'x{t / (sdpa_fb - sdpa_f):.2f} SDPA bwd'
                      + (f'  {err}' if err else ''), flush=True)
            ta.CONFIG.update(bwd_block_m=None, bwd_warps=None, bwd_dw_copies=None)
        rows.append(dict(shape=shape, dtype=str(dtype)[6:], kernel='sdpa', fwd_ms=sdpa_f, fwd_bwd_ms=sdpa_fb))
        save()
    for shape in args.select:
        _sweep_select(shape, args.neighbors, args.fp32, rows, save)
    for shape in args.contention:
        _sweep_contention(shape, args.neighbors, rows, save)


def _sweep_contention(shape, neighbors, rows, save) -> None:
    """The fused backward (built-in launch) on K neighbours drawn from 128 listed tokens vs from all N, bf16; dk / dv
    over copies; the listed selection with the dense per-token sums (CONFIG bwd_listed='dense', bwd_block_c)."""
    import triton
    from timm_convnn.layers import triton_attention as ta
    B, H, N = (int(x) for x in shape.split('x'))
    g = torch.Generator(device='cuda').manual_seed(0)
    qs, ks, v, go = (torch.randn(B, H, N, 64, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(4))
    bwd = torch.ops.timm_convnn.convnn_attention_backward
    listed = torch.randperm(N, device='cuda', generator=g)[:128]
    for K in neighbors:
        w = torch.randn(H * 64, 1, K, device='cuda')
        p = torch.rand(B, H, N, K, device='cuda', generator=g).softmax(-1)
        # K distinct list positions per query (the first K of a random order of the 128)
        pos = torch.rand(B, H, N, 128, device='cuda', generator=g).argsort(-1)[..., :K]
        idx = {'listed (128 tokens)': listed[pos].int(),
               'spread (all tokens)': torch.randint(0, N, (B, H, N, K), device='cuda', generator=g, dtype=torch.int32)}
        times = {}
        for name, ids in idx.items():
            times[name] = triton.testing.do_bench(lambda: bwd(go, qs, ks, v, w, ids, p))
            rows.append(dict(shape=shape, K=K, kernel='bwd', selection=name, ms=times[name]))
            save()
        a, b = times.values()
        print(f'{shape} bwd K {K:2d}: listed {a:.4f} ms, spread {b:.4f} ms  x{a / b:.2f}', flush=True)
        # dk / dv over CONFIG bwd_row_copies copies (built in: one), on either selection
        for name, ids in idx.items():
            for copies in (2, 4, 16):
                ta.CONFIG['bwd_row_copies'] = copies
                t = triton.testing.do_bench(lambda: bwd(go, qs, ks, v, w, ids, p))
                rows.append(dict(shape=shape, K=K, kernel='bwd', selection=name, row_copies=copies, ms=t))
                save()
                print(f'  {name[:6]}, dk / dv over {copies:2d} copies: {t:.4f} ms  x{t / times[name]:.2f} one copy',
                      flush=True)
        ta.CONFIG['bwd_row_copies'] = None
        # the listed selection's dk / dv summed per listed token first (CONFIG bwd_listed='dense'), 64 list positions
        # at a time (built in) or 16 (CONFIG bwd_block_c)
        ids, name = idx['listed (128 tokens)'], 'listed (128 tokens)'
        ta.CONFIG['bwd_listed'] = 'dense'
        for block_c in (ta.LISTED_BLOCK_C, 16):
            ta.CONFIG['bwd_block_c'] = block_c
            t = triton.testing.do_bench(lambda: bwd(go, qs, ks, v, w, ids, p, listed))
            rows.append(dict(shape=shape, K=K, kernel='bwd', selection=name, listed='dense', block_c=block_c, ms=t))
            save()
            print(f'  listed, dense per-token sums, {block_c} list positions at a time: {t:.4f} ms  '
                  f'x{t / times[name]:.2f} per-pair atomics', flush=True)
        ta.CONFIG.update(bwd_listed=None, bwd_block_c=None)


def _sweep_select(shape, neighbors, fp32, rows, save) -> None:
    """The selection kernel's launch configurations against the PyTorch selection, bf16 cosine features, or with
    ``fp32`` fp32 ones (what ``F.normalize`` returns under CUDA autocast: a cosine ``ConvNN2d`` in bf16 training)
    with either product precision (``triton_attention.FP32_DOT``)."""
    import triton
    from timm_convnn.layers import set_backend, triton_attention as ta
    # (the layers' selection: the public select_scored_neighbors also reads the ids back to check them)
    from timm_convnn.layers.functional import _select_scored
    B, N, M, D = (int(x) for x in shape.split('x'))
    g = torch.Generator(device='cuda').manual_seed(0)
    ks = F.normalize(torch.randn(B, 1, M, D, device='cuda', generator=g), dim=-1)
    ks = ks if fp32 else ks.bfloat16()
    qs = ks[:, :, :N]
    for K in neighbors:
        set_backend('torch')
        base = triton.testing.do_bench(lambda: _select_scored(qs, ks, K))
        set_backend('auto')
        rows.append(dict(shape=shape, K=K, kernel='select', impl='torch', ms=base))
        save()
        print(f'{shape} select K {K:2d} PyTorch (score slices, torch.topk): {base:.4f} ms', flush=True)
        # (block_m, warps, fp32 products, CONFIG fwd_stream)
        configs = [(bm, nw, None, None) for bm, nw in ((None, None), (16, 4), (32, 4), (64, 4), (64, 8), (128, 8))]
        configs += [(None, None, None, 'threshold'), (32, 4, None, 'threshold'), (64, 8, None, 'threshold')]
        if fp32:
            configs = [(None, None, 'tf32x3', None), (None, None, 'ieee', None), (64, 4, 'tf32x3', None),
                       (32, 4, 'tf32x3', None), (64, 8, 'tf32x3', None), (None, None, 'tf32x3', 'threshold')]
        for bm, nw, dot, stream in configs:
            ta.CONFIG.update(fwd_block_m=bm, fwd_warps=nw, fp32_dot=dot, fwd_stream=stream)
            try:
                t = triton.testing.do_bench(lambda: ta.fused_select(qs, ks, K))
            except Exception as e:  # noqa: BLE001  (report and go on: a config can exceed resources)
                t, err = float('nan'), repr(e)[:200]
            else:
                err = None
            rows.append(dict(shape=shape, K=K, kernel='select', impl='fused', block_m=bm or 'default',
                             warps=nw or 4, dtype=str(ks.dtype)[6:], dot=dot, stream=stream or 'merge', ms=t,
                             x_torch=t / base, error=err))
            save()
            print(f'  fused BM {bm or "default"} warps {nw or 4}' + (f' {dot}' if dot else '')
                  + (f' {stream}' if stream else '')
                  + f': {t:.4f} ms  x{t / base:.3f} PyTorch'
                  + (f'  {err}' if err else ''), flush=True)
        ta.CONFIG.update(fwd_block_m=None, fwd_warps=None, fp32_dot=None, fwd_stream=None)
        # a sampled candidate list (what ConvNN2d(candidates='random') selects from): r = 64 tokens shared by all
        # queries, plus each query's own; built-in configuration only
        cand = torch.randperm(M, device='cuda', generator=g)[:64]
        qid = torch.arange(N, device='cuda')
        times = {}
        for impl in ('torch', 'fused'):
            set_backend('torch' if impl == 'torch' else 'auto')
            times[impl] = triton.testing.do_bench(lambda: _select_scored(qs, ks, K, cand, qid))
            rows.append(dict(shape=shape, K=K, kernel='select', impl=impl, candidates=64, ms=times[impl],
                             x_torch=times[impl] / times['torch']))
            save()
        set_backend('auto')
        print(f'  64 sampled candidates: PyTorch {times["torch"]:.4f} ms, fused {times["fused"]:.4f} ms  '
              f'x{times["fused"] / times["torch"]:.3f}', flush=True)


if __name__ == '__main__':
    main()
