"""DenseCL: MoCo-v2 plus a dense branch (Wang et al. 2021; spec pretraining.md §2.3-2.8).

The dense head projects every location of the last backbone map; each query location is matched
to the key location whose *backbone* feature is most similar (cosine, argmax over key locations),
and contrasted against a second queue holding the pooled-then-normalised dense keys of other
images. Total loss = (1 - lambda) * L_global + lambda * L_dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.backbone import Backbone
from baselines.moco import GlobalHead, MoCoV2, dequeue_and_enqueue, info_nce, momentum_update


class DenseHead(GlobalHead):
    """`DenseCLNeck`: the MoCo-v2 global head plus `mlp2`, a 1x1-conv MLP applied per location.

    Only the Linear layers get the kaiming init; the dense convs keep PyTorch's default (spec §2.1).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, hidden_dim, out_dim)
        self.mlp2 = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global N x D, dense N x D x S^2 row-major, dense pooled before any normalisation N x D)."""
        dense = self.mlp2(x)
        return super().forward(x), dense.flatten(2), dense.mean(dim=(2, 3))


def dense_correspondence(q_b: torch.Tensor, k_b: torch.Tensor) -> torch.Tensor:
    """For each query location, the most similar key location (spec §2.8).

    q_b, k_b: N x C x S^2 backbone features, L2-normalised over C. Returns N x S^2 key indices.
    """
    similarity = torch.einsum("nci,ncj->nij", q_b, k_b)
    return similarity.max(dim=2).indices


class DenseCL(MoCoV2):
    """DenseCL: `forward` adds `loss_dense`, `acc_dense` and the `loss_lambda` in effect.

    `lambda_warmup_iters` keeps lambda at 0 for the first iterations (the official, optional
    `DenseCLWarmupHook`); the trainer sets `iteration` before each step, as the hook reads
    `runner.iter`.
    """

    def __init__(
        self,
        backbone: Backbone,
        dim: int = 128,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        bn_group_size: int = 0,
        loss_lambda: float = 0.5,
        lambda_warmup_iters: int = 0,
    ) -> None:
        super().__init__(backbone, dim, hidden_dim, queue_size, momentum, temperature, bn_group_size)
        self.loss_lambda = loss_lambda
        self.lambda_warmup_iters = lambda_warmup_iters
        self.iteration = 0
        self.register_queue("queue2", dim, queue_size)

    def make_head(self, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
        return DenseHead(in_dim, hidden_dim, out_dim)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> dict[str, torch.Tensor]:
        feat_q = self.encoder_q[0](im_q)["feature5"]
        q, q_grid, _ = self.encoder_q[1](feat_q)
        q, q_grid = F.normalize(q, dim=1), F.normalize(q_grid, dim=1)
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.momentum)
            k, k_grid, k2, k_b = self.keys(im_k)
            q_b = F.normalize(feat_q.flatten(2), dim=1)
            match = dense_correspondence(q_b, k_b)
            k_grid = k_grid.gather(2, match.unsqueeze(1).expand(-1, k_grid.shape[1], -1))

        loss_global, acc_global = info_nce(q, k, self.queue, self.temperature)
        # One row per (image, location), image-major: the official `view(-1)` order.
        dim = q_grid.shape[1]
        loss_dense, acc_dense = info_nce(
            q_grid.transpose(1, 2).reshape(-1, dim), k_grid.transpose(1, 2).reshape(-1, dim),
            self.queue2, self.temperature
        )
        lam = self.loss_lambda if self.iteration >= self.lambda_warmup_iters else 0.0
        loss = (1 - lam) * loss_global + lam * loss_dense

        dequeue_and_enqueue(self.queue, self.queue_ptr, k)
        dequeue_and_enqueue(self.queue2, self.queue2_ptr, k2)
        return {
            "loss": loss,
            "loss_global": loss_global.detach(),
            "loss_dense": loss_dense.detach(),
            "acc_global": acc_global,
            "acc_dense": acc_dense,
            "loss_lambda": torch.tensor(lam, device=loss.device),
        }

    def key_outputs(self, feat_k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k, k_grid, k2, k_b): global key, per-location dense keys, pooled dense key, backbone map."""
        k, k_grid, k2 = self.encoder_k[1](feat_k)
        return (
            F.normalize(k, dim=1),
            F.normalize(k_grid, dim=1),
            F.normalize(k2, dim=1),
            F.normalize(feat_k.flatten(2), dim=1),
        )
