"""MoCo-v2 as the DenseCL code base trains it (spec pretraining.md §2.2, §2.4-2.6).

A query encoder and a momentum key encoder, each a backbone plus a 2-layer MLP head, and a queue
of K past keys as negatives for an InfoNCE loss at temperature 0.2. The state-dict layout is the
official OpenSelfSup one (`encoder_q.0.*` backbone, `encoder_q.1.mlp.*` head, `encoder_k.*`,
`queue`, `queue_ptr`), so official checkpoints and ours are read by the same code.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from baselines.backbone import Backbone
from baselines.shuffle_bn import batch_shuffle, batch_unshuffle, concat_all_gather, convert_to_ghost_bn, world_size


def kaiming_init_linear(module: nn.Module) -> None:
    """Neck init of the official code: nn.Linear only, kaiming-normal fan_in (relu), bias 0 (spec §2.1)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class GlobalHead(nn.Module):
    """`NonLinearNeckV1`: global average pool, Linear, ReLU, Linear. No BN (spec §2.2)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        kaiming_init_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.mean(dim=(2, 3)))


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with the positive in column 0 (`ContrastiveHead`), and its top-1 accuracy in %.

    q, k: R x D, L2-normalised, row i of k is the positive of row i of q; queue: D x K negatives.
    Computed in float32 even under autocast, so bf16 runs keep the logits exact enough to compare.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k = q.float(), k.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue.clone().detach()
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        top1 = (logits.argmax(dim=1) == 0).float().mean() * 100
    return loss, top1


@torch.no_grad()
def momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q, parameters only; BN buffers are not copied (spec §2.5)."""
    params_k = list(encoder_k.parameters())
    torch._foreach_mul_(params_k, m)
    torch._foreach_add_(params_k, list(encoder_q.parameters()), alpha=1.0 - m)


@torch.no_grad()
def dequeue_and_enqueue(queue: torch.Tensor, queue_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write this step's keys of every process over the oldest columns (spec §2.4 step 8)."""
    keys = concat_all_gather(keys.float())
    batch, size = keys.shape[0], queue.shape[1]
    if size % batch:
        raise ValueError(f"queue size {size} is not divisible by the global batch {batch} (spec §2.6)")
    ptr = int(queue_ptr)
    queue[:, ptr : ptr + batch] = keys.T
    queue_ptr[0] = (ptr + batch) % size


class MoCoV2(nn.Module):
    """MoCo-v2: `forward(im_q, im_k)` returns `loss`, `loss_global` and `acc_global` (top-1 in %)."""

    def __init__(
        self,
        backbone: Backbone,
        dim: int = 128,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        bn_group_size: int = 0,
    ) -> None:
        super().__init__()
        self.queue_size = queue_size
        self.momentum = momentum
        self.temperature = temperature
        self.bn_group_size = bn_group_size
        in_dim = backbone.channels["feature5"]
        self.encoder_q = nn.ModuleList([backbone, self.make_head(in_dim, hidden_dim or in_dim, dim)])
        self.encoder_k = copy.deepcopy(self.encoder_q)  # k <- q at init (spec §2.5)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        if bn_group_size:
            convert_to_ghost_bn(self.encoder_q, bn_group_size)
            convert_to_ghost_bn(self.encoder_k, bn_group_size)
        self.register_queue("queue", dim, queue_size)

    def make_head(self, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
        return GlobalHead(in_dim, hidden_dim, out_dim)

    def register_queue(self, name: str, dim: int, size: int) -> None:
        """A D x K buffer of random unit columns and its write pointer (spec §2.6)."""
        self.register_buffer(name, F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer(f"{name}_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def backbone(self) -> Backbone:
        """The query backbone: the one every protocol evaluates (spec protocols.md §1.3)."""
        return self.encoder_q[0]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> dict[str, torch.Tensor]:
        q = F.normalize(self.encoder_q[1](self.encoder_q[0](im_q)["feature5"]), dim=1)
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.momentum)
            k = self.keys(im_k)[0]
        loss, top1 = info_nce(q, k, self.queue, self.temperature)
        dequeue_and_enqueue(self.queue, self.queue_ptr, k)  # after the loss: never its own negative
        return {"loss": loss, "loss_global": loss.detach(), "acc_global": top1}

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Key-encoder outputs for `im_k`, computed on shuffled images and returned un-shuffled."""
        shuffle = world_size() > 1 or (self.bn_group_size and im_k.shape[0] > self.bn_group_size)
        if shuffle:
            im_k, unshuffle_index = batch_shuffle(im_k)
        outputs = self.key_outputs(self.encoder_k[0](im_k)["feature5"])
        if shuffle:
            outputs = tuple(batch_unshuffle(t, unshuffle_index) for t in outputs)
        return outputs

    def key_outputs(self, feat_k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k,): the normalised global key of each image."""
        return (F.normalize(self.encoder_k[1](feat_k), dim=1),)
