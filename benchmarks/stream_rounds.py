"""Merge rounds of the fused streaming forward's top-K loop, counted on CPU (no GPU, no Triton).

    python benchmarks/stream_rounds.py                          # n 16385, K 9 and 16, 64 queries per block
    python benchmarks/stream_rounds.py --tokens 3137 --neighbors 16 --block-queries 16 64 --smooth 0 9
    python benchmarks/stream_rounds.py --threshold               # CONFIG fwd_stream='threshold' instead

``triton_attention._stream_top_k`` streams key tiles of ``STREAM_BLOCK_N`` through a running top-K buffer per query:
a tile is merged in rounds, each inserting every query's best remaining tile score that beats its K-th best, for as
long as some query of the block still has one. So a tile costs as many rounds as its busiest query needs, and a block
of queries costs more rounds than any one query has insertions (about K ln(n / K) over the stream). This counts them
for blocks of contiguous queries on Gaussian features (``--smooth W``: keys averaged over W neighbouring tokens, and
queries near their own token's key, a stand-in for image patches whose near tokens look alike), as the kernel's loop
would run: a model of the control flow, not a timing.

``--threshold`` models ``CONFIG['fwd_stream'] = 'threshold'`` (``triton_attention._threshold_top_k``) instead: no
merge rounds; a pass bounds each query's K-th best score by the K-th largest of the tiles' best values (1, 2 or 4 per
tile, ``triton_attention._per_tile``), a second keeps every key scoring at least the bound. It prints how many keys
that leaves per query (mean, 99th percentile, the block's largest on average) and the share of blocks in which some
query keeps more than ``STREAM_CAP`` (those run the merge loop instead).
"""
import argparse
import math

import torch
import torch.nn.functional as F


def merge_rounds(scores: torch.Tensor, num_neighbors: int, tile: int) -> tuple:
    """(rounds, insertions per query) of one block's stream: ``scores`` (queries, keys) in key order."""
    best = scores.new_full((scores.shape[0], num_neighbors), float('-inf'))
    rounds, inserted = 0, torch.zeros(scores.shape[0], dtype=torch.long)
    for start in range(0, scores.shape[1], tile):
        merged = torch.cat([best, scores[:, start:start + tile]], dim=1)
        top = merged.topk(num_neighbors, dim=1).indices
        new = (top >= num_neighbors).sum(1)  # tile scores that entered the buffer, per query
        rounds += int(new.max())
        inserted += new
        best = merged.gather(1, top)
    return rounds, inserted.float().mean().item()


def threshold_counts(scores: torch.Tensor, num_neighbors: int, tile: int, per_tile: int) -> torch.Tensor:
    """Keys per query that ``_threshold_top_k`` keeps for ``scores`` (queries, keys): those scoring at least the K-th
    largest of every tile's ``per_tile`` best distinct values (fewer than K values: all keys)."""
    values = []
    for start in range(0, scores.shape[1], tile):
        s = scores[:, start:start + tile].clone()
        for _ in range(per_tile):
            mx = s.amax(1, keepdim=True)
            values.append(mx)
            s = s.masked_fill(s == mx, float('-inf'))
    values = torch.cat(values, 1)
    if values.shape[1] < num_neighbors:
        return torch.full((scores.shape[0],), scores.shape[1])
    bound = values.topk(num_neighbors, dim=1).values[:, -1:]
    return (scores >= bound).sum(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tokens', type=int, default=16385)
    p.add_argument('--neighbors', type=int, nargs='+', default=[9, 16])
    p.add_argument('--block-queries', type=int, nargs='+', default=[64])
    p.add_argument('--tile', type=int, default=64, help='keys per tile (triton_attention.STREAM_BLOCK_N)')
    p.add_argument('--dim', type=int, default=64)
    p.add_argument('--blocks', type=int, default=8, help='query blocks averaged (at random positions)')
    p.add_argument('--smooth', type=int, nargs='+', default=[0, 9])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threshold', action='store_true', help="model CONFIG fwd_stream='threshold' instead")
    args = p.parse_args()
    n, tiles = args.tokens, math.ceil(args.tokens / args.tile)
    print(f'n {n}, {tiles} tiles of {args.tile} keys, head dim {args.dim}, {args.blocks} blocks per row')
    for smooth in args.smooth:
        g = torch.Generator().manual_seed(args.seed)
        keys = torch.randn(n, args.dim, generator=g)
        if smooth > 1:
            keys = F.avg_pool1d(keys.t()[None], smooth, 1, smooth // 2, count_include_pad=False)[0].t()[:n] + \
                0.3 * keys
        for bm in args.block_queries:
            starts = torch.randint(0, n - bm + 1, (args.blocks,), generator=g)
            queries = [keys[s:s + bm] + 0.5 * torch.randn(bm, args.dim, generator=g) for s in starts.tolist()]
            for k in args.neighbors:
                if args.threshold:
                    from timm_convnn.layers import triton_attention as ta
                    per_tile = ta._tile_values(n, k)
                    counts = torch.stack([threshold_counts(q @ keys.t(), k, args.tile, per_tile) for q in queries])
                    print(f'smooth {smooth:2d}  {bm:3d} queries per block  K {k:2d}: {per_tile} per tile, keeps '
                          f'{counts.float().mean():5.1f} keys per query (99th percentile '
                          f'{counts.float().quantile(0.99):.0f}, block max {counts.amax(1).float().mean():.0f}), '
                          f'{(counts.amax(1) > ta.STREAM_CAP).float().mean():.0%} of blocks over {ta.STREAM_CAP}',
                          flush=True)
                    continue
                runs = [merge_rounds(q @ keys.t(), k, args.tile) for q in queries]
                rounds = sum(r for r, _ in runs) / len(runs)
                per_query = sum(i for _, i in runs) / len(runs)
                print(f'smooth {smooth:2d}  {bm:3d} queries per block  K {k:2d}: {rounds:6.0f} merge rounds per block '
                      f'({rounds / tiles:.2f} per tile), {per_query:5.1f} insertions per query '
                      f'(K ln(n / K) = {k * math.log(n / k):.0f})', flush=True)


if __name__ == '__main__':
    main()
