""" ConvNN operator, functional form (the one implementation every ConvNN module uses).

Convolutional Nearest Neighbors (Kang & Farias, arXiv 2511.14137). For each query token i:

1. candidates C_i: all tokens, or a candidate list shared by the batch (random subset / spatial grid, prefix tokens
   included) plus the query token itself;
2. similarity s(i, j) from "similarity features" (see `similarity_features`): every metric is written as a plain
   dot product of transformed features, so one matmul kernel serves cosine, scaled dot and (negative squared)
   euclidean distance;
3. top-K selection, computed in fp32 under `no_grad`, in query chunks (never more than a bounded slice of the
   score matrix exists, and none of it is kept for backward);
4. the K selected scores are recomputed *with* grad from the selected pairs only (`gather_dot`), so q/k get their
   gradient through the weights rho without an n x n gradient;
5. aggregation y_i = sum_k W_k (rho_ik v_{I_ik}) (`neighbor_aggregate`), the paper's Conv1d(kernel K, stride K) over
   the neighbour sequence, computed in cache-sized query blocks (depthwise) or slot chunks (standard) without
   materialising the (B, C, n, K) neighbour tensor; backward re-gathers instead of storing.

Tensor layout throughout is timm's attention layout: (B, G, N, C) with G groups (attention heads; 1 for 2D maps).

All functions here are TorchScript compatible (timm scripts every model in its tests); the custom autograd
Functions are only used outside scripting, with an equivalent plain-autograd fallback inside it.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import triton_attention
from .func_support import first_derivative_only, fold_batch, transformable, transforms_active
from .symbolic import capturing, size_free, slots, sym_max, sym_min, sym_round

__all__ = [
    'similarity_features', 'select_neighbors', 'select_scored_neighbors', 'softmax_weights', 'gather_dot',
    'neighbor_aggregate', 'hashed_permutation', 'random_candidates', 'grid_shape', 'grid_candidates', 'coordinate_grid',
]


def dot_scale(dim: int) -> float:
    """The ``dot`` similarity's scale of q: d ** -0.5 (d: the feature channels), as timm's ``Attention`` scales q."""
    return dim ** -0.5


def similarity_features(
        q: torch.Tensor,
        k: torch.Tensor,
        similarity: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Transform (q, k) so that the similarity is the plain dot product <q', k'>.

    * ``dot``: <q, k> / sqrt(d)
    * ``cosine``: <q / |q|, k / |k|>
    * ``euclidean``: -|q - k|^2 = <[2q, -|q|^2, -1], [k, 1, |k|^2]>

    ``cosine`` and ``euclidean`` features come out in at least fp32 whatever the inputs' dtype: unit vectors and
    squared norms rounded to bf16 / fp16 would decide the ranks (-|k|^2 + 2 <q, k> cancels most of its digits, and a
    bf16 model's coordinate ConvNN then stopped being its convolution). ``dot`` keeps the inputs' dtype: its scores
    are those of the rounded q, k themselves, as in attention.

    Args:
        q: (..., N, d) query features.
        k: (..., M, d) candidate features.
        similarity: one of ``dot``, ``cosine``, ``euclidean``.
    """
    if similarity == 'dot':
        return q * dot_scale(q.shape[-1]), k
    if similarity in ('cosine', 'euclidean'):
        q, k = _at_least_fp32(q), _at_least_fp32(k)
    if similarity == 'cosine':
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if similarity == 'euclidean':
        q2 = (q * q).sum(-1, keepdim=True)
        k2 = (k * k).sum(-1, keepdim=True)
        qs = torch.cat([2. * q, -q2, -torch.ones_like(q2)], dim=-1)
        ks = torch.cat([k, torch.ones_like(k2), k2], dim=-1)
        return qs, ks
    raise ValueError('similarity must be one of dot, cosine, euclidean; got ' + str(similarity))


def _check_int(name: str, value, minimum: Optional[int]) -> None:
    """``value`` is an int (not a bool) of at least ``minimum`` (None: any int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        bound = '' if minimum is None else f' >= {minimum}'
        raise TypeError(f'{name} must be an int{bound}; got {type(value).__name__} {value!r}')
    if minimum is not None and value < minimum:
        raise ValueError(f'{name} must be >= {minimum}; got {value}')


@torch.jit.unused
def _check_ids(fn: str, table: str, num_tokens: int, distinct: Tuple[str, ...] = (),
               **ids: Optional[torch.Tensor]) -> None:
    """The tensors in ``ids`` (None: absent) are integer token ids into the ``num_tokens`` tokens of ``table``, those
    named in ``distinct`` without a repeated id. Their values are read in one transfer (a host synchronisation on
    CUDA), except where they cannot be: under torch.func transforms, on the meta device. (The callers skip the checks
    while a graph is captured.)"""
    given = {what: t for what, t in ids.items() if t is not None}
    for what, t in given.items():
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f'{fn}: {what} must be integer token ids; got {t.dtype}')
    given = {what: t for what, t in given.items() if t.numel() > 0 and not t.is_meta}
    if not given or transforms_active():
        return
    device = next(iter(given.values())).device
    stats = []  # per tensor: min, max, then for a distinct one the count of repeats and the smallest repeated id
    for what, t in given.items():
        stats.append(torch.stack(t.aminmax()).long().to(device))
        if what in distinct:
            flat = t.flatten().sort().values.long()
            repeat = flat[1:] == flat[:-1]
            stats.append(torch.stack([repeat.sum(), torch.where(repeat, flat[1:], flat[-1]).min()]).to(device))
    values = torch.cat(stats).tolist()
    for what in given:
        lo, hi = values.pop(0), values.pop(0)
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f'{fn}: {what} must lie in [0, {num_tokens - 1}] (the {num_tokens} tokens of {table}); '
                             f'got ids from {lo} to {hi}')
        if what in distinct:
            repeats, first = values.pop(0), values.pop(0)
            if repeats:
                raise ValueError(f'{fn}: {what} must list each token once; got {repeats} repeated ids (e.g. {first})')


@torch.jit.unused
def _check_pairs(fn: str, idx: torch.Tensor, table: torch.Tensor, table_name: str,
                 queries: Optional[torch.Tensor] = None, rho: Optional[torch.Tensor] = None) -> None:
    """idx (B, G, N, K) token ids into ``table`` (B, G, M, C), for ``queries`` (B, G, N, D) and weights ``rho``
    shaped like idx where given. (Like every check here, not while a graph is captured: the callers return first, as
    the sizes are symbolic then and the capture checks them.)"""
    shapes = [f'idx {tuple(idx.shape)}', f'{table_name} {tuple(table.shape)}']
    shapes += [f'q {tuple(queries.shape)}'] if queries is not None else []
    shapes += [f'rho {tuple(rho.shape)}'] if rho is not None else []
    if (idx.dim() != 4 or table.dim() != 4 or table.shape[:2] != idx.shape[:2]
            or (queries is not None and (queries.dim() != 4 or queries.shape[:3] != idx.shape[:3]))
            or (rho is not None and rho.shape != idx.shape)):
        raise ValueError(f'{fn} takes idx (B, G, N, K) with {table_name} (B, G, M, C)'
                         + (', q (B, G, N, D)' if queries is not None else '')
                         + (', rho shaped like idx' if rho is not None else '') + f'; got {", ".join(shapes)}')
    _check_ids(fn, table_name, table.shape[2], idx=idx)


@torch.jit.unused
def _check_gather_dot(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, scores: Optional[torch.Tensor]) -> None:
    """``gather_dot``'s arguments."""
    if capturing():
        return
    _check_pairs('gather_dot', idx, k, 'k', queries=q)
    if q.shape[-1] != k.shape[-1] or (scores is not None and scores.shape != idx.shape):
        raise ValueError(f'gather_dot takes q (B, G, N, D), k (B, G, M, D) and scores shaped like idx; got q '
                         f'{tuple(q.shape)}, k {tuple(k.shape)}, idx {tuple(idx.shape)}'
                         + (f', scores {tuple(scores.shape)}' if scores is not None else ''))


@torch.jit.unused
def _check_aggregation(v: torch.Tensor, idx: torch.Tensor, rho: Optional[torch.Tensor], weight: torch.Tensor,
                       depthwise: bool) -> None:
    """``neighbor_aggregate``'s arguments."""
    if capturing():
        return
    _check_pairs('neighbor_aggregate', idx, v, 'v', rho=rho)
    G, C, K = v.shape[1], v.shape[3], idx.shape[3]
    want = (G, C, K) if depthwise else (G, weight.shape[1] if weight.dim() == 4 else -1, C, K)
    if tuple(weight.shape) != want:
        layout = 'depthwise (G, C, K)' if depthwise else 'standard (G, Cout, C, K)'
        raise ValueError(f'neighbor_aggregate takes {layout} weights for v {tuple(v.shape)} and idx '
                         f'{tuple(idx.shape)}; got {tuple(weight.shape)}')


@torch.jit.unused
def _check_selection(qs: torch.Tensor, ks: torch.Tensor, num_neighbors: int, candidates: Optional[torch.Tensor],
                     query_index: Optional[torch.Tensor]) -> None:
    """``select_scored_neighbors``'s arguments (see ``select_neighbors``)."""
    _check_int('num_neighbors (K)', num_neighbors, 1)
    if capturing():
        return
    if qs.dim() != 4 or ks.dim() != 4 or qs.shape[:2] != ks.shape[:2] or qs.shape[3] != ks.shape[3]:
        raise ValueError(f'select_neighbors takes qs (B, G, N, D) and ks (B, G, M, D); got {tuple(qs.shape)} and '
                         f'{tuple(ks.shape)}')
    for what, ids, length in (('candidates', candidates, None), ('query_index', query_index, qs.shape[2])):
        if ids is not None and (ids.dim() != 1 or (length is not None and ids.shape[0] != length)):
            want = f'({length},), one per query' if length is not None else '(r,)'
            raise ValueError(f'select_neighbors: {what} must be {want}; got {tuple(ids.shape)}')
    _check_ids('select_neighbors', 'ks', ks.shape[2], distinct=('candidates',), candidates=candidates,
               query_index=query_index)


def select_neighbors(
        qs: torch.Tensor,
        ks: torch.Tensor,
        num_neighbors: int,
        candidates: Optional[torch.Tensor] = None,
        query_index: Optional[torch.Tensor] = None,
        budget_bytes: int = 8 * 1024 * 1024,
) -> torch.Tensor:
    """Indices of the top-K candidates of every query (no autograd graph; scores in fp32).

    Args:
        qs: (B, G, N, D) query similarity features.
        ks: (B, G, M, D) token similarity features (M tokens; candidates index into them).
        num_neighbors: K. Clamped to the number of candidates (all: M; listed: len(candidates)).
        candidates: optional (r,) int64 token ids shared by all queries, each listed once (a repeated id raises
            ValueError: the PyTorch path would fill two slots with it, the fused CUDA kernel one). None means all M
            tokens.
        query_index: (N,) int64 token id of each query, required with ``candidates``: the query token itself is
            always a candidate (added when it is not in the list, never counted twice).
        budget_bytes: the largest fp32 score slice computed at once (queries are processed in chunks). 8 MiB
            slices stay in the CPU cache between the matmul and topk: measured 1.5x faster selection at n = 4097
            than 64 MiB slices, and the same at n = 197.

    Returns:
        (B, G, N, K_eff) int64 token ids, best first.

    Raises ValueError / TypeError for K < 1, features whose shapes do not pair up, candidate or query ids outside
    the M tokens and repeated candidates (the ids' values are read: on CUDA one host synchronisation; the layers call
    the unchecked selection).
    """
    return select_scored_neighbors(qs, ks, num_neighbors, candidates, query_index, budget_bytes)[0]


def select_scored_neighbors(
        qs: torch.Tensor,
        ks: torch.Tensor,
        num_neighbors: int,
        candidates: Optional[torch.Tensor] = None,
        query_index: Optional[torch.Tensor] = None,
        budget_bytes: int = 8 * 1024 * 1024,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``select_neighbors`` that also returns the selected scores <qs_i, ks_j> (fp32, no grad), (B, G, N, K_eff)
    each; ``gather_dot(..., scores=...)`` turns them into differentiable scores without recomputing them.

    On CUDA the selection runs one fused Triton kernel (``triton_attention.fused_select``: no score matrix, no
    ``torch.topk``; ties to the smallest token id) where the backend allows it (``timm_convnn.layers.backend``).
    Checks its arguments as ``select_neighbors`` does."""
    if not torch.jit.is_scripting():
        _check_selection(qs, ks, num_neighbors, candidates, query_index)
    return _select_scored(qs, ks, num_neighbors, candidates, query_index, budget_bytes)


def _select_scored(
        qs: torch.Tensor,
        ks: torch.Tensor,
        num_neighbors: int,
        candidates: Optional[torch.Tensor] = None,
        query_index: Optional[torch.Tensor] = None,
        budget_bytes: int = 8 * 1024 * 1024,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``select_scored_neighbors`` without the argument checks: the layers' selection, whose arguments they make."""
    if candidates is not None and query_index is None:
        raise ValueError('select_neighbors: query_index is required with a candidate list')
    if not torch.jit.is_scripting():
        if _fused_selection(qs, ks, num_neighbors, candidates, query_index):
            return triton_attention.fused_select(qs, ks, num_neighbors, candidates, query_index)
    with torch.no_grad():
        qf, kf = _at_least_fp32(qs), _at_least_fp32(ks)
        if candidates is None or query_index is None:  # (query_index is given with candidates: checked above)
            return _select_all(qf, kf, num_neighbors, budget_bytes)
        return _select_listed(qf, kf, num_neighbors, candidates, query_index, budget_bytes)


@torch.jit.unused
def _fused_selection(qs: torch.Tensor, ks: torch.Tensor, num_neighbors: int, candidates: Optional[torch.Tensor],
                     query_index: Optional[torch.Tensor]) -> bool:
    """Whether this selection runs the fused kernel (it takes these features, and the backend's say)."""
    bad = triton_attention.select_unsupported(qs, ks, num_neighbors, candidates, query_index)
    return triton_attention.use_fused(bad is None, qs.device)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # half / bfloat16 scores round cosine values to ~4e-3 steps and flip ranks: select in fp32 (fp64 stays fp64)
    return x if x.dtype == torch.float64 else x.float()


def softmax_weights(scores: torch.Tensor) -> torch.Tensor:
    """rho = softmax over the K kept scores, computed in at least fp32."""
    return _at_least_fp32(scores).softmax(dim=-1)


def _has_autocast(x: torch.Tensor) -> bool:
    """Whether autocast exists for x's device type (not for meta tensors, for instance)."""
    return x.device.type in ('cpu', 'cuda', 'xpu', 'mps', 'hpu')


def _fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b at the inputs' precision (fp32 selection scores) even under autocast, which would otherwise round
    them to bf16 / fp16 (steps of ~4e-3 for cosine scores: ranks flip and near-ties become ties)."""
    if torch.jit.is_scripting() or not _has_autocast(a):
        return torch.matmul(a, b)  # (meta tensors: no autocast for that device type)
    with torch.autocast(a.device.type, enabled=False):
        return torch.matmul(a, b)


def _capturing() -> bool:
    """Whether a graph is being captured that will run at other batch sizes (``symbolic.capturing``). Loop counts and
    slice bounds must then not depend on the batch: a trace bakes them in (traced at batch 2, a ViT-Ti failed at batch
    32 and a ResNet-18 at every other batch) and torch.compile / torch.export specialise the graph to one batch size.
    So the chunks and blocks below are sized from the per-sample shape while capturing, and their memory budgets hold
    per sample rather than per call."""
    return capturing()


def _ranges(total: int, step: int) -> List[Tuple[int, int]]:
    """[start, end) pieces of ``range(total)`` of ``step`` items (the last one shorter); one piece for a size-free
    ``total`` (see ``symbolic``), and one empty piece for none (an empty result keeps its shape)."""
    if size_free(total) or total == 0:
        return [(0, total)]
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def _score_budget(budget_bytes: int, x: torch.Tensor) -> int:
    """The score-slice budget for ``x``'s device: on CUDA every slice costs several kernel launches, so slices are
    large (256 MiB: one or two per ViT-B layer at batch 256); on CPU they stay cache-sized."""
    if x.is_cuda:
        return max(budget_bytes, 256 * 1024 * 1024)
    return budget_bytes


def _query_chunk(budget_bytes: int, q: torch.Tensor, query_bytes: int) -> int:
    """Queries per slice of a (B, G, N, *) query tensor ``q`` when each query costs ``query_bytes`` in each of the
    B * G (batch, group) slices: the slice fits ``_score_budget``, or while capturing a graph ``budget_bytes`` per
    sample (see ``_capturing``); all of them for a size-free token count (see ``symbolic``)."""
    if size_free(q.shape[2]):
        return q.shape[2]
    if _capturing():
        return max(1, budget_bytes // max(1, q.shape[1] * query_bytes))
    return max(1, _score_budget(budget_bytes, q) // max(1, q.shape[0] * q.shape[1] * query_bytes))


def _select_all(
        qf: torch.Tensor, kf: torch.Tensor, num_neighbors: int, budget_bytes: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    N, M = qf.shape[2], kf.shape[2]
    pad = size_free(M)
    k_eff = slots(num_neighbors, M)
    chunk = _query_chunk(budget_bytes, qf, M * 4)
    kt = kf.transpose(-1, -2)
    ids: List[torch.Tensor] = []
    vals: List[torch.Tensor] = []
    for start, end in _ranges(N, chunk):
        # (B, G, c, M) score slice, freed by topk before the next slice exists: one slice alive at a time
        scores = _fp32_matmul(qf[:, :, start:end], kt)
        top = (_empty_slots(scores, num_neighbors) if pad else scores).topk(k_eff, dim=-1)
        vals.append(top.values)
        ids.append(top.indices.clamp(max=M) if pad else top.indices)
    if len(ids) == 1:
        return ids[0], vals[0]
    return torch.cat(ids, dim=2), torch.cat(vals, dim=2)


def _empty_slots(scores: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """A graph exported for every image size (``symbolic``) has K neighbour slots at every size, where eager clamps K
    to the candidate count. The scores get K more columns of -inf, so that topk always finds K; a slot that lands on
    -inf (fewer than K candidates) is empty: its token id is M, a zero row appended to the values
    (``neighbor_aggregate``), and its softmax weight 0, so it adds nothing with either weighting and, in position
    order, sorts last. The result is eager's, and the graph needs no run-time assertion, which ONNX drops."""
    shape = list(scores.shape[:-1]) + [num_neighbors]
    return torch.cat([scores, torch.full(shape, float('-inf'), dtype=scores.dtype, device=scores.device)], dim=-1)


def _select_listed(
        qf: torch.Tensor,
        kf: torch.Tensor,
        num_neighbors: int,
        candidates: torch.Tensor,
        query_index: torch.Tensor,
        budget_bytes: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    B, G, N, M = qf.shape[0], qf.shape[1], qf.shape[2], kf.shape[2]
    r = candidates.shape[0]
    pad = size_free(M)
    k_eff = slots(num_neighbors, r)  # (with a size-free M, r = min(r, n) is size-free too, or r >= K)
    kc = kf.index_select(2, candidates)
    kt = kc.transpose(-1, -2)
    chunk = _query_chunk(budget_bytes, qf, (r + 1) * 4)
    out: List[torch.Tensor] = []
    vals: List[torch.Tensor] = []
    for start, end in _ranges(N, chunk):
        qi = query_index[start:end]
        qc = qf[:, :, start:end]
        scores = _fp32_matmul(qc, kt)  # (B, G, c, r)
        # the query token itself: its own score as an extra column; its duplicate (if listed) masked out
        self_score = (qc * kf.index_select(2, qi)).sum(-1, keepdim=True)
        dup = candidates.view(1, -1) == qi.view(-1, 1)  # (c, r)
        scores = torch.cat([scores.masked_fill(dup, float('-inf')), self_score], dim=-1)
        columns = [candidates.view(1, -1).expand(end - start, r), qi.view(-1, 1)]
        if pad:  # the masked duplicate and the padding are empty slots (see _empty_slots)
            scores = _empty_slots(scores, num_neighbors)
            columns = [columns[0].masked_fill(dup, M), columns[1], qi.new_full((end - start, num_neighbors), M)]
        ids = torch.cat(columns, dim=1)
        top = scores.topk(k_eff, dim=-1)
        width = ids.shape[1]
        out.append(torch.gather(ids.view(1, 1, end - start, width).expand(B, G, end - start, width), -1,
                                top.indices))
        vals.append(top.values)
    if len(out) == 1:
        return out[0], vals[0]
    return torch.cat(out, dim=2), torch.cat(vals, dim=2)


def _flat_rows(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, G, ...) token ids -> row ids into a (B * G * M, C) table, flattened."""
    B, G = idx.shape[0], idx.shape[1]
    shape = [B, G] + [1] * (idx.dim() - 2)
    base = torch.arange(B * G, device=idx.device, dtype=idx.dtype).view(shape) * num_tokens
    return (idx + base).reshape(-1)


def _gather_rows(table: torch.Tensor, idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """table (B*G*M, C), idx (B, G, ...) -> (B, G, ..., C)."""
    shape = list(idx.shape) + [table.shape[-1]]
    return table.index_select(0, _flat_rows(idx, num_tokens)).view(shape)


def _slot_chunk(idx: torch.Tensor, channels: int, budget_bytes: int) -> int:
    """How many of the K neighbour slots of ``idx`` (B, G, N, K) to gather at once: all of them when the (B * G * N,
    slots, channels) block fits the budget, down to one slot at a time; the working set never depends on K beyond
    the budget. While capturing a graph the budget holds per sample (see ``_capturing``)."""
    if size_free(idx.shape[2]):
        return 1
    rows = idx.shape[1] * idx.shape[2] * (1 if _capturing() else idx.shape[0])  # (B * G * N; per sample: G * N)
    return max(1, min(idx.shape[-1], budget_bytes // max(1, rows * channels * 4)))


# The slot-chunked kernels below keep at most ``budget_bytes`` (1 MiB) of gathered neighbour rows in flight.
# (A literal default, not a module constant: TorchScript cannot read module globals.)


def _gather_dot_eager(
        q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, budget_bytes: int = 1024 * 1024) -> torch.Tensor:
    B, G, M, D = k.shape
    K = idx.shape[-1]
    table = k.reshape(B * G * M, D)
    step = _slot_chunk(idx, D, budget_bytes)
    cols: List[torch.Tensor] = []
    for s in range(0, K, step):
        cols.append((q.unsqueeze(-2) * _gather_rows(table, idx[..., s:s + step], M)).sum(-1))
    if len(cols) == 0:  # K = 0: no tokens to select
        return q.new_zeros(idx.shape)
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=-1)


def _query_blocks(
        num_slices: int, num_queries: int, query_bytes: int, budget_bytes: int
) -> List[Tuple[int, int, int, int]]:
    """Blocks (s0, s1, n0, n1) of (slice, query) pairs covering a (num_slices, num_queries) grid, each needing at most
    about ``budget_bytes`` at ``query_bytes`` per query: runs of whole slices while a slice fits, else query ranges of
    one slice (at least 64 queries, so a block is never a handful of rows); blocks of a run are balanced in size."""
    slice_bytes = num_queries * query_bytes
    blocks: List[Tuple[int, int, int, int]] = []
    if num_slices == 0 or num_queries == 0:  # (an empty batch or map: nothing to gather)
        return blocks
    if slice_bytes <= budget_bytes:
        step = _balanced(num_slices, max(1, budget_bytes // max(1, slice_bytes)))
        for s in range(0, num_slices, step):
            blocks.append((s, min(num_slices, s + step), 0, num_queries))
        return blocks
    step = _balanced(num_queries, max(64, budget_bytes // max(1, query_bytes)))
    for s in range(num_slices):
        for n in range(0, num_queries, step):
            blocks.append((s, s + 1, n, min(num_queries, n + step)))
    return blocks


def _balanced(total: int, step: int) -> int:
    """The step that covers ``total`` in as many pieces as ``step`` does, in pieces of (nearly) equal size."""
    pieces = -(-total // step)
    return -(-total // pieces)


# The gather / scatter kernels (depthwise aggregation, sparse gather-dot backward) work on blocks of queries whose
# gathered neighbour rows ((queries, K, C)) stay in cache through the few passes over them. 2 MiB on CPU: at ViT-S
# size (b 8, 6 heads, n 197, K 16) ConvNN forward+backward went from 3.8x to 2.0-2.4x SDPA's time on the 2-core CPU
# (1 MiB 2.7x, 4 MiB 2.9x: smaller blocks pay per-op overhead, larger ones leave the cache) against one
# (B, G, N, C) block per neighbour slot. Other devices take blocks the size of the output (about K of them, the
# working set of the former per-slot loop), at least 64 MiB: every block costs kernel launches, and a small batch at
# large n would otherwise launch K blocks of a few MiB. A captured graph (torch.compile, export, trace) takes about K
# blocks too, split along the queries only (see ``_capturing``).
_BLOCK_BYTES = 2 * 1024 * 1024
_DEVICE_BLOCK_BYTES = 64 * 1024 * 1024


def _block_setup(table: torch.Tensor, idx: torch.Tensor, out_bytes: int):
    """(B*G*M, C) row table, (B*G, N, K) row ids into it and the query blocks for gathering ``table`` at ``idx``."""
    B, G, M, C = table.shape
    N, K = idx.shape[2], idx.shape[3]
    if _capturing():
        # the block loop unrolls into the graph, which serves every batch size: all slices at once, in ranges of
        # (at least 64) queries that gather about the output's size (the working set of a per-slot loop)
        step = _balanced(N, max(64, -(-N // K)))
        blocks = [(0, B * G, n, min(N, n + step)) for n in range(0, N, step)]
    elif table.device.type != 'cpu':
        blocks = _query_blocks(B * G, N, K * C * table.element_size(), max(_DEVICE_BLOCK_BYTES, out_bytes))
    else:
        blocks = _query_blocks(B * G, N, K * C * table.element_size(), _BLOCK_BYTES)
    return table.reshape(B * G * M, C), _flat_rows(idx, M).view(B * G, N, K), blocks


def _dense_backward_is_cheaper(num_tokens: int, num_slots: int) -> bool:
    """Gradient of K gathered dot products: a dense (queries x tokens) matmul costs ~4 M D multiply-adds per query
    at matmul speed, the blocked gather / scatter form ~3 K D element moves per query at cache speed. Measured on the
    2-core CPU (6 heads x 64): dense 11.8 ms vs 15.0 at n 197, K 16 (M = 12 K); 11.5 vs 9.5 at n 197, K 9 (M = 22 K);
    40 vs 14 at n 785, K 16: the dense form wins while M <= 16 K."""
    return num_tokens <= 16 * num_slots


def _needs_input_grad(ctx, *positions: int) -> Tuple[bool, ...]:
    """``ctx.needs_input_grad`` at ``positions``, except while torch.compile traces the backward: there torch 2.4 and
    2.5 report False for an input that is the output of another custom autograd Function in the same graph (the
    rho of the aggregation, from ``_GatherDot``), and the scores' gradient was silently dropped. Traced, every
    gradient is built and the graph drops the unused ones."""
    if torch.compiler.is_compiling():
        return (True,) * len(positions)
    return tuple(bool(ctx.needs_input_grad[i]) for i in positions)


class _GatherDot(torch.autograd.Function):
    """s[b, g, i, t] = <q[b, g, i], k[b, g, idx[b, g, i, t]]>, storing only q, k and idx for backward.

    ``scores`` (optional): the same values already computed by the selection (fp32); forward returns them instead
    of recomputing. Backward builds the gradient of the selected pairs only: densely as a (queries x tokens)
    matrix in bounded query chunks when that is cheaper (small token counts), else by gather / scatter.
    """

    @staticmethod
    def forward(ctx, q, k, idx, budget_bytes, scores):
        out = _GatherDot.compute(q, k, idx, budget_bytes, scores)
        _GatherDot.save(ctx, (q, k, idx, budget_bytes, scores), out)
        return out

    @staticmethod
    def compute(q, k, idx, budget_bytes, scores):
        if scores is not None:
            return scores.clone()
        with torch.no_grad():
            return _gather_dot_eager(q, k, idx, budget_bytes)

    @staticmethod
    def save(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])

    @staticmethod
    def gradient_inputs(ctx, grad):
        return (grad,) + tuple(ctx.saved_tensors) + _needs_input_grad(ctx, 0, 1)

    @staticmethod
    def gradients(grad, q, k, idx, need_q: bool, need_k: bool):
        if _dense_backward_is_cheaper(k.shape[2], idx.shape[-1]):
            dq, dk = _gather_dot_backward_dense(q, k, idx, grad, need_q, need_k)
        else:
            dq, dk = _gather_dot_backward_sparse(q, k, idx, grad, need_q, need_k)
        return dq, dk, None, None, None

    @staticmethod
    @first_derivative_only('the selected scores')  # (the gradients are built in place)
    def backward(ctx, grad):
        return _GatherDot.gradients(*_GatherDot.gradient_inputs(ctx, grad))


# for torch.func transforms; q, k, idx, the scores and the gradients share the batch dimension (0), into which a
# vmapped dimension folds
_GatherDotTransformable = transformable(_GatherDot, 'the selected scores', fold_batch(0, 1, 2, 4),
                                        fold_batch(0, 1, 2, 3))


def _gather_dot_backward_dense(q, k, idx, grad, need_q: bool, need_k: bool, budget_bytes: int = 8 * 1024 * 1024):
    B, G, N, D = q.shape
    M = k.shape[2]
    dq = torch.empty_like(q) if need_q else None
    dk = torch.zeros_like(k) if need_k else None
    chunk = _query_chunk(budget_bytes, q, M * 4)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        ds = torch.zeros(B, G, e - s, M, dtype=grad.dtype, device=grad.device)
        ds = ds.scatter_add_(-1, idx[:, :, s:e], grad[:, :, s:e]).to(q.dtype)  # the K selected entries per row
        if dq is not None:
            dq[:, :, s:e] = torch.matmul(ds, k)
        if dk is not None:
            dk.add_(torch.matmul(ds.transpose(-1, -2), q[:, :, s:e]))
    return dq, dk


def _gather_dot_backward_sparse(q, k, idx, grad, need_q: bool, need_k: bool):
    """Gather / scatter gradients in query blocks (see ``_query_blocks``): dq = sum_t g_t k[idx_t] (a batched
    (1, K) @ (K, D) product over the block's re-gathered rows), dk[idx_t] += g_t q by index_add_."""
    B, G, M, D = k.shape
    N, K = idx.shape[2], idx.shape[3]
    table, rows, blocks = _block_setup(k, idx, B * G * N * D * q.element_size())
    grad_s = grad.to(q.dtype).reshape(B * G, N, K)
    q_s = q.reshape(B * G, N, D)
    dq = torch.empty(B * G, N, D, dtype=q.dtype, device=q.device) if need_q else None
    dk = torch.zeros(B * G * M, D, dtype=k.dtype, device=k.device) if need_k else None
    for s0, s1, n0, n1 in blocks:
        r = rows[s0:s1, n0:n1].reshape(-1)
        g = grad_s[s0:s1, n0:n1]
        if dq is not None:
            rows_k = table.index_select(0, r).view(s1 - s0, n1 - n0, K, D)
            dq[s0:s1, n0:n1] = torch.matmul(g.unsqueeze(-2), rows_k).squeeze(-2)
        if dk is not None:
            dk.index_add_(0, r, (g.unsqueeze(-1) * q_s[s0:s1, n0:n1].unsqueeze(-2)).view(-1, D))
    return (dq.view(B, G, N, D) if dq is not None else None,
            dk.view(B, G, M, D) if dk is not None else None)


def gather_dot(
        q: torch.Tensor,
        k: torch.Tensor,
        idx: torch.Tensor,
        budget_bytes: int = 1024 * 1024,
        scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scores of the selected pairs only: (B, G, N, D) x (B, G, M, D) at (B, G, N, K) -> (B, G, N, K).

    ``scores``: the selection's own values of these pairs (``select_scored_neighbors``); they are returned (as
    differentiable scores) instead of being recomputed. TorchScript always recomputes.

    Raises ValueError / TypeError where the shapes do not pair up or an id lies outside the M tokens (a wrong id
    would read another sample's or head's row; checked values: on CUDA one host synchronisation, and the layers call
    the unchecked ``_gather_dot``).
    """
    if not torch.jit.is_scripting():
        _check_gather_dot(q, k, idx, scores)
    return _gather_dot(q, k, idx, budget_bytes, scores)


def _gather_dot(
        q: torch.Tensor,
        k: torch.Tensor,
        idx: torch.Tensor,
        budget_bytes: int = 1024 * 1024,
        scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``gather_dot`` without the argument checks (the layers' call)."""
    if torch.jit.is_scripting():
        return _gather_dot_eager(q, k, idx, budget_bytes)
    _refuse_torchscript_onnx_export()
    return (_GatherDotTransformable if transforms_active() else _GatherDot).apply(q, k, idx, budget_bytes, scores)


def _apply_weight(g: torch.Tensor, weight: torch.Tensor, s: int, e: int, depthwise: bool) -> torch.Tensor:
    """sum over slots s..e of W_t g_t: g (B, G, N, ks, C) -> (B, G, N, Cout)."""
    if depthwise:
        # weight (G, C, K) -> (1, G, 1, ks, C)
        return (g * weight[:, :, s:e].transpose(1, 2).unsqueeze(1)).sum(-2)
    # weight (G, Cout, C, K): contract slots and input channels in one (G, B * N, ks * C) @ (G, ks * C, Cout) product
    B, G, N, ks, C = g.shape
    cout = weight.shape[1]
    w = weight[:, :, :, s:e].permute(0, 3, 2, 1).reshape(G, ks * C, cout)
    y = torch.bmm(g.reshape(B, G, N * ks * C).transpose(0, 1).reshape(G, B * N, ks * C), w)
    return y.view(G, B, N, cout).transpose(0, 1)


def _aggregate_eager(
        v: torch.Tensor,
        idx: torch.Tensor,
        rho: Optional[torch.Tensor],
        weight: torch.Tensor,
        depthwise: bool,
        budget_bytes: int = 1024 * 1024,
) -> torch.Tensor:
    B, G, M, C = v.shape
    K = idx.shape[3]
    table = v.reshape(B * G * M, C)
    step = _slot_chunk(idx, C, budget_bytes)
    # (the sum of no slots, K = 0 where there are no tokens to select: zeros of the output's shape)
    out = v.new_zeros(B, G, idx.shape[2], C if depthwise else weight.shape[1])
    for s in range(0, K, step):
        e = min(K, s + step)
        g = _gather_rows(table, idx[..., s:e], M)  # (B, G, N, ks, C)
        if rho is not None:
            g = g * rho[..., s:e].unsqueeze(-1)
        y = _apply_weight(g, weight, s, e, depthwise)
        out = y if s == 0 else out + y
    return out


def _depthwise_setup(v: torch.Tensor, idx: torch.Tensor, rho: Optional[torch.Tensor], weight: torch.Tensor):
    """``_block_setup`` for the depthwise aggregation (output-sized like v's rows at the queries), plus the slot
    weights of every (b, g) slice, (B*G, K, C), and rho as (B*G, N, K)."""
    B, G, M, C = v.shape
    N, K = idx.shape[2], idx.shape[3]
    table, rows, blocks = _block_setup(v, idx, B * G * N * C * v.element_size())
    slice_weight = weight.transpose(1, 2).contiguous().repeat(B, 1, 1)  # slice (b, g) uses weight[g]
    rho_s = rho.reshape(B * G, N, K) if rho is not None else None
    return table, rows, blocks, slice_weight, rho_s


def _aggregate_depthwise_forward(v, idx, rho: Optional[torch.Tensor], weight):
    """No-grad depthwise aggregation in query blocks: gather a block's K neighbour rows, scale by the slot weights
    and by rho, sum over slots, all in cache."""
    B, G, M, C = v.shape
    N, K = idx.shape[2], idx.shape[3]
    table, rows, blocks, slice_weight, rho_s = _depthwise_setup(v, idx, rho, weight)
    out = torch.empty(B * G, N, C, dtype=v.dtype, device=v.device)
    for s0, s1, n0, n1 in blocks:
        g = table.index_select(0, rows[s0:s1, n0:n1].reshape(-1)).view(s1 - s0, n1 - n0, K, C)
        g.mul_(slice_weight[s0:s1].unsqueeze(1))
        if rho_s is not None:
            g.mul_(rho_s[s0:s1, n0:n1].unsqueeze(-1))
        # elementwise + sum rather than a batched (1, K) @ (K, C) matmul: as fast here, and FLOP counters (which
        # count matmuls) keep seeing the model's matmuls only; utils.stats adds the aggregation term separately
        out[s0:s1, n0:n1] = g.sum(2)
    return out.view(B, G, N, C)


def _aggregate_depthwise_backward(v, idx, rho: Optional[torch.Tensor], weight, grad, need_v: bool, need_rho: bool,
                                  need_w: bool, weight_entries: int = 1):
    """Gradients of the depthwise aggregation in the forward's query blocks, re-gathering the neighbour rows g:
    d rho = <g, w * grad> per slot, d w = sum over queries of rho * g * grad, d v += rho * w *
    grad scattered to the neighbours by index_add_ (on a quiet 2-core CPU 3x faster than index_put_(accumulate)).
    ``weight_entries`` E > 1: d w per each of E equal runs of the batch, (E * G, C, K) (per-sample gradients)."""
    B, G, M, C = v.shape
    N, K = idx.shape[2], idx.shape[3]
    table, rows, blocks, slice_weight, rho_s = _depthwise_setup(v, idx, rho, weight)
    grad_s = grad.reshape(B * G, N, C)
    dv = torch.zeros(B * G * M, C, dtype=v.dtype, device=v.device) if need_v else None
    drho = torch.empty(B * G, N, K, dtype=rho.dtype, device=rho.device) if (need_rho and rho is not None) else None
    dw = torch.zeros(B * G, K, C, dtype=v.dtype, device=v.device) if need_w else None  # per slice, summed over b
    for s0, s1, n0, n1 in blocks:
        r = rows[s0:s1, n0:n1].reshape(-1)
        gr = grad_s[s0:s1, n0:n1]  # (c, q, C)
        w = slice_weight[s0:s1].unsqueeze(1)  # (c, 1, K, C)
        rh = rho_s[s0:s1, n0:n1].unsqueeze(-1) if rho_s is not None else None  # (c, q, K, 1)
        gw = gr.unsqueeze(2) * w if (dv is not None or drho is not None) else None  # grad * w, (c, q, K, C)
        if drho is not None or dw is not None:
            g = table.index_select(0, r).view(s1 - s0, n1 - n0, K, C)
            if drho is not None:
                drho[s0:s1, n0:n1] = torch.linalg.vecdot(g, gw)  # 3x faster than a batched mat-vec here
            if dw is not None:
                g.mul_(gr.unsqueeze(2))
                if rh is not None:
                    g.mul_(rh)
                dw[s0:s1] += g.sum(1)
        if dv is not None:
            if rh is not None:
                gw.mul_(rh)
            dv.index_add_(0, r, gw.view(-1, C))
    if dw is not None:  # summed over each run of the batch: (E * G, C, K)
        dw = dw.view(weight_entries, B // weight_entries, G, K, C).sum(1).transpose(2, 3).flatten(0, 1)
    return (dv.view(B, G, M, C) if dv is not None else None, None,
            drho.view(B, G, N, K) if drho is not None else None, dw)


class _NeighborAggregate(torch.autograd.Function):
    """y_i = sum_t W_t (rho_it v_{idx_it}); saves v, idx, rho, weight (never the gathered neighbours)."""

    @staticmethod
    def forward(ctx, v, idx, rho, weight, depthwise: bool, budget_bytes: int):
        out = _NeighborAggregate.compute(v, idx, rho, weight, depthwise, budget_bytes)
        _NeighborAggregate.save(ctx, (v, idx, rho, weight, depthwise, budget_bytes), out)
        return out

    @staticmethod
    def compute(v, idx, rho, weight, depthwise: bool, budget_bytes: int):
        with torch.no_grad():
            if depthwise and not size_free(idx.shape[2]):
                return _aggregate_depthwise_forward(v, idx, rho, weight)
            return _aggregate_eager(v, idx, rho, weight, depthwise, budget_bytes)

    @staticmethod
    def save(ctx, inputs, output):
        v, idx, rho, weight, ctx.depthwise, ctx.budget_bytes = inputs
        ctx.has_rho = rho is not None
        ctx.save_for_backward(v, idx, rho if rho is not None else v.new_zeros(0), weight)

    @staticmethod
    def gradient_inputs(ctx, grad):
        v, idx, rho, weight = ctx.saved_tensors
        return (grad, v, idx, rho if ctx.has_rho else None, weight, ctx.depthwise, ctx.budget_bytes) + \
            _needs_input_grad(ctx, 0, 2, 3) + (1,)

    @staticmethod
    def gradients(grad, v, idx, rho: Optional[torch.Tensor], weight, depthwise: bool, budget_bytes: int,
                  need_v: bool, need_rho: bool, need_w: bool, weight_entries: int):
        """The gradients; with ``weight_entries`` E > 1 the weights' per each of E equal runs of the batch (E * G,
        ...) (torch.func's per-sample gradients: the samples folded into the batch)."""
        if depthwise:
            grads = _aggregate_depthwise_backward(  # grad arrives as a transposed view from the head merge
                v, idx, rho, weight, grad.contiguous(), need_v, need_rho, need_w, weight_entries)
        else:
            grads = _aggregate_standard_backward(v, idx, rho, weight, grad, need_v, need_rho, need_w, budget_bytes,
                                                 weight_entries)
        return grads + (None, None)

    @staticmethod
    @first_derivative_only('the neighbour aggregation')
    def backward(ctx, grad):
        return _NeighborAggregate.gradients(*_NeighborAggregate.gradient_inputs(ctx, grad))


# for torch.func transforms: v, idx and rho are (B, G, ...), the weights (G, ...); a vmapped dimension folds into the
# batch (the backward then gives the weights' gradient per entry: per-sample gradients), or into the groups where the
# weights are vmapped (an ensemble)
_NeighborAggregateTransformable = transformable(
    _NeighborAggregate, 'the neighbour aggregation', fold_batch(0, 1, 2, weights=(3,)),
    fold_batch(0, 1, 2, 3, weights=(4,), weight_outputs=(3,), entries=10))


def _aggregate_standard_backward(v, idx, rho: Optional[torch.Tensor], weight, grad, need_v: bool, need_rho: bool,
                                 need_w: bool, budget_bytes: int, weight_entries: int = 1):
    """Gradients of the standard (full Conv1d) aggregation, in slot chunks that fit the budget; re-gathers v.
    ``weight_entries`` E > 1: d w per each of E equal runs of the batch, (E * G, Cout, C, K)."""
    B, G, M, C = v.shape
    N, K = idx.shape[2], idx.shape[3]
    table = v.reshape(B * G * M, C)
    dv = torch.zeros(B * G * M, C, dtype=v.dtype, device=v.device) if need_v else None
    drho = torch.empty_like(rho) if (need_rho and rho is not None) else None
    E = weight_entries
    dw = weight.new_zeros((E,) + tuple(weight.shape)) if need_w else None
    step = _slot_chunk(idx, max(C, grad.shape[-1]), budget_bytes)
    for s in range(0, K, step):
        e = min(K, s + step)
        g = _gather_rows(table, idx[..., s:e], M)  # re-gathered, (B, G, N, ks, C)
        # (G, B * N, Cout) @ (G, Cout, ks * C) -> (B, G, N, ks, C)
        w = weight[:, :, :, s:e].permute(0, 1, 3, 2).reshape(G, -1, (e - s) * C)
        gg = grad.transpose(0, 1).reshape(G, B * N, grad.shape[-1])
        gw = torch.bmm(gg, w).view(G, B, N, e - s, C).transpose(0, 1)
        if drho is not None:
            drho[..., s:e] = (gw * g).sum(-1)
        if dw is not None:
            g_rho = g * rho[..., s:e].unsqueeze(-1) if rho is not None else g
            # sum over B (each of its E runs), N of grad (Cout) x g_rho (ks, C) -> (E, G, Cout, ks, C)
            gt = grad.unflatten(0, (E, B // E)).permute(0, 2, 4, 1, 3).reshape(E, G, grad.shape[-1], B // E * N)
            gr = g_rho.unflatten(0, (E, B // E)).permute(0, 2, 1, 3, 4, 5).reshape(E, G, B // E * N, (e - s) * C)
            dw[..., s:e] = torch.matmul(gt, gr).view(E, G, -1, e - s, C).transpose(3, 4)
        if dv is not None:
            gv = gw * rho[..., s:e].unsqueeze(-1) if rho is not None else gw
            dv.index_add_(0, _flat_rows(idx[..., s:e], M), gv.reshape(-1, C))
    return dv.view(B, G, M, C) if dv is not None else None, None, drho, dw.flatten(0, 1) if dw is not None else None


def neighbor_aggregate(
        v: torch.Tensor,
        idx: torch.Tensor,
        rho: Optional[torch.Tensor],
        weight: torch.Tensor,
        depthwise: bool,
        budget_bytes: int = 1024 * 1024,
) -> torch.Tensor:
    """ConvNN aggregation, Conv1d(kernel K, stride K) over each query's K (weighted) neighbours.

    Neighbour slots are processed in chunks whose gathered rows fit a fixed working-set budget, so memory does not
    grow with K, and backward re-gathers instead of storing.

    Args:
        v: (B, G, M, C) values of all tokens.
        idx: (B, G, N, K) selected token ids per query (slot order = conv tap order).
        rho: optional (B, G, N, K) neighbour weights (None = ones).
        weight: depthwise (G, C, K), or standard (G, Cout, C, K) (one Conv1d per group).
        depthwise: selects the weight layout above.

    Returns:
        (B, G, N, C) for depthwise, (B, G, N, Cout) for standard; dtype of ``v``, or under autocast for the standard
        aggregation (a matrix product, like the convolution it replaces) autocast's dtype.

    Raises ValueError / TypeError where the shapes do not pair up or an id lies outside the M tokens (checked values:
    on CUDA one host synchronisation; ``NeighborAggregation`` and the layers call the unchecked aggregation).
    """
    if not torch.jit.is_scripting():
        _check_aggregation(v, idx, rho, weight, depthwise)
    return _neighbor_aggregate(v, idx, rho, weight, depthwise, budget_bytes)


def _neighbor_aggregate(
        v: torch.Tensor,
        idx: torch.Tensor,
        rho: Optional[torch.Tensor],
        weight: torch.Tensor,
        depthwise: bool,
        budget_bytes: int = 1024 * 1024,
) -> torch.Tensor:
    """``neighbor_aggregate`` without the argument checks (``NeighborAggregation``'s call)."""
    if not torch.jit.is_scripting():
        v = _autocast_operand(v, depthwise)
    if size_free(v.shape[2]):  # token id M: the empty slots' zero row (see _empty_slots)
        v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], 1, v.shape[3])], dim=2)
    weight = weight.to(v.dtype)
    if rho is not None:
        rho = rho.to(v.dtype)
    if torch.jit.is_scripting():
        return _aggregate_eager(v, idx, rho, weight, depthwise, budget_bytes)
    _refuse_torchscript_onnx_export()
    function = _NeighborAggregateTransformable if transforms_active() else _NeighborAggregate
    return function.apply(v, idx, rho, weight, depthwise, budget_bytes)


@torch.jit.unused
def _refuse_torchscript_onnx_export() -> None:
    """ONNX: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, timm's ``onnx_export`` default)
    converts the autograd Functions of this module wrongly (the depthwise aggregation exported, and onnxruntime then
    computed a ViT-Ti's logits 0.27 off) or fails deep inside; the dynamo-based exporter is exact (tested)."""
    if torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():
        raise RuntimeError(
            'ConvNN layers export to ONNX with the dynamo-based exporter only: torch.onnx.export(..., dynamo=True), '
            'or timm.utils.onnx.onnx_export(..., use_dynamo=True). The TorchScript-based exporter (dynamo=False) '
            'converts them wrongly or fails.')


def _autocast_operand(v: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """v in the dtype autocast gives a matrix product's operands on v's device, for the standard aggregation: the
    aggregation then runs, saves and differentiates in one dtype, the output has it, and the cast's own backward
    returns v's gradient in v's dtype. (Left to autocast inside the autograd Function, the forward product came out
    in bf16 from an fp32 v, e.g. the image into a VGG's first ConvNN layer, and the backward, which runs outside
    autocast, then mixed the two dtypes.) The depthwise aggregation is elementwise, which autocast leaves alone."""
    if depthwise or not _has_autocast(v):
        return v
    if not torch.is_autocast_enabled(v.device.type) or not v.is_floating_point():
        return v
    dtype = torch.get_autocast_dtype(v.device.type)
    return v if v.dtype == torch.float64 else v.to(dtype)


def hashed_permutation(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random permutation of range(n), the same on every device, process and run.

    A 32-bit integer hash (bijective on 32-bit values, so there are no ties) of each index keyed by ``seed``,
    then argsort. Used for deterministic candidate sampling in eval mode.
    """
    mask = 0xFFFFFFFF
    x = torch.arange(n, device=device, dtype=torch.int64)
    key = seed * 0x9E3779B1 + 0x632BE5AB
    if isinstance(key, int):  # reduced before it meets the int64 ids: any seed (a symbolic one, under torch.export,
        key = key & mask      # stays a sum with the ids: ONNX has no bitwise and of ints)
    x = (x + key) & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    x = x ^ (x >> 16)
    return torch.sort(x).indices  # distinct keys: any sort is stable (and ONNX has no stable sort)


def random_candidates(
        num_tokens: int,
        num_samples: int,
        offset: int,
        training: bool,
        seed: int,
        device: torch.device,
) -> torch.Tensor:
    """``num_samples`` distinct token ids from ``offset .. offset + num_tokens - 1``.

    Fresh draws from torch's global RNG in training; a fixed hashed draw (keyed by seed and token count) in eval,
    so eval is deterministic across calls and processes.
    """
    if training:
        perm = torch.randperm(num_tokens, device=device)
    else:
        # (the seed's term reduced mod 2 ** 32, which is all the hash keeps of it: small even in a symbolic sum)
        perm = hashed_permutation(num_tokens, ((seed * 1000003) & 0xFFFFFFFF) + num_tokens, device)
    return perm[:sym_min(num_samples, num_tokens)] + offset  # (min(r, n) ids with no guard on a symbolic n)


def grid_shape(height: int, width: int, num_samples: int) -> Tuple[int, int]:
    """Rows x cols of the regular candidate grid: the largest grid of at most ``num_samples`` points that keeps the
    map's aspect ratio (at least 1 x 1, at most the map)."""
    # (gh <= num_samples, so num_samples // gh >= 1 and gh * gw <= num_samples; sym_*: symbolic sizes stay symbolic)
    gh = sym_max(1, sym_min(sym_min(height, num_samples), sym_round((num_samples * height / width) ** 0.5)))
    return gh, sym_min(width, num_samples // gh)


def grid_candidates(
        height: int,
        width: int,
        num_samples: int,
        row_stride: int,
        offset: int,
        device: torch.device,
) -> torch.Tensor:
    """Token ids of a regular grid of at most ``num_samples`` points on a height x width map.

    Points sit at the centres of equal cells: row ``floor((a + 0.5) * height / gh)``, same for columns. Token id =
    offset + row * row_stride + col (``row_stride`` is the flattened row length, e.g. a padded width).
    """
    gh, gw = grid_shape(height, width, num_samples)
    rows = ((torch.arange(gh, device=device, dtype=torch.float64) + 0.5) * (height / gh)).floor().long()
    cols = ((torch.arange(gw, device=device, dtype=torch.float64) + 0.5) * (width / gw)).floor().long()
    return raster_ids(rows, cols, row_stride) + offset


def raster_ids(rows: torch.Tensor, cols: torch.Tensor, row_stride: int) -> torch.Tensor:
    """rows[a] * row_stride + cols[b] for every (a, b), in raster order. Indexed from one flat range rather than
    broadcast or expanded, which treat a count of 1 specially: a graph exported for every image size would assert
    that neither count is 1."""
    row, col = split_raster(torch.arange(rows.shape[0] * cols.shape[0], device=rows.device), cols.shape[0])
    return rows[row] * row_stride + cols[col]


def split_raster(flat: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of raster ids on a map ``width`` wide: ``flat - row * width`` rather than ``flat % width``, which
    the ONNX exporter cannot convert for a symbolic width."""
    row = torch.div(flat, width, rounding_mode='floor')
    return row, flat - row * width


def coordinate_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(height * width, 2) normalised (x, y) coordinates in raster order, in at least fp32 (``dtype`` promoted).

    Both axes share one spacing (2 / (max(height, width) - 1)) and are centred on 0, so euclidean distance on the
    coordinates is proportional to pixel distance on any map shape (the property that makes coordinate ConvNN an
    exact KxK convolution).
    """
    dtype = torch.promote_types(dtype, torch.float32)  # bf16 / fp16 cannot tell neighbouring pixels apart
    step = 2. / sym_max(1, sym_max(height, width) - 1)
    ys = (torch.arange(height, device=device, dtype=dtype) - (height - 1) / 2.) * step
    xs = (torch.arange(width, device=device, dtype=dtype) - (width - 1) / 2.) * step
    grid = torch.stack([xs.view(1, -1).expand(height, width), ys.view(-1, 1).expand(height, width)], dim=-1)
    return grid.reshape(-1, 2)
