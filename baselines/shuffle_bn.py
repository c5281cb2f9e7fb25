"""Shuffle BN in both worlds (spec §2.9).

Under torchrun the key images are shuffled across processes before the key forward and the key
outputs un-shuffled after, exactly as the official `_batch_shuffle_ddp`. In one process that
shuffle is a no-op for BN, so the official 8 GPUs x 32 images can be emulated with "ghost BN":
`GhostBatchNorm2d` normalises each group of G consecutive images with its own statistics, and the
same shuffle then mixes keys across groups. With several processes *and* ghost BN, both apply.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x`, concatenated in rank order (no gradient, as in the official code)."""
    if world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's slice of the globally shuffled batch, and the index that undoes it."""
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)  # rank 0 decides, as `_batch_shuffle_ddp`
    local = perm.view(world_size(), -1)[rank()]
    return x_all[local], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle` on a key output: row i belongs to this process's input image i again."""
    x_all = concat_all_gather(x)
    return x_all[unshuffle_index.view(world_size(), -1)[rank()]]


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with training statistics per group of `group_size` consecutive images.

    Each group is normalised as its own "virtual GPU" would be under per-GPU BN. Running
    statistics take one update per step from the mean of the groups' statistics. Parameters and
    buffers are those of `nn.BatchNorm2d`, so state dicts are interchangeable; in eval mode, or
    with `group_size` 0, it is plain BN.
    """

    group_size: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        g = self.group_size
        if not self.training or g <= 0 or n == g:
            return super().forward(x)
        if n % g:
            raise ValueError(f"ghost BN: a batch of {n} images does not split into groups of {g}")
        groups, c, h, w = n // g, x.shape[1], x.shape[2], x.shape[3]
        # Fold the groups into the channel axis so one fused batch_norm computes per-group stats.
        folded = x.reshape(groups, g, c, h, w).transpose(0, 1).reshape(g, groups * c, h, w)
        running_mean = self.running_mean.repeat(groups)
        running_var = self.running_var.repeat(groups)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        y = F.batch_norm(folded, running_mean, running_var, weight, bias, True, momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(groups, c).mean(0))
            self.running_var.copy_(running_var.view(groups, c).mean(0))
        return y.reshape(g, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def convert_to_ghost_bn(module: nn.Module, group_size: int) -> nn.Module:
    """Swap every BatchNorm2d in `module` (in place) for a GhostBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d and child.track_running_stats:
            ghost = GhostBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device=child.running_mean.device, dtype=child.running_mean.dtype)
            ghost.load_state_dict(child.state_dict())
            ghost.group_size = group_size
            setattr(module, name, ghost)
        else:
            convert_to_ghost_bn(child, group_size)
    return module
