"""What lets N torchrun ranks of a protocol that trains compute what one process computes with the whole batch.

The dense protocols use all of it; the linear probe's heads use the SyncBN conversion.

Each rank trains on its share of every global batch (the batch and LR stay the reference's at any N) and
DDP averages the gradients. Three things couple the images of one batch, and each needs its part here:
- BatchNorm: the reference uses SyncBN. `to_sync_batchnorm` converts every BN of the model to torch's
  SyncBatchNorm on GPUs, and on the CPU, where torch's refuses CPU tensors ("SyncBatchNorm expected
  input tensor to be on GPU", torch 2.14) and DDP refuses it on CPU modules, to `CrossRankBatchNorm`:
  the same statistics, all-reduced over gloo.
- Dropout: `GlobalBatchDropout2d` draws the mask for the whole global batch, as one process would, and
  keeps this rank's rows, so FCN's dropout masks do not depend on N.
- Evaluation: `predict_in_order` shards the test images over the ranks and hands every rank the
  per-image outputs in image order, so the metric sees exactly the list one process would build.
What stays rank-local, as in the reference's own multi-GPU runs: mmdet's per-batch loss normalisers
(averages over the rank's sampled anchors/RoIs), padding to the rank's largest image, and RoI/anchor
sampling, which draws image after image from one random stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import PurePath
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from baselines.distributed import Distributed


def rank_share(batches: Iterable[list[Any]], rank: int, world_size: int) -> Iterator[list[Any]]:
    """This rank's contiguous slice of every global batch (rank 0 takes the first images)."""
    for batch in batches:
        per_rank = len(batch) // world_size
        yield batch[rank * per_rank:(rank + 1) * per_rank]


def combined_checksum(checksums: Iterable[int]) -> int:
    """Checksums of disjoint parts (iterations, ranks) combined into the whole's: their sum mod 2^64."""
    return sum(checksums) % 2**64


def samples_checksum(iteration: int, data_samples: Iterable[Any]) -> int:
    """An order-free checksum of the (iteration, image file) pairs of one rank's batch. Combined over the ranks and
    the iterations it equals one process's at any N, and it changes when a rank trains on another rank's share:
    a sharding break that C4's weights cannot show, since its rank-local loss normalisers move them as much."""
    names = (PurePath(str(s.metainfo.get("img_path") or s.metainfo.get("img_id"))).name for s in data_samples)
    return combined_checksum(
        int.from_bytes(hashlib.blake2b(f"{iteration}:{name}".encode(), digest_size=8).digest(), "little")
        for name in names)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every rank's loss depends on every rank's BN inputs."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossRankBatchNorm(_BatchNorm):
    """SyncBN on the CPU: mean and variance over all ranks' images from two differentiable all-reduces (sum,
    then squared deviations: two passes, as one process's BN computes them). Not a subclass of torch's
    SyncBatchNorm, which DDP refuses on CPU modules. In eval mode, or in one process, it is plain BN; its
    parameters and buffers are BN's."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        count = _SumOverRanks.apply(torch.tensor(float(x.numel() // x.shape[1])))
        mean = _SumOverRanks.apply(x.sum(dims)) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / max(count.item() - 1, 1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var, alpha=factor)


def to_sync_batchnorm(module: nn.Module, device_type: str) -> int:
    """Replace every BN layer below `module` by a synchronised one (torch's SyncBatchNorm, or
    `CrossRankBatchNorm` for the CPU) holding the same parameters (the same tensors: requires_grad and
    freezing carry over), buffers and train/eval mode. Returns how many."""
    sync_class = CrossRankBatchNorm if device_type == "cpu" else nn.SyncBatchNorm
    converted = 0
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, (nn.SyncBatchNorm, CrossRankBatchNorm)):
            sync = sync_class(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
            converted += 1
        else:
            converted += to_sync_batchnorm(child, device_type)
    return converted


class GlobalBatchDropout2d(nn.Dropout2d):
    """Channel dropout whose mask is drawn for the whole global batch (`world_size` x this rank's batch) and
    cut to this rank's rows: the same random numbers, in the same order, as one process's `nn.Dropout2d`."""

    def __init__(self, p: float, rank: int, world_size: int) -> None:
        super().__init__(p)
        self.rank, self.world_size = rank, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.world_size == 1:
            return super().forward(x)
        per_rank = x.shape[0]
        noise = x.new_empty((per_rank * self.world_size, x.shape[1], *[1] * (x.dim() - 2)))
        noise.bernoulli_(1 - self.p)  # as ATen's feature dropout: Bernoulli(1 - p), then scaled by 1 / (1 - p)
        noise = noise[self.rank * per_rank:(self.rank + 1) * per_rank].div_(1 - self.p)
        return x * noise


def to_global_batch_dropout(module: nn.Module, rank: int, world_size: int) -> int:
    """Replace every `nn.Dropout2d` below `module` by a `GlobalBatchDropout2d` of the same p. Only for layers
    whose batch axis is the image batch (FCN's heads), which is all our models have. Returns how many."""
    converted = 0
    for name, child in module.named_children():
        if type(child) is nn.Dropout2d:
            replacement = GlobalBatchDropout2d(child.p, rank, world_size)
            replacement.train(child.training)
            setattr(module, name, replacement)
            converted += 1
        else:
            converted += to_global_batch_dropout(child, rank, world_size)
    return converted


def for_ranks(model: nn.Module, ranks: Distributed) -> dict[str, Any]:
    """Make `model` compute under `ranks` what it computes in one process with the whole batch (a no-op in
    one process); returns what changed, for the result."""
    if ranks.world_size == 1:
        return {}
    return {"world_size": ranks.world_size,
            "norm": "SyncBN: " + ("torch SyncBatchNorm" if ranks.device.type != "cpu"
                                  else "statistics all-reduced over gloo (torch's SyncBatchNorm refuses the CPU)"),
            "sync_bn_layers": to_sync_batchnorm(model, ranks.device.type),
            "global_batch_dropout_layers": to_global_batch_dropout(model, ranks.rank, ranks.world_size)}


def predict_in_order(ranks: Distributed, dataset, predict: Callable[[Any], Any], collate: Callable,
                     progress: bool = True) -> list[Any]:
    """`predict(batch)` for each of this rank's test images (rank, rank + N, ...; one image per batch, no
    gradient); every rank gets all the outputs in image order, exactly the list one process builds."""
    from tqdm import tqdm

    count = len(dataset)
    shares = [range(rank, count, ranks.world_size) for rank in range(ranks.world_size)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shares[ranks.rank]), batch_size=1,
                                         shuffle=False, collate_fn=collate)
    with torch.no_grad():
        mine = [predict(batch) for batch in tqdm(loader, desc="test", unit="img", mininterval=2.0,
                                                 disable=not (progress and ranks.is_main))]
    ordered: list[Any] = [None] * count
    for share, outputs in zip(shares, ranks.all_gather_object(mine), strict=True):
        for index, output in zip(share, outputs, strict=True):
            ordered[index] = output
    return ordered
