"""A few DistributedDataParallel training steps of ConvNN models, as timm's train.py runs them
(tests/test_distributed.py starts this with torchrun: two CPU processes, gloo).

Never imports timm_convnn: the models come from the autoload hook. Prints one JSON line (rank 0) with, per model and
step, the largest gradient difference between the ranks and, where the model is deterministic in training, between
the DDP gradient and a single-process gradient of the whole batch.
"""
import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import timm

SMALL_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
CASES = {
    # all candidates, no BatchNorm: DDP's averaged gradient must equal the single-process full-batch gradient
    'vit_all': ('vit_tiny_convnn_all', dict(SMALL_VIT)),
    # random candidates: each rank draws its own subsets (per-rank seeds, as train.py); ranks must still agree
    'vit_random': ('vit_tiny_convnn_random', dict(SMALL_VIT, num_samples=16)),
    'resnet_branch': ('resnet18_convnn_branch', dict(num_classes=5)),
}
PER_RANK = 4


def flat_grads(model):
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'parameters without gradient (DDP find_unused_parameters=False would fail): {missing}'
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def max_rank_difference(t):
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return max((g - t).abs().max().item() for g in gathered)


def main():
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    assert 'timm_convnn' in sys.modules, 'the autoload hook did not register the models'
    results = {}
    for case, (name, kwargs) in CASES.items():
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs).train()
        reference = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        torch.manual_seed(100 + rank)  # per-rank RNG, as train.py's random_seed(seed, rank)
        data = torch.Generator().manual_seed(1234)  # the same global batch on every rank
        steps = []
        for step in range(2):
            x = torch.randn(PER_RANK * world, 3, 32, 32, generator=data)
            y = torch.randint(0, 5, (PER_RANK * world,), generator=data)
            mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x[mine]), y[mine]).backward()
            grads = flat_grads(model)
            row = dict(ranks=max_rank_difference(grads), scale=grads.abs().max().item())
            if case == 'vit_all':
                reference.load_state_dict(model.state_dict())
                reference.zero_grad(set_to_none=True)
                F.cross_entropy(reference(x), y).backward()
                row['single_process'] = (flat_grads(reference) - grads).abs().max().item()
            steps.append(row)
            opt.step()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[case] = dict(steps=steps, params_ranks=max_rank_difference(params))
    if rank == 0:
        print('DDP_RESULT ' + json.dumps(results), flush=True)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
