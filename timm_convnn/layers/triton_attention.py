""" Fused ConvNN attention (all tokens or a shared candidate list, softmax, depthwise aggregation) as Triton kernels
behind a ``torch.library.custom_op`` (``timm_convnn::convnn_attention``), with its fake and autograd registrations;
and the top-K selection alone (``timm_convnn::convnn_select``, ``fused_select``) for the layers whose weighting or
aggregation the fused forward does not cover (``ConvNN2d``). Eager calls run the same launches without the dispatcher
(``_eager``: an ``autograd.Function``; graphs, dispatch modes and tensor subclasses get the custom ops).

Forward, one program per (batch x head, block of queries), scores by ``tl.dot`` with fp32 accumulation:
* up to ``ROW_TOKENS`` tokens, the whole score row block in registers, then K rounds of row-max extraction (over
  packed int32 (score, column) keys for half / bf16 inputs, each round the largest key below the last; or one
  bitonic top-K, ``CONFIG``);
* above, key tiles stream through a running top-K buffer (score, token id) per query, merged only while a tile
  holds a score above some query's current K-th best; then the same K ranking rounds over the buffer. Opt-in
  (``CONFIG['fwd_stream'] = 'threshold'``, all tokens): one pass over the tiles bounds every query's K-th best
  score, a second collects the keys at or above the bound into a scratch, which the rounds then rank.
Ties go to the smallest token id. The program stores the K indices and softmax weights per query, then (after a
barrier) reads them back slot by slot for the weighted depthwise gather of the K value rows: the selection and the
aggregation do not hold registers at the same time, and the gather needs no per-slot layout conversion. Nothing of
size n x n leaves the kernel; it writes the output, the K indices and the K softmax weights per query.
Backward, one program per query block: recomputes nothing but the K gathered rows it needs; dq in registers,
dk / dv / dw accumulated with atomics (not bit-deterministic: the dispatcher uses the PyTorch path under
``torch.use_deterministic_algorithms(True)``).

Limits (otherwise ``ConvNNAttention`` uses the PyTorch path): token count <= ``MAX_TOKENS``, K <= ``MAX_NEIGHBORS``.
Inputs may be fp32 / fp16 / bf16; scores, softmax and accumulation are fp32 (half / bf16 products are exact on the
tensor cores; fp32 ones are 3xTF32 there, ``FP32_DOT``).

The kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, CPU tensors), which is how the CPU test
suite checks them against the PyTorch path.
"""
import contextlib
import functools
import os
import re
from typing import ContextManager, List, Optional, Tuple

import torch

from .backend import get_backend
from .func_support import first_derivative_only, fold_batch, transformable, transforms_active
from .symbolic import capturing, kept, slots

__all__ = ['triton_available', 'triton_unavailable_reason', 'fused_attention', 'kept_neighbors', 'fused_select',
           'select_unsupported', 'use_fused', 'MAX_TOKENS', 'MAX_NEIGHBORS', 'MAX_SELECT_DIM', 'MIN_TRITON',
           'MIN_CAPABILITY', 'COMPILE_OPTIONS']

MAX_TOKENS = 1 << 18
MAX_NEIGHBORS = 64
# The selection kernel holds a block of query features in registers: up to this many similarity channels (ConvNN2d's
# 56 x 56 and 28 x 28 maps of a ResNet have 64 and 128; with appended coordinates 66 and 130, so the second selects
# in PyTorch); wider ones select in PyTorch
MAX_SELECT_DIM = 128
# The GPUs the fused kernels serve: NVIDIA, compute capability 8.0 and newer (Ampere, Ada, Hopper, Blackwell).
# Compiled by triton 3.8 for sm_80 / 86 / 89 / 90 / 100 / 120 without a GPU (tests/test_triton_compile.py), their
# built-in launches keep at most a few hundred bytes of stack (the fp32-input row kernel: 96-248; on the H200 such a
# launch timed 0.66 ms against 0.68 for a spill-free one); for sm_75 (Turing) the half / bf16 row kernel alone spills
# 1.5-1.8 KB and the selection up to 3.3 KB, where spills of kilobytes ran many times slower on the H200. Older GPUs,
# and AMD ones (ROCm builds of torch; never compiled for), run the PyTorch path.
MIN_CAPABILITY = (8, 0)
ROW_TOKENS = 256  # up to this many tokens the forward ranks whole score rows in registers; above, it streams
STREAM_BLOCK_N = 64  # key tile of the streaming forward
# Queries per program: 16, the smallest tensor-core tile; the streaming forward on half / bf16 inputs with K <= 32
# takes 64 (STREAM_BLOCK_QUERIES: timed on the H200 at 0.38 ms against 0.52 ms for 16 at B 1, 6 heads, n 3137, K 16,
# benchmarks/results/h200-kernel-sweep.json). Registers per thread compiled for sm_90 by triton 3.6 the way triton.jit
# specialises the kernels at run time (aligned pointers, strides divisible by 16; benchmarks/kernel_resources.py),
# 4 warps, bf16, K 16: row kernel 127, streaming kernel 250 (64 queries), backward 112; none spills. 64 streaming
# queries spilled with fp32 inputs multiplied on the CUDA cores ('ieee', 384 bytes) and, under triton 3.8, at K 64
# (168 bytes): those keep 16. With 3xTF32 products (FP32_DOT) fp32 inputs take 64 as well (no spill under triton 3.6 /
# 3.8; the selection kernel on fp32 cosine features, a ResNet-50 stage-1 layer at B 64: 2.20 ms on 64 queries against
# 5.85 ms on 16, H200), except fp32 features of more than 64 channels with a candidate list (176 bytes spilled: 16).
# That holds for Hopper's wgmma tiles only: compiled for sm_80 / 86 / 89 / 100 / 120 (triton 3.8), 64 streaming queries
# with fp32 products spill 168 bytes to 8 KB (the selection on 128-channel fp32 features, a ResNet stage-2 layer under
# autocast: 8,088 bytes on sm_80), where 16 keep 128-194 registers and none: other GPUs stream fp32 products on 16.
# Half / bf16 products stream on 64 queries spill-free there too, except on sm_100 (32 there).
# 64 x 256 score rows spill with exact keys (104 bytes) but not packed (228); kernel_sweep.py tries them.
BLOCK_QUERIES = 16
STREAM_BLOCK_QUERIES = 64

# Launch configuration. None: the built-in choice (``_fwd_block_m`` / BLOCK_QUERIES queries per program, 4 warps;
# ``_bwd_launch`` for the backward). ``benchmarks/kernel_sweep.py`` times the alternatives on a GPU.
# fwd_select: how the row kernel picks its top K: None, K rounds of row max (the built-in choice), 'pairs', rounds
# that take two packed keys at a time (``_rank``; exact keys keep single rounds; opt-in until timed on a GPU), or
# 'topk', one bitonic tl.topk (slower on the H200: 1.36 ms on 16 queries, 0.39 on 64, against 0.30 for packed rounds).
# fwd_keys: what the row kernel ranks: 'exact' fp32 scores (rounds: a max and a smallest-id-at-the-max reduction per
# round; topk: int64 (score, id) keys), or 'packed', one int32 key per score holding 15 mantissa bits and the column
# (rounds: one reduction per round; topk: a bitonic sort of half the width); None: packed for half / bf16 inputs,
# exact for fp32 ones. Packed ranking is exact up to scores within 2**-15 relative of each other, far below what half /
# bf16 inputs resolve (a bf16 q or k element keeps 8 significant bits), and the softmax weights come from the packed
# scores.
# On the H200 (B 64, 12 heads, n 197, K 16, bf16) packed rounds took 0.30 ms against 0.44 ms exact
# (benchmarks/results/h200-kernel-sweep.json), and matched the PyTorch path in the CUDA tests; a throwaway
# study on the project's H200 (shared/reference/triton_feasibility.md) timed int64 keys at 1.7-2.3x the selection
# cost of such int32 keys, and its best n 197 forwards used them.
# fwd_listed: how the forward ranks a candidate list (random / spatial): None, through the streaming kernel's running
# top-K buffer (tiles of STREAM_BLOCK_N; the built-in choice), or 'row', as one score row in registers like the row
# kernel (the r listed tokens and the query's own token, r + 1 <= ROW_TOKENS), ranked in K rounds (packed keys for
# half / bf16 as above). Opt-in until timed on a GPU: the streaming listed forward at n 16385 (B 1, 6 heads, r 128,
# K 16) took 0.85 ms on the H200, where the row kernel ranks ViT-B's 605k query rows (batch 256) in 1.2 ms.
# fwd_stream: how a streamed forward or selection over all tokens finds each query's K best: None, the merge loop
# (``_stream_top_k``; the built-in choice), or 'threshold', a pass bounding every query's K-th best score, then one
# collecting the keys above the bound into a scratch of STREAM_CAP per query, ranked like a row
# (``_threshold_top_k``). Opt-in until timed on a GPU: no data-dependent rounds (at n 16385, K 16 the merge loop runs
# 475 rounds over 257 tiles per 64-query block, benchmarks/stream_rounds.py) at the price of scoring every tile twice.
CONFIG = dict(fwd_block_m=None, fwd_warps=None, fwd_select=None, fwd_keys=None, bwd_block_m=None, bwd_warps=None,
              bwd_dw_copies=None, fp32_dot=None, bwd_row_copies=None, fwd_listed=None, bwd_listed=None,
              fwd_stream=None, bwd_block_c=None)
# CONFIG fwd_stream='threshold': keys kept per query between the passes (a block in which some query has more
# runs the merge loop instead), and the most scratch one launch takes (8 bytes per slot; the batch is split to fit,
# down to one entry)
STREAM_CAP = 64
SCRATCH_BYTES = 64 << 20
# How the score kernels multiply fp32 similarity features (what ``F.normalize`` returns under CUDA autocast, so every
# cosine ConvNN2d of a ResNet in bf16 training, and every layer without AMP): 'tf32x3' splits each operand into two
# TF32 halves and sums three tensor-core products, about fp32's accuracy (relative error near 2**-21 per product;
# the CUDA tests hold the fused selection to the PyTorch path's fp32 matmul, scores within 1e-5). 'ieee' multiplies
# on the CUDA cores: on the H200, resnet50_convnn_branch at batch 128 in bf16 autocast spent 117 of 156 ms of its
# inference in the 7 selection kernels so (cosine features of 64 / 128 channels, about 6 TFLOP/s).
FP32_DOT = 'tf32x3'
# Compile options of every launch. FMA contraction (a * b + c with one rounding) is what the kernels were tested and
# timed with, and it saves instructions (compiled for sm_90 by triton 3.9, the row kernel at K 16 has 432 fp32
# multiply / add / FMA instructions with it, 560 without). It is Triton's default up to 3.9, which warns that the
# default becomes off in 3.10: asked for explicitly, it stays on (and the warning stays away).
COMPILE_OPTIONS = dict(enable_fp_fusion=True)
# The backward accumulates dw (H x K x DV values) with atomics from every program; one block for all of them would
# serialise ~B * N / 16 updates per address (832 at B 64, n 197), so programs spread over this many copies, summed
# after the kernel (64 x 12 heads x 16 x 64 fp32 = 3 MiB). Chosen by reasoning; on the H200 one copy
# (bwd_dw_copies=1) timed the same at 16 queries on 4 warps (0.780 against 0.784 ms), untimed at 8 queries on 1 warp.
DW_COPIES = 64
# CONFIG['bwd_row_copies'] (None: 1): copies of dk / dv that the backward's programs spread over, summed after the
# kernel (B x copies x H x n x head dim fp32, twice). Built for candidate lists (random / spatial), where every query's
# K slots land on the same r + 1 rows, on the guess that the atomics there serialise; measured on the H200
# (kernel_sweep.py --contention, bf16, K 16, 2026-11-30) they do not: neighbours listed among 128 tokens and spread
# over all tokens took the same time (B 64, 3 / 12 heads, n 197: 0.37 / 0.38 and 0.51 / 0.50 ms; B 1, 6 heads,
# n 16385: 0.56 / 0.51 ms); 4 copies made the listed cases slower (x1.25, x1.38, x1.12; only spread neighbours at
# 3 heads gained, 0.29 ms), and vit_tiny_convnn_random trained at 5,227 img/s with 4 copies against 6,888 with one.
# (An earlier call the same day had timed 0.52 ms listed, 0.35 spread and 0.26 with 4 copies at B 64, 3 heads: the
# backward there is ~0.1 ms of GPU work, so such small cases mostly time launch overhead.) One copy unless asked for.
# What the atomics do cost is their number: the backward adds K x (dq + dv channels) values per query (201 M fp32
# values, as 4-wide vector atomics, at B 1, 6 heads, n 16385, K 16: 0.56 ms on the H200, where its gathers move about
# 0.4 GB from L2). CONFIG['bwd_listed'] = 'dense' (opt-in until timed on a GPU) sums them per listed token first for a
# forward that took a candidate list: over LISTED_BLOCK_M queries per program, LISTED_BLOCK_C list positions at a time
# (one-hot tiles times the per-query terms on the tensor cores), then one atomic per listed token and channel, about
# LISTED_BLOCK_M x K / r = 4x fewer at r 128, K 16. Compiled for sm_90 (bf16, K 16) it spills on 4 warps (48 bytes
# per thread under triton 3.8, 144 under 3.6) and at 64 queries, not at 32 queries on 8 warps. Its loops over the K
# slots are runtime loops: unrolled (tl.static_range), the compiler kept every slot's terms live across the list
# positions (bf16, K 16: 182-255 registers, 64 positions at a time at the 255 ceiling with 8 bytes of spills under
# triton 3.9; K 32 or 128-channel heads 8-264 bytes of spills, K 64 about 4 KB). As runtime loops, with the depthwise
# weight applied to the per-token sums instead of to go, 64 list positions at a time (a quarter of the passes over
# each query's slots that 16 take) compile without spills under triton 3.6 / 3.8 / 3.9: 155-198 registers at K 16 /
# 32, 175-255 at K 64 (16 positions: 126-186 registers, 3,776-4,008 instructions at K 16, against 6,560 unrolled; K 64
# spilled 72 bytes there under 3.8). fp32 features and 128-channel heads take 16 queries: fp32 125-127 registers (32
# queries spill 16 bytes under 3.9), 128 channels at K 32 176-196 (32 queries spill 40 bytes under 3.9; K 64 spills
# 128 bytes under 3.6 even so).
# CONFIG['bwd_block_c'] overrides LISTED_BLOCK_C (``kernel_sweep.py --contention`` times 16 against 64).
LISTED_BLOCK_M = 32
LISTED_WARPS = 8
LISTED_BLOCK_C = 64

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: the PyTorch path serves everything
    triton = None
    tl = None


# The oldest Triton that compiles the kernels: the row kernel's opt-in bitonic selection calls tl.topk, which 3.4 added,
# and Triton resolves every tl attribute a kernel names when it is first launched, so with 3.1-3.3 (torch 2.5-2.7)
# the whole forward would fail with "module 'triton.language' has no attribute 'topk'". Older installs use the PyTorch
# path. Compiled for sm_90 (benchmarks/kernel_resources.py): 3.1 and 3.3 fail on tl.topk; 3.4, 3.5, 3.6 and 3.8
# compile every kernel (under 3.4 the fp32-input forwards spill registers: slower, not wrong); run on a GPU with 3.6.
MIN_TRITON = (3, 4)


# Triton decides when it decorates a kernel, at this module's import, whether the kernel runs in its interpreter: the
# flag as it was then (set later, the kernels are still compiled ones, which need a GPU)
_INTERPRETING = os.environ.get('TRITON_INTERPRET', '0') == '1'


def interpreting() -> bool:
    return _INTERPRETING


def _version(text: str) -> Tuple[int, ...]:
    """(major, minor) of a version string such as '3.6.0', '3.4.0rc1' or '3.5.0+git1a2b3c'."""
    return tuple(int(x) for x in re.findall(r'\d+', text)[:2])


def _too_old(version: str) -> Optional[str]:
    """Why a Triton of ``version`` cannot compile the kernels, or None when it can."""
    if _version(version) >= MIN_TRITON:
        return None
    need = '.'.join(map(str, MIN_TRITON))
    return (f'triton {version} is too old for the fused ConvNN kernels (they need triton >= {need}, which torch >= 2.8 '
            f'brings)')


# what the installed Triton allows, decided once: dispatch asks on every ConvNN attention call
_INSTALL_REASON = 'triton is not installed (pip install triton)' if triton is None else _too_old(triton.__version__)


_ARCHS = {}  # CUDA device index -> compute capability x 10


def _arch(device: torch.device) -> int:
    """Compute capability x 10 of ``device``'s GPU (90: H100 / H200), asked once per device; 90 without one (CPU
    tensors under Triton's interpreter: the launches compiled for sm_90, which the interpreter tests check)."""
    if device.type != 'cuda':
        return 90
    arch = _ARCHS.get(device.index)  # (a tensor's CUDA device always has an index)
    if arch is None:
        if not torch.cuda.is_available():
            return 90
        index = torch.cuda.current_device() if device.index is None else device.index
        major, minor = torch.cuda.get_device_capability(index)
        arch = _ARCHS[index] = 10 * major + minor
    return arch


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the fused kernels cannot run on tensors of ``device``, or None when they can (CUDA tensors on an NVIDIA GPU
    of compute capability ``MIN_CAPABILITY`` or newer, or CPU tensors under Triton's interpreter, with a Triton of at
    least ``MIN_TRITON``)."""
    if _INSTALL_REASON is not None:
        return _INSTALL_REASON
    if not (device.type == 'cuda' or (interpreting() and device.type == 'cpu')):
        return (f'the fused ConvNN kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); got '
                f'{device} tensors')
    if device.type == 'cuda':
        if torch.version.hip is not None:
            return (f'the fused ConvNN kernels are built for NVIDIA GPUs; this torch is a ROCm build '
                    f'({torch.version.hip})')
        arch = _arch(device)
        if arch < 10 * MIN_CAPABILITY[0] + MIN_CAPABILITY[1]:
            return (f'the fused ConvNN kernels need an NVIDIA GPU of compute capability {MIN_CAPABILITY[0]}.'
                    f'{MIN_CAPABILITY[1]} or newer (Ampere and later; older ones spill registers); this GPU is '
                    f'{arch // 10}.{arch % 10}')
    return None


def _on_device(x: torch.Tensor) -> ContextManager:
    """The device of a call's launches: Triton launches a kernel on the current CUDA device, on its current stream, so
    a call on tensors of another GPU (a model moved to cuda:1 without ``torch.cuda.set_device``, as timm's validate.py
    and benchmark.py do with ``--device cuda:1``) makes theirs current for its launches. Nothing to switch (one query)
    for tensors on the current device, or on the CPU (Triton's interpreter)."""
    if x.device.type == 'cuda' and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device.index)
    return contextlib.nullcontext()


def triton_available(device: torch.device) -> bool:
    """The fused kernels can run on tensors of ``device`` (see ``triton_unavailable_reason``)."""
    return triton_unavailable_reason(device) is None


def use_fused(supported: bool, device: torch.device) -> bool:
    """The backend's decision (``timm_convnn.layers.backend``) for a call on ``device`` tensors that the fused kernels
    can compute (``supported``): ``torch``, never; ``auto``, on CUDA when Triton can run there; ``triton``, always,
    and an error when Triton cannot run on ``device``."""
    backend = get_backend()
    if backend == 'torch' or not supported:
        return False
    if backend == 'auto':
        return device.type == 'cuda' and triton_available(device)
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f'TIMM_CONVNN_BACKEND / set_backend is "triton" but {reason}')
    return True


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(1, x) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _nan_first(s):
        """NaN scores as +inf: a NaN ranks first, as ``torch.topk`` (the PyTorch path) ranks it, and the softmax over
        the kept scores turns NaN (exp(inf - inf)), so a NaN key or query yields NaN outputs on both paths, as in
        attention (AMP's gradient scaler counts on seeing them). Left alone, NaN compares false: the merge loop and the
        exact rounds skipped such keys, packed keys ranked a NaN by its sign bit."""
        return tl.where(s == s, s, float('inf'))

    @triton.jit
    def _scores(q, Kf, kbase, ids, valid, dq, stride_kn, DQ: tl.constexpr, F32: tl.constexpr,
                DOT_F32: tl.constexpr):
        """(BLOCK_M, BLOCK_N) fp32 scores of the query block against the key rows ``ids`` of the (batch, head) slice
        at offset ``kbase`` of ``Kf`` (-inf where not valid)."""
        kt = tl.load(Kf + kbase + ids[None, :] * stride_kn + dq[:, None],
                     mask=valid[None, :] & (dq[:, None] < DQ), other=0.)
        # half / bf16 inputs multiply exactly into the fp32 accumulator on the tensor cores (the same numbers as
        # casting first, at a quarter of the registers). fp32 inputs (F32; also mixed dtypes, and everything under
        # Triton's CPU interpreter, whose half / bf16 tl.dot returns garbage in triton 3.8) multiply as DOT_F32:
        # 'tf32x3' by default (FP32_DOT), 'ieee' for CUDA-core fp32 products
        if F32:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=DOT_F32)
        else:
            s = tl.dot(q, kt, out_dtype=tl.float32)
        return tl.where(valid[None, :], _nan_first(s), float('-inf'))

    @triton.jit
    def _ordered(s):
        """fp32 -> int32 with the same order (as signed integers)."""
        bits = s.to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _unordered(o):
        """The inverse of ``_ordered``."""
        return tl.where(o >= 0, o, o ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def _packed_keys(s, cols, BLOCK_N: tl.constexpr):
        """One int32 key per score of a whole row block: the order-preserving score bits with the low log2(BLOCK_N)
        bits replaced by BLOCK_N - 1 - column. Keys are unique within a row, one max gives the best score and its
        column (ties: the smallest column), at the price of the score's last log2(BLOCK_N) bits (15 mantissa bits
        kept at BLOCK_N 256; a bf16 score has 7)."""
        return (_ordered(s) & -BLOCK_N) | (BLOCK_N - 1 - cols[None, :])

    @triton.jit
    def _unpack_keys(keys, BLOCK_N: tl.constexpr):
        """``_packed_keys`` -> (score with its last log2(BLOCK_N) ordered bits zero, column)."""
        return _unordered(keys & -BLOCK_N), BLOCK_N - 1 - (keys & (BLOCK_N - 1))

    @triton.jit
    def _two_smallest(a1, a2, b1, b2):
        """Combine of a reduction to the two smallest values: (smallest, second smallest) of two such pairs."""
        return tl.minimum(a1, b1), tl.minimum(tl.maximum(a1, b1), tl.minimum(a2, b2))

    @triton.jit
    def _keep(r: tl.constexpr, mr, jr, m0, total, sel_idx, sel_val, kk, EXP: tl.constexpr):
        """``_rank``'s bookkeeping for the key of rank r (value ``mr``, id ``jr`` per row): the value, or with EXP its
        softmax numerator exp(value - best value), into slot r and the id beside it. Returns (best value, sum of the
        numerators, ids, values)."""
        if EXP:
            if r == 0:
                m0 = mr  # the best score: softmax reference
            mr = tl.exp(mr - m0)
            total += mr
        sel_idx = tl.where(kk[None, :] == r, jr[:, None], sel_idx)
        sel_val = tl.where(kk[None, :] == r, mr[:, None], sel_val)
        return m0, total, sel_idx, sel_val

    @triton.jit
    def _rank(s, ids, NO_ID: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
              PACKED: tl.constexpr, EXP: tl.constexpr, PAIRS: tl.constexpr = False):
        """K rounds over the candidate scores ``s`` (token ids ``ids``): the best remaining score (ties: the smallest
        id) is rank r. Returns the (BLOCK_M, BLOCK_K) ids and values by rank (slots from NUM_K on: 0) and a row sum:
        values = the scores (sum 0), or with EXP their softmax numerators exp(score - best score) and the softmax
        denominator, accumulated round by round (one exp per row and round). PACKED: ``s`` holds ``_packed_keys``
        (NO_ID = their BLOCK_N), so a round is one row reduction instead of two (max, then the smallest id at the
        max), and the keys already taken are skipped by value instead of being marked: from the second round on, the
        min of c - s below. Compiled for sm_90 by triton 3.6 (bf16, n 197, K 16, 16 queries on 4 warps) that took
        the row kernel from 130 to 110 registers and from 3,336 to 2,904 instructions. PAIRS (packed keys only,
        ``CONFIG['fwd_select'] = 'pairs'``): the rounds take two keys at a time, the two smallest of c - s in one
        reduction of (value, second value) pairs: half the rounds and half their cross-warp exchanges (barriers), at
        twice the work per key and round (the same compiled for sm_90: 80 registers, 3,064 instructions, 30 barriers
        against 54)."""
        kk = tl.arange(0, BLOCK_K)
        m0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        sel_idx = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
        sel_val = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        if PACKED and PAIRS:
            # c = -1 at first (c - key = ~key: every key, in reverse order), then c = (second key taken) - 1 + 2**31
            c = tl.full([BLOCK_M], -1, tl.int32)
            for r in tl.static_range(0, NUM_K, 2):
                t1, t2 = tl.reduce((tl.sub(c[:, None], s, sanitize_overflow=False),
                                    tl.full(s.shape, 2147483647, tl.int32)), 1, _two_smallest)
                k1 = tl.sub(c, t1, sanitize_overflow=False)
                k2 = tl.sub(c, t2, sanitize_overflow=False)
                c = tl.add(k2, 0x7FFFFFFF, sanitize_overflow=False)
                mr, jr = _unpack_keys(k1, NO_ID)
                m0, total, sel_idx, sel_val = _keep(r, mr, jr, m0, total, sel_idx, sel_val, kk, EXP)
                if r + 1 < NUM_K:
                    mr, jr = _unpack_keys(k2, NO_ID)
                    m0, total, sel_idx, sel_val = _keep(r + 1, mr, jr, m0, total, sel_idx, sel_val, kk, EXP)
        else:
            for r in tl.static_range(NUM_K):
                if PACKED:
                    if r == 0:
                        kr = tl.max(s, axis=1)
                    else:
                        # the largest key below the previous one kr, without marking the taken keys: with wrapping
                        # int32 arithmetic and c = kr - 1 + 2**31, c - key maps the keys below kr onto
                        # [-2**31, kr - 1] in reverse order and the taken ones (>= kr) above, so the min of c - s
                        # picks it (one subtraction per key and a min, where a compare, a select and a max had
                        # marked the taken key)
                        c = tl.add(kr, 0x7FFFFFFF, sanitize_overflow=False)
                        kr = tl.sub(c, tl.min(tl.sub(c[:, None], s, sanitize_overflow=False), axis=1),
                                    sanitize_overflow=False)
                    mr, jr = _unpack_keys(kr, NO_ID)
                else:
                    mr = tl.max(s, axis=1)
                    jr = tl.min(tl.where(s == mr[:, None], ids, NO_ID), axis=1)
                    s = tl.where(ids == jr[:, None], float('-inf'), s)
                m0, total, sel_idx, sel_val = _keep(r, mr, jr, m0, total, sel_idx, sel_val, kk, EXP)
        return sel_idx, sel_val, total

    @triton.jit
    def _rank_softmax_aggregate(
            s, ids, V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn, stride_on, M,
            DV: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
            BLOCK_K: tl.constexpr, NO_ID: tl.constexpr, PACKED: tl.constexpr, DROPOUT: tl.constexpr,
            PAIRS: tl.constexpr = False,
    ):
        """``_rank`` with softmax; out = sum_r w[:, r] * p_r * v[id_r]. Stores out, ids, p."""
        sel_idx, sel_e, denom = _rank(s, ids, NO_ID, NUM_K, BLOCK_M, BLOCK_K, PACKED, True, PAIRS)
        _softmax_store_aggregate(sel_idx, sel_e, denom, V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn,
                                 stride_on, M, DV, NUM_K, BLOCK_M, BLOCK_DV, BLOCK_K, DROPOUT)

    @triton.jit
    def _softmax_store_aggregate(
            sel_idx, sel_e, denom, V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn, stride_on, M,
            DV: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
            BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr,
    ):
        """The K kept ids and softmax numerators ``sel_e`` (denominators ``denom``) of a block of queries: stores ids
        and weights, then out = sum_r w[:, r] * p_r * v[id_r]."""
        denom = tl.where(row_ok, denom, 1.)
        _store_selection(sel_idx, sel_e / denom[:, None], IDX, P, rows, row_ok, M, NUM_K, BLOCK_K)
        _aggregate_stored(V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn, stride_on, DV, NUM_K, BLOCK_M, BLOCK_DV,
                          DROPOUT)

    @triton.jit
    def _store_selection(sel_idx, prob, IDX, P, rows, row_ok, M, NUM_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """The K ids and softmax weights of a block of queries. Ids are clamped to the M tokens: in the streaming
        kernels a query whose scores are all -inf (what fp16 overflow can hand over; NaN scores rank as +inf,
        ``_nan_first``) keeps nothing but the buffer's empty slots, whose ids lie outside them; its weights are NaN
        then, as on the PyTorch path, and its ids must still be safe to gather with."""
        sel_idx = tl.minimum(tl.maximum(sel_idx, 0), M - 1)
        kk = tl.arange(0, BLOCK_K)
        sel_mask = row_ok[:, None] & (kk[None, :] < NUM_K)
        sel_off = rows[:, None] * NUM_K + kk[None, :]
        tl.store(IDX + sel_off, sel_idx, mask=sel_mask)
        tl.store(P + sel_off, prob, mask=sel_mask)

    @triton.jit
    def _store_out(out, O, rows, row_ok, stride_on, DV: tl.constexpr, BLOCK_DV: tl.constexpr):
        dv = tl.arange(0, BLOCK_DV)
        tl.store(O + rows[:, None] * stride_on + dv[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))

    @triton.jit
    def _topk_softmax_aggregate(
            s, cols, V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn, stride_on, M,
            DV: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, PACKED: tl.constexpr, DROPOUT: tl.constexpr,
    ):
        """``_rank_softmax_aggregate`` for a whole score row block (token ids = columns), selecting with one bitonic
        ``tl.topk`` instead of K rounds of row reductions. Keys: exact int64 (order-preserving fp32 bits in the high
        word, BLOCK_N - 1 - column in the low word: ties go to the smallest id), or with PACKED the int32
        ``_packed_keys``. The top BLOCK_K keys come out sorted, best first; the ids and weights are stored, then read
        back one slot at a time for the aggregation (after a barrier: a load per slot instead of two cross-lane
        reductions)."""
        if PACKED:
            score, sel_idx = _unpack_keys(tl.topk(_packed_keys(s, cols, BLOCK_N), BLOCK_K), BLOCK_N)  # descending
        else:
            keys = (_ordered(s).to(tl.int64) << 32) | (BLOCK_N - 1 - cols[None, :]).to(tl.int64)
            top = tl.topk(keys, BLOCK_K)
            score = _unordered((top >> 32).to(tl.int32))
            sel_idx = BLOCK_N - 1 - (top & (BLOCK_N - 1)).to(tl.int32)
        kk = tl.arange(0, BLOCK_K)
        keep = kk[None, :] < NUM_K
        m0 = tl.max(tl.where(keep, score, float('-inf')), axis=1)
        e = tl.where(keep, tl.exp(score - m0[:, None]), 0.)
        _softmax_store_aggregate(sel_idx, e, tl.sum(e, axis=1), V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn,
                                 stride_on, M, DV, NUM_K, BLOCK_M, BLOCK_DV, BLOCK_K, DROPOUT)

    @triton.jit
    def _aggregate_stored(
            V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn, stride_on,
            DV: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
            DROPOUT: tl.constexpr,
    ):
        """out = sum_r w[:, r] * p_r * v[id_r] from the ids and weights this program has just stored, read back one
        slot at a time after a barrier (plain loads in the aggregation's own layout: no cross-lane extraction, no
        layout conversion per slot). Stores out. DROPOUT: p_r times the attention dropout's multiplier NOISE (0 or
        1 / (1 - p), laid out as P; the stored weights stay the softmax's, as the backward needs them)."""
        tl.debug_barrier()  # the stores of the selection are visible to every thread of the program
        row_off = rows * NUM_K
        dv = tl.arange(0, BLOCK_DV)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for r in tl.static_range(NUM_K):
            jr = tl.load(IDX + row_off + r, mask=row_ok, other=0)
            pr = tl.load(P + row_off + r, mask=row_ok, other=0.)
            if DROPOUT:
                pr *= tl.load(NOISE + row_off + r, mask=row_ok, other=0.)
            vrow = tl.load(V + jr[:, None] * stride_vn + dv[None, :],
                           mask=row_ok[:, None] & (dv[None, :] < DV), other=0.).to(tl.float32)
            wr = tl.load(W + (h * NUM_K + r) * DV + dv, mask=dv < DV, other=0.).to(tl.float32)  # W: (H, K, DV)
            acc += (pr[:, None] * vrow) * wr[None, :]
        _store_out(acc, O, rows, row_ok, stride_on, DV, BLOCK_DV)

    @triton.jit
    def _output_slices(V, O, IDX, P, NOISE, N, H, stride_vb, stride_vh, stride_ob, stride_oh, NUM_K: tl.constexpr):
        """V, O, IDX, P, NOISE at this program's (batch, head) slice, derived from the program id where they are first
        needed (pointers or slice indices held through the streaming loop cost registers)."""
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        return (V + b * stride_vb + h * stride_vh, O + b * stride_ob + h * stride_oh, IDX + bh * N * NUM_K,
                P + bh * N * NUM_K, NOISE + bh * N * NUM_K)

    @triton.jit
    def _query_block(Q, N, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, DQ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_DQ: tl.constexpr):
        """This program's block of queries (grid: query blocks, heads or groups, batch): their similarity features
        q (BLOCK_M, BLOCK_DQ), token ids, which are real, the channel range, and the key slice's offset."""
        pid_m = tl.program_id(0)  # query blocks of one (batch, head) slice run next to each other (keys stay in L2)
        h = tl.program_id(1)
        b = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dq = tl.arange(0, BLOCK_DQ)
        row_ok = rows < N
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dq[None, :],
                    mask=row_ok[:, None] & (dq[None, :] < DQ), other=0.)
        return q, rows, row_ok, dq, b * stride_kb + h * stride_kh

    @triton.jit
    def _self_score(q, Kf, kbase, qid, row_ok, dq, stride_kn, DQ: tl.constexpr):
        """(BLOCK_M,) fp32 scores of the query block against the queries' own tokens (ids ``qid``)."""
        kself = tl.load(Kf + kbase + qid[:, None] * stride_kn + dq[None, :],
                        mask=row_ok[:, None] & (dq[None, :] < DQ), other=0.)
        return _nan_first(tl.sum(q.to(tl.float32) * kself.to(tl.float32), axis=1))

    @triton.jit
    def _times(x, scale):
        """x * scale rounded to x's dtype, as PyTorch computes ``x * scale`` (fp32 arithmetic for half / bf16)."""
        return (x.to(tl.float32) * scale).to(x.dtype)

    @triton.jit
    def _replace_worst(best, best_i, thr, take, score, idx, BLOCK_K: tl.constexpr):
        """The running top-K buffer (``best`` scores, ``best_i`` ids; ``thr`` its row minima) with, in the rows where
        ``take``, the worst kept entry (the minimum score, among equal minima the largest id) replaced by
        (``score``, ``idx``)."""
        evict = tl.max(tl.where(best == thr[:, None], best_i, -BLOCK_K - 1), axis=1)
        upd = take[:, None] & (best_i == evict[:, None])
        return tl.where(upd, score[:, None], best), tl.where(upd, idx[:, None], best_i)

    @triton.jit
    def _empty_top_k(NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """An empty running top-K buffer for ``_replace_worst``: (BLOCK_M, BLOCK_K) scores and ids. Padding slots (from
        NUM_K on) hold +inf so that they are never the buffer minimum; real slots start empty (-inf, with distinct
        negative ids so that "the largest id among the minima" is one slot)."""
        kk = tl.arange(0, BLOCK_K)
        best = tl.where(kk[None, :] < NUM_K, float('-inf'), float('inf')) + tl.zeros([BLOCK_M, BLOCK_K],
                                                                                     dtype=tl.float32)
        return best, -1 - kk[None, :] + tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)

    @triton.jit
    def _stream_top_k(
            q, Kf, kbase, CAND, qid, row_ok, dq, stride_kn, M, L,
            DQ: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, F32: tl.constexpr, DOT_F32: tl.constexpr, CANDIDATES: tl.constexpr,
    ):
        """The K best keys of every query of the block, unordered: (BLOCK_M, BLOCK_K) scores (-inf from slot NUM_K
        on) and token ids. The L keys (all M tokens, or with CANDIDATES the L token ids in CAND plus each query itself,
        whose token id is ``qid``) stream in tiles of BLOCK_N through a running top-K buffer (score, id) per query; a
        tile is merged only while some query of the block has a tile score above its current K-th best (CTA-uniform
        loop), one insertion per query and merge round. Ties: the smallest id (with CANDIDATES, whose ids come in list
        order, an exact tie at the K-th place keeps one of the tied).

        Where the time goes (no GPU timing behind this, 2026-11-30): a query meets about K ln(n / K) insertions over
        the stream (111 at n 16385, K 16), but a merge round serves every query of the block at once and runs as long
        as the block's busiest query needs, so a block of 64 queries on random Gaussian features took 475 rounds
        over 257 tiles at K 16 and 360 at K 9, 708 / 480 with the features smoothed along the token order like
        image patches (``benchmarks/stream_rounds.py`` counts them on CPU). Compiled for sm_90 (triton 3.8, n 3137,
        K 16) a tile costs about 200 instructions per thread and a merge round 289, and the tile loop is not
        software-pipelined: the nested ``while`` keeps Triton's pipeliner from prefetching the next key tile (with an
        ``if`` in its place the loop gets asynchronous copies), and ptxas wraps each shuffle of the loop in
        warp-collective code (144 WARPSYNC / ENDCOLLECTIVE pairs), as it cannot tell that the loop's condition is
        uniform."""
        kk = tl.arange(0, BLOCK_K)
        real = kk[None, :] < NUM_K
        best, best_i = _empty_top_k(NUM_K, BLOCK_M, BLOCK_K)
        # the query itself is always a candidate. It starts in slot 0; with fp32 features of more than 64 channels it
        # enters after the loop instead (replacing the worst kept entry if it beats it). Compiled for sm_90 (triton
        # 3.6 and 3.8): loading its row before the loop made ptxas keep 32 registers and spill 3 KB per thread for such
        # features, while for half / bf16 ones slot 0 takes fewer registers (triton 3.6, 64 queries at K 16: 253, where
        # entering after the loop took 255 and spilled 136 bytes)
        SELF_LAST: tl.constexpr = F32 and DQ > 64
        if CANDIDATES and not SELF_LAST:
            best = tl.where(kk[None, :] == 0, _self_score(q, Kf, kbase, qid, row_ok, dq, stride_kn, DQ)[:, None], best)
            best_i = tl.where(kk[None, :] == 0, qid[:, None], best_i)
        thr = tl.min(best, axis=1)
        for start in range(0, L, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            if CANDIDATES:
                valid = pos < L
                ids = tl.load(CAND + pos, mask=valid, other=0)
                s = _scores(q, Kf, kbase, ids, valid, dq, stride_kn, DQ, F32, DOT_F32)
                s = tl.where(ids[None, :] == qid[:, None], float('-inf'), s)  # the query itself: not twice
            else:
                ids = pos
                s = _scores(q, Kf, kbase, ids, pos < M, dq, stride_kn, DQ, F32, DOT_F32)
            mx = tl.max(s, axis=1)
            todo = (mx > thr) & row_ok
            while tl.max(todo.to(tl.int32), axis=0) > 0:
                j = tl.min(tl.where(s == mx[:, None], ids[None, :], M), axis=1)  # ties: the smallest id
                best, best_i = _replace_worst(best, best_i, thr, todo, mx, j, BLOCK_K)
                s = tl.where(todo[:, None] & (ids[None, :] == j[:, None]), float('-inf'), s)
                thr = tl.min(best, axis=1)
                mx = tl.max(s, axis=1)
                todo = (mx > thr) & row_ok
        if CANDIDATES and SELF_LAST:
            s_self = _self_score(q, Kf, kbase, qid, row_ok, dq, stride_kn, DQ)
            best, best_i = _replace_worst(best, best_i, thr, s_self > thr, s_self, qid, BLOCK_K)
        best = tl.where(real, best, float('-inf'))
        return best, best_i

    @triton.jit
    def _tile_threshold(
            q, Kf, kbase, dq, stride_kn, M,
            DQ: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, F32: tl.constexpr, DOT_F32: tl.constexpr, PER_TILE: tl.constexpr,
    ):
        """A lower bound of every query's K-th best score over all M keys, from one pass over the key tiles: the K-th
        largest of the tiles' PER_TILE best scores (each of those K values stands for a distinct key scoring at least
        as much; a score tied with a larger one taken from the same tile counts as the next smaller one, which only
        lowers the bound). -inf when the tiles hold fewer than K such values. No data-dependent loop: a tile's values
        enter the running top-K buffer in PER_TILE masked replacements."""
        best, best_i = _empty_top_k(NUM_K, BLOCK_M, BLOCK_K)
        thr = tl.min(best, axis=1)
        for start in range(0, M, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            s = _scores(q, Kf, kbase, pos, pos < M, dq, stride_kn, DQ, F32, DOT_F32)
            for t in tl.static_range(PER_TILE):
                mx = tl.max(s, axis=1)
                best, best_i = _replace_worst(best, best_i, thr, mx > thr, mx,
                                              tl.full([BLOCK_M], start + t, tl.int32), BLOCK_K)
                thr = tl.min(best, axis=1)
                if t + 1 < PER_TILE:
                    s = tl.where(s == mx[:, None], float('-inf'), s)
        return thr

    @triton.jit
    def _threshold_top_k(
            q, Kf, kbase, SCR_S, SCR_I, rows, row_ok, dq, stride_kn, M,
            DQ: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, F32: tl.constexpr, DOT_F32: tl.constexpr, PER_TILE: tl.constexpr,
            CAP: tl.constexpr,
    ):
        """``_stream_top_k`` over all M tokens in two loop passes without data-dependent rounds
        (``CONFIG['fwd_stream'] = 'threshold'``): the first bounds every query's K-th best score from below
        (``_tile_threshold``); the second writes each query's keys scoring at least that bound (a superset of its K
        best, ties included), scores and token ids, to this program's slots of the scratch ``SCR_S`` / ``SCR_I``
        (CAP per query; positions by a running count and a prefix sum over the tile). Returns (BLOCK_M, CAP) scores
        (-inf in the unused slots) and token ids for ``_rank``. A block in which some query has more than CAP such
        keys (near-equal scores, a cluster of similar tokens) runs ``_stream_top_k``'s merge loop instead and ranks its
        K kept. Both passes score every tile (twice the products of the merge loop), and each tile's body is straight
        code that Triton can software-pipeline; at n 16385 a query's bound leaves about K to 2K keys (Gaussian
        features; more for clustered ones, ``benchmarks/stream_rounds.py --threshold``)."""
        thr = _tile_threshold(q, Kf, kbase, dq, stride_kn, M, DQ, NUM_K, BLOCK_M, BLOCK_N, BLOCK_K, F32, DOT_F32,
                              PER_TILE)
        pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
        slots = pid * (BLOCK_M * CAP) + tl.arange(0, BLOCK_M) * CAP  # this program's scratch, a row per query
        count = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start in range(0, M, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < M
            s = _scores(q, Kf, kbase, pos, valid, dq, stride_kn, DQ, F32, DOT_F32)
            take = (s >= thr[:, None]) & valid[None, :] & row_ok[:, None]
            at = count[:, None] + tl.cumsum(take.to(tl.int32), axis=1) - 1
            keep = take & (at < CAP)
            tl.store(SCR_S + slots[:, None] + at, s, mask=keep)
            tl.store(SCR_I + slots[:, None] + at, pos[None, :] + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32),
                     mask=keep)
            count += tl.sum(take.to(tl.int32), axis=1)
        if tl.max(count, axis=0) > CAP:  # CTA-uniform: some query's superset does not fit
            tl.debug_barrier()  # (the stores below land after every thread's stores above)
            best, best_i = _stream_top_k(q, Kf, kbase, Kf, rows, row_ok, dq, stride_kn, M, M, DQ, NUM_K, BLOCK_M,
                                         BLOCK_N, BLOCK_K, F32, DOT_F32, False)
            kk = tl.arange(0, BLOCK_K)
            tl.store(SCR_S + slots[:, None] + kk[None, :], best, mask=kk[None, :] < NUM_K)
            tl.store(SCR_I + slots[:, None] + kk[None, :], best_i, mask=kk[None, :] < NUM_K)
            count = tl.full([BLOCK_M], NUM_K, tl.int32)
        tl.debug_barrier()  # the scratch stores are visible to every thread of the program
        c = tl.arange(0, CAP)
        used = c[None, :] < count[:, None]
        best = tl.load(SCR_S + slots[:, None] + c[None, :], mask=used, other=float('-inf'))
        best_i = tl.load(SCR_I + slots[:, None] + c[None, :], mask=used, other=0)
        return best, tl.where(used, best_i, M + c[None, :])

    @triton.jit
    def _convnn_fwd_kernel(
            Q, Kf, V, W, O, IDX, P, CAND, SCR_S, SCR_I, NOISE,
            N, M, L, H, q_scale,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_on,
            DQ: tl.constexpr, DV: tl.constexpr, NUM_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
            BLOCK_K: tl.constexpr, F32: tl.constexpr, DOT_F32: tl.constexpr, STREAM: tl.constexpr,
            CANDIDATES: tl.constexpr, TOPK: tl.constexpr, PACKED: tl.constexpr, PAIRS: tl.constexpr,
            PER_TILE: tl.constexpr = 0, CAP: tl.constexpr = 64, DROPOUT: tl.constexpr = False,
    ):
        """Forward, one program per (batch x head, block of queries). STREAM=False (up to ``ROW_TOKENS`` tokens): the
        whole score row block in registers, ranked in place; with CANDIDATES the row holds the L listed tokens in
        columns 0 .. L - 1 and each query's own token in column L (L + 1 <= BLOCK_N). STREAM=True: the keys stream
        through a running top-K buffer (``_stream_top_k``), which is then ranked; with PER_TILE (all tokens,
        ``CONFIG['fwd_stream'] = 'threshold'``) a threshold pass and a pass collecting every key above it into the
        scratch SCR_S / SCR_I come first (``_threshold_top_k``).

        Grid: (query blocks, heads, batch). q, k, v and the output are read and written in place through their
        (batch, head, token) strides (timm's attention hands over permuted views of one qkv buffer: no copies); offsets
        are int32, the caller splits the batch so that they fit. DROPOUT: attention dropout, the softmax weights
        times NOISE (B, H, N, NUM_K) in the aggregation (``_aggregate_stored``)."""
        h = tl.program_id(1)
        q, rows, row_ok, dq, kbase = _query_block(Q, N, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, DQ,
                                                  BLOCK_M, BLOCK_DQ)
        q = _times(q, q_scale)  # similarity features q * q_scale (dot similarity: d ** -0.5), not stored apart
        if STREAM:
            if PER_TILE:
                best, best_i = _threshold_top_k(q, Kf, kbase, SCR_S, SCR_I, rows, row_ok, dq, stride_kn, M, DQ, NUM_K,
                                                BLOCK_M, BLOCK_N, BLOCK_K, F32, DOT_F32, PER_TILE, CAP)
            else:
                best, best_i = _stream_top_k(q, Kf, kbase, CAND, rows, row_ok, dq, stride_kn, M, L, DQ, NUM_K,
                                             BLOCK_M, BLOCK_N, BLOCK_K, F32, DOT_F32, CANDIDATES)
            V, O, IDX, P, NOISE = _output_slices(V, O, IDX, P, NOISE, N, H, stride_vb, stride_vh, stride_ob,
                                                 stride_oh, NUM_K)
            _rank_softmax_aggregate(best, best_i, V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn, stride_on, M,
                                    DV, NUM_K, BLOCK_M, BLOCK_DV, BLOCK_K, M, False, DROPOUT)
        elif CANDIDATES:
            cols = tl.arange(0, BLOCK_N)
            listed = cols < L
            ids = tl.load(CAND + cols, mask=listed, other=0)
            s = _scores(q, Kf, kbase, ids, listed, dq, stride_kn, DQ, F32, DOT_F32)
            s = tl.where(ids[None, :] == rows[:, None], float('-inf'), s)  # the query itself: not twice
            s_self = _self_score(q, Kf, kbase, rows, row_ok, dq, stride_kn, DQ)
            s = tl.where(cols[None, :] == L, s_self[:, None], s)
            V, O, IDX, P, NOISE = _output_slices(V, O, IDX, P, NOISE, N, H, stride_vb, stride_vh, stride_ob,
                                                 stride_oh, NUM_K)
            if PACKED:
                s = _packed_keys(s, cols, BLOCK_N)
            sel_col, sel_e, denom = _rank(s, cols[None, :], BLOCK_N, NUM_K, BLOCK_M, BLOCK_K, PACKED, True, PAIRS)
            # columns -> token ids: the list's, or the query's own
            sel_idx = tl.where(sel_col == L, rows[:, None], tl.load(CAND + sel_col, mask=sel_col < L, other=0))
            _softmax_store_aggregate(sel_idx, sel_e, denom, V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn,
                                     stride_on, M, DV, NUM_K, BLOCK_M, BLOCK_DV, BLOCK_K, DROPOUT)
        else:
            cols = tl.arange(0, BLOCK_N)
            s = _scores(q, Kf, kbase, cols, cols < M, dq, stride_kn, DQ, F32, DOT_F32)
            V, O, IDX, P, NOISE = _output_slices(V, O, IDX, P, NOISE, N, H, stride_vb, stride_vh, stride_ob,
                                                 stride_oh, NUM_K)
            if TOPK:
                _topk_softmax_aggregate(s, cols, V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn, stride_on, M,
                                        DV, NUM_K, BLOCK_M, BLOCK_N, BLOCK_DV, BLOCK_K, PACKED, DROPOUT)
            elif PACKED:
                _rank_softmax_aggregate(_packed_keys(s, cols, BLOCK_N), cols[None, :], V, W, O, IDX, P, NOISE, h,
                                        rows, row_ok, stride_vn, stride_on, M, DV, NUM_K, BLOCK_M, BLOCK_DV, BLOCK_K,
                                        BLOCK_N, True, DROPOUT, PAIRS)
            else:
                _rank_softmax_aggregate(s, cols[None, :], V, W, O, IDX, P, NOISE, h, rows, row_ok, stride_vn,
                                        stride_on, M, DV, NUM_K, BLOCK_M, BLOCK_DV, BLOCK_K, BLOCK_N, False, DROPOUT)

    @triton.jit
    def _convnn_select_kernel(
            Q, Kf, IDX, S, CAND, QIDX, SCR_S, SCR_I, N, M, L, G,
            stride_qb, stride_qg, stride_qn, stride_kb, stride_kg, stride_kn,
            DQ: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_DQ: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr, DOT_F32: tl.constexpr,
            CANDIDATES: tl.constexpr, PER_TILE: tl.constexpr = 0, CAP: tl.constexpr = 64,
    ):
        """Top-K selection alone, one program per (batch x group, block of queries): the N queries against all M
        keys, or with CANDIDATES against the L token ids in CAND plus each query's own token (its id in QIDX), through
        ``_stream_top_k``, ranked best first (ties: the smallest id); stores the K token ids and their fp32 scores per
        query. For the ConvNN layers whose weighting or aggregation the fused forward does not cover (``ConvNN2d``,
        ``ones`` weights, standard aggregation): they aggregate in PyTorch. PER_TILE (all tokens): through
        ``_threshold_top_k`` instead, as the forward."""
        q, rows, row_ok, dq, kbase = _query_block(Q, N, stride_qb, stride_qg, stride_qn, stride_kb, stride_kg, DQ,
                                                  BLOCK_M, BLOCK_DQ)
        # two calls rather than one with (qid, key count) picked by CANDIDATES: all tokens pass M as the key count,
        # which compiled for sm_90 (triton 3.8) keeps fp32 128-channel features free of a spill that a separate L had
        if CANDIDATES:
            best, best_i = _stream_top_k(q, Kf, kbase, CAND, tl.load(QIDX + rows, mask=row_ok, other=0), row_ok, dq,
                                         stride_kn, M, L, DQ, NUM_K, BLOCK_M, BLOCK_N, BLOCK_K, F32, DOT_F32,
                                         True)
        elif PER_TILE:
            best, best_i = _threshold_top_k(q, Kf, kbase, SCR_S, SCR_I, rows, row_ok, dq, stride_kn, M, DQ, NUM_K,
                                            BLOCK_M, BLOCK_N, BLOCK_K, F32, DOT_F32, PER_TILE, CAP)
        else:
            best, best_i = _stream_top_k(q, Kf, kbase, CAND, rows, row_ok, dq, stride_kn, M, M, DQ, NUM_K, BLOCK_M,
                                         BLOCK_N, BLOCK_K, F32, DOT_F32, False)
        sel_idx, score, _ = _rank(best, best_i, M, NUM_K, BLOCK_M, BLOCK_K, False, False)
        bg = tl.program_id(2) * G + tl.program_id(1)
        _store_selection(sel_idx, score, IDX + bg * N * NUM_K, S + bg * N * NUM_K, rows, row_ok, M, NUM_K,
                         BLOCK_K)

    @triton.jit
    def _convnn_bwd_kernel(
            GO, Q, Kf, V, W, IDX, P, DQo, DKo, DVo, DWo, CAND, INV, NOISE,
            N, M, L, H, DW_COPIES, ROW_COPIES, q_scale,
            stride_gb, stride_gh, stride_gn, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn,
            DQ: tl.constexpr, DV: tl.constexpr, NUM_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr,
            DENSE: tl.constexpr, BLOCK_C: tl.constexpr, DENSE_DOT: tl.constexpr, DROPOUT: tl.constexpr = False,
    ):
        """Backward, one program per (batch x head, block of queries), through the K kept (query, token) pairs only:
        dq in registers; dk, dv and dw by relaxed atomics (only the sums after the kernel matter; Triton's default,
        acquire-release, compiled for sm_90 to a GPU-wide fence and an L1 invalidation around each of the 272 atomic
        instructions per thread at K 16, so every later gathered row missed L1). dw goes to one of DW_COPIES copies
        (programs of one head spread over them by batch and query block; the caller sums them), not to one
        (H, K, DV) block that every program of the head would update. Likewise dk and dv go to one of ROW_COPIES
        copies (``_row_copies``, 1 unless asked for). Strided inputs as in the forward; dq (in q's dtype) is
        contiguous (B, H, N, DQ), dk and dv (fp32) are contiguous (B, ROW_COPIES, H, M, channels).

        DENSE (a forward that took a candidate list: every kept token is one of the L listed in CAND, whose list
        positions INV maps token ids to, or the query itself): dk and dv of the listed tokens are summed over the
        program's queries first, as (BLOCK_C, channels) tiles of BLOCK_C list positions (one-hot matrices times the
        per-query terms on the tensor cores, fp32 operands multiplied as DENSE_DOT), then added with one
        atomic per listed token and channel instead of one per query, slot and channel; each query's own token gets
        its terms directly.

        DROPOUT: the forward aggregated the softmax weights times NOISE (laid out as P): dv and dw take the dropped
        weights, and the weights' gradient is NOISE times the dropped weights' before it meets the softmax."""
        pid_m = tl.program_id(0)  # query blocks of one (batch, head) slice run next to each other (keys stay in L2)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        GO += b * stride_gb + h * stride_gh
        Q += b * stride_qb + h * stride_qh
        Kf += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        IDX += bh * N * NUM_K
        P += bh * N * NUM_K
        NOISE += bh * N * NUM_K
        DQo += bh * N * DQ
        bch = (b * ROW_COPIES + (pid_m + b * tl.num_programs(0)) % ROW_COPIES) * H + h
        DKo += bch * M * DQ
        DVo += bch * M * DV
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dq_r = tl.arange(0, BLOCK_DQ)
        dv_r = tl.arange(0, BLOCK_DV)
        kk = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        mq = row_ok[:, None] & (dq_r[None, :] < DQ)
        mv = row_ok[:, None] & (dv_r[None, :] < DV)
        sel_mask = row_ok[:, None] & (kk[None, :] < NUM_K)
        sel_off = rows[:, None] * NUM_K + kk[None, :]
        p = tl.load(P + sel_off, mask=sel_mask, other=0.)
        row_off = rows * NUM_K  # slot r of every row: one (cached) load, no cross-lane reduction
        dw_base = DWo + (((pid_m + b * tl.num_programs(0)) % DW_COPIES) * H + h) * NUM_K * DV
        go = tl.load(GO + rows[:, None] * stride_gn + dv_r[None, :], mask=mv, other=0.).to(tl.float32)
        # the similarity features q * q_scale as the forward used them (dk's terms); dq gets the scale at the end
        q = _times(tl.load(Q + rows[:, None] * stride_qn + dq_r[None, :], mask=mq, other=0.), q_scale).to(tl.float32)

        # through the aggregation: dp (weights), dv and dw
        dp = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for r in tl.static_range(NUM_K):
            jr = tl.load(IDX + row_off + r, mask=row_ok, other=0)
            pr = tl.load(P + row_off + r, mask=row_ok, other=0.)
            vrow = tl.load(V + jr[:, None] * stride_vn + dv_r[None, :], mask=mv, other=0.).to(tl.float32)
            wr = tl.load(W + (h * NUM_K + r) * DV + dv_r, mask=dv_r < DV, other=0.).to(tl.float32)
            t = vrow * go
            dpr = tl.sum(t * wr[None, :], axis=1)
            if DROPOUT:
                nr = tl.load(NOISE + row_off + r, mask=row_ok, other=0.)
                pr *= nr  # the weight the forward aggregated with
                dpr *= nr  # through the multiplier to the softmax weight
            dp = tl.where(kk[None, :] == r, dpr[:, None], dp)
            tl.atomic_add(dw_base + r * DV + dv_r, tl.sum(pr[:, None] * t, axis=0), mask=dv_r < DV,
                          sem='relaxed')
            if not DENSE:
                tl.atomic_add(DVo + jr[:, None] * DV + dv_r[None, :],
                              (pr[:, None] * wr[None, :]) * go, mask=mv, sem='relaxed')
        # through the softmax over the K kept scores, then the selected dot products
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dq = tl.zeros([BLOCK_M, BLOCK_DQ], dtype=tl.float32)
        for r in tl.static_range(NUM_K):
            jr = tl.load(IDX + row_off + r, mask=row_ok, other=0)
            dsr = tl.sum(tl.where(kk[None, :] == r, ds, 0.), axis=1)
            krow = tl.load(Kf + jr[:, None] * stride_kn + dq_r[None, :], mask=mq, other=0.).to(tl.float32)
            dq += dsr[:, None] * krow
            if not DENSE:
                tl.atomic_add(DKo + jr[:, None] * DQ + dq_r[None, :], dsr[:, None] * q, mask=mq, sem='relaxed')
        tl.store(DQo + rows[:, None] * DQ + dq_r[None, :], (dq * q_scale).to(DQo.dtype.element_ty), mask=mq)
        if DENSE:
            if DROPOUT:  # (dv's terms take the dropped weights)
                p *= tl.load(NOISE + sel_off, mask=sel_mask, other=0.)
            _dense_listed_grads(go, q, p, ds, IDX, W, CAND, INV, DKo, DVo, h, rows, row_ok, row_off, L,
                                DQ, DV, NUM_K, BLOCK_M, BLOCK_DQ, BLOCK_DV, BLOCK_K, BLOCK_C, DENSE_DOT)

    @triton.jit
    def _dense_listed_grads(
            go, q, p, ds, IDX, W, CAND, INV, DKo, DVo, h, rows, row_ok, row_off, L,
            DQ: tl.constexpr, DV: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
            DENSE_DOT: tl.constexpr,
    ):
        """dk += ds * q and dv += p * w * go of the program's (query, slot) pairs (``_convnn_bwd_kernel``, DENSE):
        summed per listed token over the program's queries, BLOCK_C list positions at a time, then one atomic per
        token and channel; the queries' own tokens directly. The slots are runtime loops (unrolled, they spilled
        registers from K 32, see LISTED_BLOCK_M)."""
        kk = tl.arange(0, BLOCK_K)
        dq_r = tl.arange(0, BLOCK_DQ)
        dv_r = tl.arange(0, BLOCK_DV)
        mq = row_ok[:, None] & (dq_r[None, :] < DQ)
        mv = row_ok[:, None] & (dv_r[None, :] < DV)
        # each kept token's list position (-1: the query itself, which the forward ranks apart from the list)
        pos = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32) - 1
        has_self = tl.zeros([BLOCK_M], dtype=tl.int32)
        self_ds = tl.zeros([BLOCK_M], dtype=tl.float32)
        self_v = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for r in range(NUM_K):
            jr = tl.load(IDX + row_off + r, mask=row_ok, other=0)
            own = (jr == rows) & row_ok
            pos_r = tl.where(own, -1, tl.load(INV + jr, mask=row_ok, other=-1))
            pos = tl.where(kk[None, :] == r, pos_r[:, None], pos)
            wr = tl.load(W + (h * NUM_K + r) * DV + dv_r, mask=dv_r < DV, other=0.)
            pr = tl.sum(tl.where(kk[None, :] == r, p, 0.), axis=1)
            has_self += own.to(tl.int32)
            self_ds += tl.sum(tl.where((kk[None, :] == r) & own[:, None], ds, 0.), axis=1)
            self_v += tl.where(own, pr, 0.)[:, None] * wr[None, :]
        mine = (has_self > 0)[:, None]
        tl.atomic_add(DKo + rows[:, None] * DQ + dq_r[None, :], self_ds[:, None] * q, mask=mq & mine, sem='relaxed')
        tl.atomic_add(DVo + rows[:, None] * DV + dv_r[None, :], self_v * go, mask=mv & mine, sem='relaxed')
        for c0 in range(0, L, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            dv_acc = tl.zeros([BLOCK_C, BLOCK_DV], dtype=tl.float32)
            for s in range(NUM_K):  # (a runtime loop like the one above, see LISTED_BLOCK_M)
                pos_r = tl.sum(tl.where(kk[None, :] == s, pos, 0), axis=1)
                hit = pos_r[:, None] == cols[None, :]
                g += tl.where(hit, tl.sum(tl.where(kk[None, :] == s, ds, 0.), axis=1)[:, None], 0.)
                a = tl.where(hit, tl.sum(tl.where(kk[None, :] == s, p, 0.), axis=1)[:, None], 0.)
                wr = tl.load(W + (h * NUM_K + s) * DV + dv_r, mask=dv_r < DV, other=0.)
                # w is per channel: it scales the sum over queries after the product, not go before it
                dv_acc += tl.dot(tl.trans(a), go, input_precision=DENSE_DOT) * wr[None, :]
            dk_c = tl.dot(tl.trans(g), q, input_precision=DENSE_DOT)
            listed = cols < L
            tok = tl.load(CAND + cols, mask=listed, other=0)
            tl.atomic_add(DKo + tok[:, None] * DQ + dq_r[None, :], dk_c,
                          mask=listed[:, None] & (dq_r[None, :] < DQ), sem='relaxed')
            tl.atomic_add(DVo + tok[:, None] * DV + dv_r[None, :], dv_acc,
                          mask=listed[:, None] & (dv_r[None, :] < DV), sem='relaxed')


_INT32_MAX = 2 ** 31 - 1
_GRID_Z = 65535  # CUDA's limit on the third grid axis (the batch)
_GRID_Y = 65535  # and on the second (the heads)


def _entry_span(x: torch.Tensor) -> int:
    """Elements one batch entry of x spans in memory."""
    shape, stride, span = x.shape, x.stride(), 1
    for i in range(1, len(shape)):
        span += (shape[i] - 1) * stride[i]
    return span


def _storage_fits(x: torch.Tensor) -> bool:
    """Whether every element offset from x's data pointer fits int32 because its whole storage does: a sufficient test
    at a fifth of ``_entry_span``'s host time (an allocated tensor cannot reach past its storage; a meta tensor's
    strides are not bound by one, so those take the exact test)."""
    return not x.is_meta and x.untyped_storage().nbytes() // x.element_size() <= _INT32_MAX


def _in_place(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) as the kernels read it: in place (any batch / head / token strides, e.g. timm's permuted views of
    its qkv buffer) when channels are unit-stride and one batch entry spans fewer than 2**31 elements (the kernels'
    int32 offsets); otherwise a contiguous copy."""
    if x.stride(-1) == 1 and (_storage_fits(x) or _entry_span(x) <= _INT32_MAX):
        return x
    x = x.contiguous()
    if _entry_span(x) > _INT32_MAX:
        raise ValueError(f'the fused ConvNN kernels take at most 2**31 - 1 elements per batch entry; got '
                         f'{tuple(x.shape[1:])}')
    return x


def _batch_chunks(batch: int, *tensors: torch.Tensor, most: int = _GRID_Z) -> List[Tuple[int, int]]:
    """Batch ranges, one launch each: at most ``most`` (<= ``_GRID_Z``) entries, and few enough that every offset
    inside a launch fits the kernels' int32 arithmetic in every tensor (one launch at any usual size)."""
    if batch <= most and all(_storage_fits(t) for t in tensors):
        return [(0, batch)] if batch > 0 else []
    step = most
    for t in tensors:
        if t.stride(0) > 0:
            step = min(step, (_INT32_MAX - _entry_span(t)) // t.stride(0) + 1)
    step = max(1, step)
    return [(s, min(batch, s + step)) for s in range(0, batch, step)]


def _batch_slices(batch: int, *tensors: torch.Tensor,
                  most: int = _GRID_Z) -> List[Tuple[int, Tuple[torch.Tensor, ...]]]:
    """One (batch entries, tensors) per launch: the ``_batch_chunks`` ranges, every tensor sliced to its range, or
    as they are when one launch covers the batch (the usual case: no slicing on the host)."""
    chunks = _batch_chunks(batch, *tensors, most=most)
    if len(chunks) == 1:
        return [(batch, tensors)]
    return [(e - s, tuple(t[s:e] for t in tensors)) for s, e in chunks]


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (``triton.cdiv`` is a constexpr function: several microseconds per host call)."""
    return -(-a // b)


def _strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """Batch, head and token strides of a (B, H, L, D) tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _slot_major(weight: torch.Tensor, H: int, DV: int, K: int) -> torch.Tensor:
    """Depthwise weights (H * DV, 1, K_max) -> (H, K, DV) fp32 for the first K slots: one slot's DV weights contiguous
    (coalesced loads and atomics in the kernels)."""
    return weight.reshape(H, DV, -1)[:, :, :K].transpose(1, 2).float().contiguous()


def _fwd_block_m(stream: bool, fp32: bool, num_kept: int, channels: int, listed: bool, threshold: bool = False,
                 arch: int = 90) -> int:
    """The built-in queries per program of the forward / selection kernels (``fp32``: the scores multiply fp32
    operands; ``channels``: of the similarity features; ``listed``: a candidate list; ``threshold``: the passes of
    CONFIG fwd_stream='threshold', which on 64 queries spill for fp32 features: compiled for sm_90, 216-320 bytes per
    thread under triton 3.6 / 3.8 at 64 or 32 queries, none at 16; ``arch``: the GPU's compute capability x 10, fp32
    products stream on 64 queries on Hopper only), see STREAM_BLOCK_QUERIES."""
    if not stream or num_kept > 32 or threshold and fp32:
        return BLOCK_QUERIES
    if fp32 and (_dot_f32() == 'ieee' or channels > 64 and listed or arch // 10 != 9):
        return BLOCK_QUERIES
    if arch // 10 == 10:  # sm_100 (B200): 64 streaming queries spill 88 / 360 bytes (triton 3.8 / 3.9), 32 none
        return STREAM_BLOCK_QUERIES // 2
    return STREAM_BLOCK_QUERIES


def _streams(num_tokens: int, num_listed: Optional[int]) -> bool:
    """Whether the forward streams the keys (``num_listed``: the length of a candidate list, None for all tokens):
    above ROW_TOKENS tokens, and for candidate lists unless ``CONFIG['fwd_listed'] == 'row'`` and the list plus the
    query's own token fit a row (at most ROW_TOKENS)."""
    if num_listed is None:
        return num_tokens > ROW_TOKENS
    return not (CONFIG['fwd_listed'] == 'row' and num_listed + 1 <= ROW_TOKENS)


def _fwd_warps(stream: bool, fp32: bool, listed: bool, threshold: bool = False) -> int:
    """The forward's and the selection's warps (``CONFIG['fwd_warps']``): 4, or 8 for a candidate list ranked as one
    row (CONFIG fwd_listed='row') with fp32 products, which compiled for sm_90 spill 280-312 bytes per thread on 4
    warps (triton 3.6 / 3.8) and keep 186-188 registers on 8, and for the passes of CONFIG fwd_stream='threshold'
    (``threshold``): on 4 warps those sit at the 255-register ceiling (bf16, K 16, 64 queries: 244 under triton 3.8)
    and spill under 3.9 (16 bytes; 168 at K 9; 8 for the fp32 selection at 16 queries, 128 channels), on 8 they keep
    128-225 registers under 3.6 / 3.8 / 3.9, no spills."""
    return CONFIG['fwd_warps'] or (8 if threshold or (listed and fp32 and not stream) else 4)


def _tile_values(num_tokens: int, num_kept: int) -> int:
    """The threshold pass's values per key tile (``_tile_threshold``): the fewer tiles per kept neighbour, the more
    values each tile gives (1 from 4K tiles up, else 2 from 2K, else 4), as a bound from few values leaves more keys
    above it (``benchmarks/stream_rounds.py --threshold``)."""
    tiles = _cdiv(num_tokens, STREAM_BLOCK_N)
    return 1 if tiles >= 4 * num_kept else 2 if 2 * tiles >= 4 * num_kept else 4


def _per_tile(stream: bool, num_tokens: int, num_kept: int, listed: bool) -> int:
    """PER_TILE of the forward / selection launches: ``_tile_values`` with ``CONFIG['fwd_stream'] = 'threshold'`` for
    streamed ones over all tokens, else 0 (the merge loop)."""
    if CONFIG['fwd_stream'] != 'threshold' or not stream or listed:
        return 0
    return _tile_values(num_tokens, num_kept)


def _stream_cap(num_kept: int) -> int:
    """CAP of the threshold kernels: STREAM_CAP slots per query, at least the K kept (a power of two)."""
    return max(STREAM_CAP, _pow2(num_kept, 2))


def _top_k_launch(stream: bool, fp32: bool, num_kept: int, channels: int, listed: bool, num_tokens: int, batch: int,
                  heads: int, queries: int, spare: Tuple[torch.Tensor, torch.Tensor],
                  ) -> Tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """(queries per program, PER_TILE, most batch entries per launch, scratch scores, scratch token ids) of a forward
    or selection launch (``_fwd_block_m``, ``_per_tile``). The threshold kernels' scratch holds ``_stream_cap`` slots
    per query of a launch, at most SCRATCH_BYTES unless one batch entry needs more; where one batch entry's slots
    would not fit the kernels' int32 offsets, PER_TILE is 0 (the merge loop). Without scratch the kernels get
    ``spare``, an fp32 and an int32 tensor of the launch that they never read there (no allocation per call)."""
    per_tile = _per_tile(stream, num_tokens, num_kept, listed)
    block_m = CONFIG['fwd_block_m'] or _fwd_block_m(stream, fp32, num_kept, channels, listed, per_tile > 0,
                                                    _arch(spare[0].device))
    per_entry = heads * _cdiv(queries, block_m) * block_m * _stream_cap(num_kept)
    if not per_tile or per_entry > _INT32_MAX:
        return (block_m, 0, _GRID_Z) + spare
    most = max(1, min(batch, _GRID_Z, SCRATCH_BYTES // (8 * per_entry)))
    device = spare[0].device
    return (block_m, per_tile, most, torch.empty(most * per_entry, device=device),
            torch.empty(most * per_entry, device=device, dtype=torch.int32))


def _use_packed_keys(fp32: bool) -> bool:
    """Whether the row kernel ranks packed int32 keys (``CONFIG['fwd_keys']``; built in: for half / bf16 inputs)."""
    return (CONFIG['fwd_keys'] or ('exact' if fp32 else 'packed')) == 'packed'


def _bwd_launch(dtype: torch.dtype, num_tokens: int, num_kept: int, dq: int, dv: int,
                dense: bool = False) -> Tuple[int, int, int]:
    """The backward's queries per program, warps and (``dense``) list positions per tile: ``CONFIG['bwd_block_m']`` /
    ``['bwd_warps']``, else 8 queries on
    one warp for half / bf16 inputs at up to ROW_TOKENS tokens, K <= 16 and head dims <= 64 (no barrier, about half the
    instructions per query; on the H200 at B 64, 12 heads, n 197, K 16, bf16: 0.51 ms against 0.78 ms for 16 queries
    on 4 warps, benchmarks/results/h200-kernel-sweep.json; at n 3137 the two tie, 0.38 / 0.37 ms), else 16 on 4 warps.
    Compiled for sm_90 (triton 3.6 / 3.8) the 8-query one spills from K 32 or 128-channel heads: those keep 16.
    ``dense`` (CONFIG bwd_listed): LISTED_BLOCK_M queries on LISTED_WARPS warps over LISTED_BLOCK_C list positions at
    a time (``CONFIG['bwd_block_c']``); 16 queries for fp32 inputs and head dims over 64 (no spills, see
    LISTED_BLOCK_M)."""
    if dense:  # the dense candidate-list sums (CONFIG bwd_listed): tensor-core tiles of at least 16 queries
        narrow = dtype == torch.float32 or max(dq, dv) > 64
        return (CONFIG['bwd_block_m'] or (16 if narrow else LISTED_BLOCK_M), CONFIG['bwd_warps'] or LISTED_WARPS,
                CONFIG['bwd_block_c'] or LISTED_BLOCK_C)
    small = (dtype in (torch.float16, torch.bfloat16) and num_tokens <= ROW_TOKENS and num_kept <= 16
             and max(dq, dv) <= 64)
    block_m, warps = (8, 1) if small else (BLOCK_QUERIES, 4)
    return CONFIG['bwd_block_m'] or block_m, CONFIG['bwd_warps'] or warps, LISTED_BLOCK_C


def _row_copies(programs: int) -> int:
    """Copies of dk / dv in the backward: ``CONFIG['bwd_row_copies']`` (default 1), at most ``programs`` (per head,
    the most copies that programs can spread over)."""
    return max(1, min(CONFIG['bwd_row_copies'] or 1, programs))


def _fp32_products(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the score kernels multiply q and k as fp32 (``F32``): fp32 or mixed inputs, and everything under Triton's
    CPU interpreter (whose half / bf16 ``tl.dot`` is wrong)."""
    return q.dtype == torch.float32 or k.dtype != q.dtype or interpreting()


def _dot_f32() -> str:
    """``tl.dot``'s input precision for fp32 similarity features (``CONFIG['fp32_dot']``, default ``FP32_DOT``)."""
    return CONFIG['fp32_dot'] or FP32_DOT


def _dense_dot(q: torch.Tensor, k: torch.Tensor) -> str:
    """How the dense candidate-list backward (CONFIG bwd_listed) multiplies its fp32 operands: as the score kernels
    do for fp32 features (``_dot_f32``), one TF32 pass for half / bf16 ones (10 mantissa bits, more than their
    gradients keep)."""
    return _dot_f32() if _fp32_products(q, k) else 'tf32'


def _int32_ids(ids: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Token ids (a candidate list, query ids) as the kernels read them, int32, contiguous and on ``device`` (a CPU
    list given with CUDA features would hand the kernel a host pointer); without: a one-element placeholder that the
    kernels never read."""
    if ids is None:
        return torch.empty(1, device=device, dtype=torch.int32)
    return ids.to(device=device, dtype=torch.int32).contiguous()


def kept_neighbors(num_neighbors: int, num_tokens: int, candidates: Optional[torch.Tensor]) -> int:
    """K after clamping: to the token count, or with a candidate list to its length (as the PyTorch path does)."""
    return kept(num_neighbors, num_tokens if candidates is None else candidates.shape[0])


def _attention_forward(qs: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                       num_neighbors: int, candidates: Optional[torch.Tensor] = None, q_scale: float = 1.0,
                       noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward launches: ``timm_convnn::convnn_attention``, and the eager path (``_EagerAttention``)."""
    B, H, N, DQ = qs.shape
    M, DV = ks.shape[2], v.shape[3]
    K = kept_neighbors(num_neighbors, M, candidates)
    q, k, vv = _in_place(qs), _in_place(ks), _in_place(v)
    w = _slot_major(weight, H, DV, K)
    # written token-major, (B, N, H, DV), and returned as its (B, H, N, DV) view: timm's head merge
    # (transpose(1, 2).reshape(B, N, C)) is then a view, not a copy
    out = _in_place(torch.empty(B, N, H, DV, device=v.device, dtype=v.dtype).transpose(1, 2))
    idx = torch.empty(B, H, N, K, device=v.device, dtype=torch.int32)
    p = torch.empty(B, H, N, K, device=v.device, dtype=torch.float32)
    cand = _int32_ids(candidates, v.device)
    num_keys = cand.numel() if candidates is not None else M
    stream = _streams(M, num_keys if candidates is not None else None)
    block_n = STREAM_BLOCK_N if stream else _pow2(num_keys + 1 if candidates is not None else M)
    fp32 = _fp32_products(q, k)
    block_m, per_tile, most, scr_s, scr_i = _top_k_launch(stream, fp32, K, DQ, candidates is not None, M, B, H, N,
                                                          (p, idx))
    nz = noise.contiguous() if noise is not None else p  # (unread without DROPOUT)
    with _on_device(v):
        for nb, (qb, kb, vb, ob, ib, pb, nzb) in (
                _batch_slices(B, q, k, vv, out, idx, p, nz, most=most) if H * N > 0 else ()):
            _convnn_fwd_kernel[(_cdiv(N, block_m), H, nb)](
                qb, kb, vb, w, ob, ib, pb, cand, scr_s, scr_i, nzb, N, M, num_keys, H, q_scale, *_strides(q),
                *_strides(k), *_strides(vv), *_strides(out), DQ=DQ, DV=DV, NUM_K=K, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_DQ=_pow2(DQ), BLOCK_DV=_pow2(DV), BLOCK_K=_pow2(K, 2), F32=fp32, DOT_F32=_dot_f32(),
                STREAM=stream, CANDIDATES=candidates is not None,
                TOPK=CONFIG['fwd_select'] == 'topk' and not stream and candidates is None,
                PAIRS=CONFIG['fwd_select'] == 'pairs' and not stream,
                PACKED=_use_packed_keys(fp32) and not stream, PER_TILE=per_tile, CAP=_stream_cap(K),
                DROPOUT=noise is not None,
                num_warps=_fwd_warps(stream, fp32, candidates is not None, per_tile > 0), **COMPILE_OPTIONS)
    return out, idx, p


@torch.library.custom_op('timm_convnn::convnn_attention', mutates_args=())
def _convnn_attention(qs: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                      num_neighbors: int, candidates: Optional[torch.Tensor] = None, q_scale: float = 1.0,
                      noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_forward(qs, ks, v, weight, num_neighbors, candidates, q_scale, noise)


@_convnn_attention.register_fake
def _convnn_attention_fake(qs, ks, v, weight, num_neighbors, candidates=None, q_scale=1.0, noise=None):
    B, H, N, _ = qs.shape
    K = kept_neighbors(num_neighbors, ks.shape[2], candidates)
    return (_in_place(v.new_empty(B, N, H, v.shape[3]).transpose(1, 2)), v.new_empty(B, H, N, K, dtype=torch.int32),
            v.new_empty(B, H, N, K, dtype=torch.float32))


def _attention_backward(
        grad_out: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
        idx: torch.Tensor, p: torch.Tensor, candidates: Optional[torch.Tensor] = None, q_scale: float = 1.0,
        noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward launches: ``timm_convnn::convnn_attention_backward``, and the eager path's backward."""
    B, H, N, DQ = qs.shape
    M, DV = ks.shape[2], v.shape[3]
    K = idx.shape[-1]
    q, k, vv, go = _in_place(qs), _in_place(ks), _in_place(v), _in_place(grad_out)
    w = _slot_major(weight, H, DV, K)
    dq = torch.empty(B, H, N, DQ, device=v.device, dtype=qs.dtype)  # stored once per element, in q's dtype
    # ``candidates``: the forward's list; CONFIG['bwd_listed'] = 'dense' sums dk / dv per listed token first
    dense = candidates is not None and CONFIG['bwd_listed'] == 'dense'
    cand = inv = _int32_ids(candidates if dense else None, v.device)
    if dense:
        inv = torch.full((M,), -1, device=v.device, dtype=torch.int32)  # token id -> list position
        inv[cand.long()] = torch.arange(cand.numel(), device=v.device, dtype=torch.int32)
    block_m, warps, block_c = _bwd_launch(qs.dtype, M, K, DQ, DV, dense)
    programs = B * _cdiv(N, block_m)  # per head: the most copies that programs can spread over
    rc = _row_copies(programs)  # copies of dk / dv, summed after the kernel
    dk = torch.zeros(B, rc, H, M, DQ, device=v.device, dtype=torch.float32)  # atomics: fp32
    dv = torch.zeros(B, rc, H, M, DV, device=v.device, dtype=torch.float32)
    copies = max(1, min(CONFIG['bwd_dw_copies'] or DW_COPIES, programs))
    dw = torch.zeros(copies, H, K, DV, device=v.device, dtype=torch.float32)
    idx, p = idx.contiguous(), p.contiguous()
    nz = noise.contiguous() if noise is not None else p  # (unread without DROPOUT)
    with _on_device(v):
        for nb, (gb, qb, kb, vb, ib, pb, dqb, dkb, dvb, nzb) in (
                _batch_slices(B, go, q, k, vv, idx, p, dq, dk, dv, nz) if H * N > 0 else ()):
            _convnn_bwd_kernel[(_cdiv(N, block_m), H, nb)](
                gb, qb, kb, vb, w, ib, pb, dqb, dkb, dvb, dw, cand, inv, nzb, N, M,
                cand.numel(), H, copies, rc, q_scale,
                *_strides(go), *_strides(q), *_strides(k), *_strides(vv), DQ=DQ, DV=DV, NUM_K=K, BLOCK_M=block_m,
                BLOCK_DQ=_pow2(DQ), BLOCK_DV=_pow2(DV), BLOCK_K=_pow2(K, 2), DENSE=dense, BLOCK_C=block_c,
                DENSE_DOT=_dense_dot(qs, ks) if dense else 'ieee', DROPOUT=noise is not None, num_warps=warps,
                **COMPILE_OPTIONS)
    full_dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    full_dw.view(H, DV, -1)[:, :, :K] = dw.sum(0).transpose(1, 2)
    dk, dv = (t.squeeze(1) if rc == 1 else t.sum(1) for t in (dk, dv))
    return dq, dk.to(ks.dtype), dv.to(v.dtype), full_dw.to(weight.dtype)


@torch.library.custom_op('timm_convnn::convnn_attention_backward', mutates_args=())
def _convnn_attention_backward(
        grad_out: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
        idx: torch.Tensor, p: torch.Tensor, candidates: Optional[torch.Tensor] = None, q_scale: float = 1.0,
        noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward(grad_out, qs, ks, v, weight, idx, p, candidates, q_scale, noise)


@_convnn_attention_backward.register_fake
def _convnn_attention_backward_fake(grad_out, qs, ks, v, weight, idx, p, candidates=None, q_scale=1.0,
                                    noise=None):
    # contiguous, like the real gradients (empty_like would copy the strides of permuted inputs)
    return qs.new_empty(qs.shape), ks.new_empty(ks.shape), v.new_empty(v.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    qs, ks, v, weight = inputs[:4]
    _, idx, p = output
    candidates = inputs[5] if len(inputs) > 5 else None
    ctx.q_scale = inputs[6] if len(inputs) > 6 else 1.0
    noise = inputs[7] if len(inputs) > 7 else None
    ctx.save_for_backward(qs, ks, v, weight, idx, p, candidates, noise)
    ctx.mark_non_differentiable(idx, p)


def _backward(ctx, grad_out, grad_idx, grad_p):
    qs, ks, v, weight, idx, p, candidates, noise = ctx.saved_tensors
    dq, dk, dv, dw = _convnn_attention_backward(grad_out, qs, ks, v, weight, idx, p, candidates, ctx.q_scale, noise)
    return dq, dk, dv, dw, None, None, None, None


_convnn_attention.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The fused op for eager calls (``_eager``): the same launches, saved tensors and gradients as the custom op,
    without torch.library's dispatch (with it, a call's host time is 1.2-1.3x, forward or forward + backward, on a
    2-core CPU with the kernels stubbed out: ``benchmarks/host_overhead.py``)."""

    @staticmethod
    def forward(ctx, qs, ks, v, weight, num_neighbors, candidates, q_scale, noise):
        # (a context argument, not a separate setup_context: autograd binds the arguments of that form to the
        # forward's signature through inspect at every call, about 60 us)
        output = _attention_forward(qs, ks, v, weight, num_neighbors, candidates, q_scale, noise)
        _setup_context(ctx, (qs, ks, v, weight, num_neighbors, candidates, q_scale, noise), output)
        return output

    compute = staticmethod(_attention_forward)
    save = staticmethod(_setup_context)

    @staticmethod
    def gradient_inputs(ctx, grad_out, grad_idx, grad_p):
        qs, ks, v, weight, idx, p, candidates, noise = ctx.saved_tensors
        return grad_out, qs, ks, v, weight, idx, p, candidates, ctx.q_scale, noise

    @staticmethod
    def gradients(grad_out, qs, ks, v, weight, idx, p, candidates, q_scale, noise):
        return _attention_backward(grad_out, qs, ks, v, weight, idx, p, candidates, q_scale, noise) + (None,) * 4

    @staticmethod
    @first_derivative_only('the fused attention kernels')
    def backward(ctx, grad_out, grad_idx, grad_p):
        return _EagerAttention.gradients(*_EagerAttention.gradient_inputs(ctx, grad_out, grad_idx, grad_p))


# under torch.func transforms (the custom op's autograd registration does not serve them): q, k, v, the dropout
# noise and the outputs are (B, H, ...), the weights (H * Dv, 1, K); a vmapped dimension folds into the batch, or into
# the heads where the weights are vmapped and in the backward (dw is per entry), within the grid's and the int32
# offsets' limits
_TransformableAttention = transformable(
    _EagerAttention, 'the fused attention kernels',
    fold_batch(0, 1, 2, 7, weights=(3,), most_groups=_GRID_Y, most_entry_elements=_INT32_MAX),
    fold_batch(0, 1, 2, 3, 5, 6, 9, weights=(4,), weight_outputs=(3,), most_groups=_GRID_Y,
               most_entry_elements=_INT32_MAX))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a fused op call may skip the ``torch.library`` dispatcher: plain tensors, run eagerly. Under
    ``torch.compile`` / ``torch.export``, ``torch.jit.trace`` and Python dispatch modes (profilers, FLOP counters,
    FakeTensorMode), and for tensor subclasses, the registered custom ops run, so that graphs record them and modes
    see them; under ``torch.func`` transforms, the custom ops' vmap rules (selection) or the transformable Function
    (``_TransformableAttention``: the custom op's autograd registration does not serve them)."""
    if capturing() or transforms_active() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def fused_attention(qs: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                    num_neighbors: int, candidates: Optional[torch.Tensor] = None, q_scale: float = 1.0,
                    noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ConvNN attention: (B, H, N, Dq) similarity features, (B, H, M, Dq), values (B, H, M, Dv), depthwise weights
    (H * Dv, 1, K) -> (output (B, H, N, Dv), indices (B, H, N, K) int32, softmax weights fp32). ``candidates``: token
    ids (r,) shared by all queries, distinct as for ``fused_select`` (each query is a candidate of itself too, as in
    the PyTorch path); None: all tokens. ``q_scale``: the query features are ``qs * q_scale`` (rounded to qs's dtype,
    as PyTorch multiplies), the dot similarity's d ** -0.5 applied inside the kernels rather than to a copy of q (one
    elementwise pass fewer each way, and no scaled copy kept for the backward); the gradient is with respect to
    ``qs``. ``noise``: attention dropout, (B, H, N, K) fp32 multipliers of the softmax weights in the aggregation
    (what ``nn.Dropout`` multiplies by: 0 or 1 / (1 - p); K as ``kept_neighbors`` gives it); the returned weights are
    the softmax's; ``noise`` gets no gradient."""
    if noise is not None:
        expected = (qs.shape[0], qs.shape[1], qs.shape[2], kept_neighbors(num_neighbors, ks.shape[2], candidates))
        if tuple(noise.shape) != expected or noise.dtype != torch.float32 or noise.device != qs.device:
            raise ValueError(f'fused_attention takes the dropout noise as {expected} fp32 on {qs.device}; got '
                             f'{tuple(noise.shape)} {noise.dtype} on {noise.device}')
    reason = triton_unavailable_reason(qs.device)
    if reason is not None:
        raise RuntimeError(reason)
    if _eager(qs, ks, v, weight, candidates, noise):
        return _EagerAttention.apply(qs, ks, v, weight, num_neighbors, candidates, q_scale, noise)
    if transforms_active() and not capturing():
        return _TransformableAttention.apply(qs, ks, v, weight, num_neighbors, candidates, q_scale, noise)
    return _convnn_attention(qs, ks, v, weight, num_neighbors, candidates, q_scale, noise)


def _select(qs: torch.Tensor, ks: torch.Tensor, num_neighbors: int, candidates: Optional[torch.Tensor] = None,
            query_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The selection launch: ``timm_convnn::convnn_select``, and eager calls of ``fused_select``."""
    B, G, N, DQ = qs.shape
    M = ks.shape[2]
    K = kept_neighbors(num_neighbors, M, candidates)
    q, k = _in_place(qs), _in_place(ks)
    idx = torch.empty(B, G, N, K, device=q.device, dtype=torch.int32)
    scores = torch.empty(B, G, N, K, device=q.device, dtype=torch.float32)
    listed = candidates is not None  # with query_index (select_unsupported)
    cand, qidx = _int32_ids(candidates, q.device), _int32_ids(query_index if listed else None, q.device)
    fp32 = _fp32_products(q, k)
    block_m, per_tile, most, scr_s, scr_i = _top_k_launch(True, fp32, K, DQ, listed, M, B, G, N, (scores, idx))
    with _on_device(q):
        for nb, (qb, kb, ib, sb) in _batch_slices(B, q, k, idx, scores, most=most) if G * N * K > 0 else ():
            _convnn_select_kernel[(_cdiv(N, block_m), G, nb)](
                qb, kb, ib, sb, cand, qidx, scr_s, scr_i, N, M, cand.numel() if listed else M, G,
                *_strides(q), *_strides(k), DQ=DQ, NUM_K=K, BLOCK_M=block_m, BLOCK_N=STREAM_BLOCK_N,
                BLOCK_DQ=_pow2(DQ), BLOCK_K=_pow2(K, 2), F32=fp32, DOT_F32=_dot_f32(), CANDIDATES=listed,
                PER_TILE=per_tile, CAP=_stream_cap(K),
                num_warps=_fwd_warps(True, fp32, listed, per_tile > 0), **COMPILE_OPTIONS)
    return idx, scores


@torch.library.custom_op('timm_convnn::convnn_select', mutates_args=())
def _convnn_select(qs: torch.Tensor, ks: torch.Tensor, num_neighbors: int, candidates: Optional[torch.Tensor] = None,
                   query_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return _select(qs, ks, num_neighbors, candidates, query_index)


@_convnn_select.register_fake
def _convnn_select_fake(qs, ks, num_neighbors, candidates=None, query_index=None):
    B, G, N, _ = qs.shape
    K = kept_neighbors(num_neighbors, ks.shape[2], candidates)
    return qs.new_empty(B, G, N, K, dtype=torch.int32), qs.new_empty(B, G, N, K, dtype=torch.float32)


# vmap: the features share the batch dimension, into which a vmapped dimension folds (mapped token ids: a loop)
_convnn_select.register_vmap(functools.partial(fold_batch(0, 1), _convnn_select))

_SELECT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def select_unsupported(qs: torch.Tensor, ks: torch.Tensor, num_neighbors: int,
                       candidates: Optional[torch.Tensor] = None,
                       query_index: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``fused_select`` cannot take these features, or None when it can: (B, G, N, D) and (B, G, M, D) fp32 /
    half / bf16 features (the kernel computes in fp32: fp64 selects in PyTorch, in fp64) of at most
    ``MAX_SELECT_DIM`` channels, 1 to ``MAX_TOKENS`` tokens, K (clamped to the candidate count) at most
    ``MAX_NEIGHBORS``; a candidate list comes as (r,) token ids with the (N,) token id of every query. The dispatch
    (``functional.select_scored_neighbors``) and ``fused_select``'s errors both read this."""
    if qs.dim() != 4 or ks.dim() != 4 or qs.shape[-1] != ks.shape[-1] or qs.shape[:2] != ks.shape[:2]:
        return (f'fused_select expects (B, G, N, D) and (B, G, M, D) features; got {tuple(qs.shape)} and '
                f'{tuple(ks.shape)}')
    if qs.dtype not in _SELECT_DTYPES or ks.dtype not in _SELECT_DTYPES:
        return f'fused_select takes fp32 / half / bf16 features (it computes in fp32); got {qs.dtype} and {ks.dtype}'
    tokens = ks.shape[2]
    if tokens > MAX_TOKENS:
        return f'fused_select takes at most {MAX_TOKENS} tokens; got {tokens}'
    if candidates is not None:
        if query_index is None or candidates.dim() != 1 or tuple(query_index.shape) != (qs.shape[2],):
            return (f'fused_select takes a candidate list as (r,) token ids with the (N,) = ({qs.shape[2]},) token ids '
                    f'of the queries; got candidates {tuple(candidates.shape)} and query_index '
                    f'{None if query_index is None else tuple(query_index.shape)}')
        if candidates.dtype not in (torch.int32, torch.int64) or query_index.dtype not in (torch.int32, torch.int64):
            return f'fused_select takes integer token ids; got {candidates.dtype} and {query_index.dtype}'
        if candidates.device != qs.device or query_index.device != qs.device:
            return (f'fused_select takes token ids on the features\' device ({qs.device}); got {candidates.device} and '
                    f'{query_index.device}')
    count = tokens if candidates is None else candidates.shape[0]
    kept = slots(num_neighbors, count)  # (the dispatch asserts nothing)
    if qs.shape[-1] > MAX_SELECT_DIM or not 1 <= kept <= MAX_NEIGHBORS:
        what = 'token' if candidates is None else 'candidate'
        return (f'fused_select takes at most {MAX_SELECT_DIM} channels and 1 <= K <= {MAX_NEIGHBORS} (K is clamped '
                f'to the {what} count); got {qs.shape[-1]} channels, K {num_neighbors}, {count} {what}s')
    return None


def fused_select(qs: torch.Tensor, ks: torch.Tensor, num_neighbors: int, candidates: Optional[torch.Tensor] = None,
                 query_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-K selection in one fused kernel: (B, G, N, D) query and (B, G, M, D) token similarity features -> the
    token ids (int64) and fp32 scores <qs_i, ks_j> of every query's K = min(num_neighbors, M) best tokens, best first
    (ties: the smallest id). With ``candidates`` ((r,) token ids shared by all queries) and ``query_index`` (the
    (N,) token id of each query) only those tokens and the query's own are candidates, K = min(num_neighbors, r),
    as in the PyTorch path (exact ties at the K-th place may keep another of the tied tokens). What
    ``functional.select_scored_neighbors`` returns, without the (N, M) score matrix or ``torch.topk``; no autograd
    graph (selection needs none). Inputs: ``select_unsupported``; token ids must lie in 0 .. M - 1 and the
    candidate ids be distinct (not checked: that would synchronise with the GPU; a repeated id can leave a slot
    empty, -inf score, where the PyTorch path keeps both copies)."""
    bad = select_unsupported(qs, ks, num_neighbors, candidates, query_index)
    if bad is not None:
        raise ValueError(bad)
    reason = triton_unavailable_reason(qs.device)
    if reason is not None:
        raise RuntimeError(reason)
    with torch.no_grad():
        select = _select if _eager(qs, ks, candidates, query_index) else _convnn_select
        idx, scores = select(qs.detach(), ks.detach(), num_neighbors, candidates, query_index)
    return idx.long(), scores
