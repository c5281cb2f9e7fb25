"""One process group for every job under torchrun: pretraining, feature extraction, kNN and the linear probe.

Read from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); nccl on CUDA, gloo on CPU. A single process
(no torchrun) gets world size 1 and every collective below is a no-op, so callers never branch on it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from baselines.infra import UserError


class RankMismatch(UserError):
    """The ranks of one torchrun job disagree on an input (a checkpoint, a dataset, a setting)."""


class TorchrunError(UserError, ValueError):
    """A setting or a command that cannot work under torchrun (e.g. one GPU index for every rank); one line."""


class Distributed:
    """Process-group set-up from torchrun's environment (nccl on CUDA, gloo on CPU)."""

    def __init__(self, device_name: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        if device_name == "cuda":  # torch.cuda.set_device refuses a device without an index
            device_name = f"cuda:{local_rank}"
        elif self.world_size > 1 and device_name.startswith("cuda:") and device_name != f"cuda:{local_rank}":
            raise TorchrunError(f"device {device_name} under torchrun: every rank would share one GPU; give cuda "
                               f"or auto, and each rank takes cuda:LOCAL_RANK (cuda:{local_rank} here)")
        self.device = torch.device(device_name)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over the ranks, on every rank (in place; on the group's device)."""
        if self.world_size > 1:
            dist.all_reduce(values)
        return values

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = self.all_sum(values) / self.world_size
        return values

    def broadcast_object(self, value: object) -> object:
        """Rank 0's `value` on every rank: what rank 0 decided (from files only it writes) holds everywhere."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value: object) -> list[object] | None:
        """Every rank's `value` in rank order on rank 0 (None on the others): for results only rank 0 writes."""
        if self.world_size == 1:
            return [value]
        gathered: list[object] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def all_gather_object(self, value: object) -> list[object]:
        """Every rank's `value`, in rank order (a list of one without torchrun)."""
        if self.world_size == 1:
            return [value]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def check_same(self, value: object, what: str) -> None:
        """Stop every rank, in one line, unless all ranks hold the same `value` (e.g. a checkpoint's sha256)."""
        seen = self.all_gather_object(value)
        if any(other != seen[0] for other in seen[1:]):
            shown = ", ".join(f"rank {rank}: {other}" for rank, other in enumerate(seen))
            raise RankMismatch(f"the ranks of this torchrun job see different {what} ({shown}); "
                               "give every rank the same files (a shared filesystem)")

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
