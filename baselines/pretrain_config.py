"""The pretraining settings, kept apart from the trainer so that `pretrain --help` and the pipelines' configs
load without torch (issue 14: `--help` in under a second)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from baselines import config as configs
from baselines.backbone_names import CONV_INITS
from baselines.config import option
from baselines.methods import METHODS

PAPER_GRID = 7  # DenseCL's S: 7x7 res5 locations at 224 px (spec pretraining.md §2.3; CVPR Table 7)


@dataclass
class PretrainConfig:
    """Defaults are the official DenseCL ImageNet-200ep recipe (spec §3); presets hold the others."""

    method: str = option("densecl", "pretraining method", choices=tuple(METHODS))
    arch: str = option("resnet50", "timm CNN with five reductions (resnet18, resnet50, ...)")
    data: str = option("", "image folder (read recursively) or list file of '<path> [label]' lines")
    data_root: str = option("", "root of the relative paths in a list file (default: its folder)")
    out: str = option("", "output folder: checkpoints/, log.jsonl, config.yaml, backbone.pth")
    image_size: int = option(224, "crop size of both views")
    epochs: int = option(200, "training epochs")
    batch_size: int = option(256, "global batch over all processes (official: 8 GPUs x 32)")
    lr: float = option(0.03, "base learning rate (official: 0.03 ImageNet, 0.3 COCO, for batch 256)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "weight decay on every parameter, BN and biases included")
    queue_size: int = option(65536, "K, negatives per queue; must be divisible by the batch size")
    moco_momentum: float = option(0.999, "m of the key-encoder update, constant")
    temperature: float = option(0.2, "tau of both InfoNCE losses")
    dim: int = option(128, "projection dimension D")
    hidden_dim: int = option(0, "hidden width of the heads (0: the backbone's channels, 2048 for resnet50)")
    loss_lambda: float = option(0.5, "DenseCL: weight of the dense loss, total = (1-l)*global + l*dense")
    lambda_warmup_iters: int = option(0, "DenseCL: lambda = 0 for the first N iterations (official hook, off)")
    bn_group_size: int = option(0, "ghost BN: BN statistics per group of G images, keys shuffled across groups "
                                "(0: off; 32 emulates 8x32 GPUs)")
    conv_init: str = option("openselfsup", "backbone init: openselfsup (kaiming fan_in) or timm", choices=CONV_INITS)
    output_stride: int = option(32, "32 (the official ResNet) or 16: the last stage dilated instead of strided, so "
                                "small-scale runs get the paper's 7x7 dense grid at 112 px; the saved weights are "
                                "the same tensors and evaluate as a standard ResNet", choices=(16, 32))
    require_paper_grid: bool = option(False, "refuse a DenseCL run whose dense grid (image_size / output_stride) is "
                                      "below the paper's 7x7 (spec pretraining.md §2.3)")
    workers: int = option(4, "data-loading worker processes per training process")
    seed: int = option(0, "seeds python, numpy, torch, and every sample's augmentation")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: str = option("none", "autocast dtype: none or bf16 (losses stay float32)", choices=("none", "bf16"))
    channels_last: bool = option(False, "channels_last memory format")
    deterministic: bool = option(False, "deterministic cuDNN kernels (slower on GPU)")
    save_every: int = option(10, "write a kept checkpoint every N epochs (and always at the end)")
    save_every_iters: int = option(0, "also refresh checkpoints/last.pth every N iterations (0: off)")
    log_every: int = option(10, "iterations per JSONL log record")
    resume: str = option("", "'auto' (out/checkpoints/last.pth if present) or a checkpoint path")
    epoch_order: str = option(
        "shuffle", "shuffle (official), or halves: two fixed halves visited in turn, each shuffled per epoch, so "
        "a queue of K <= N/2 - B never holds an image's own old key on a small dataset", choices=("shuffle", "halves"))
    skip_bad_images: bool = option(False, "replace unreadable images by the next readable one and count them")
    progress: bool = option(True, "tqdm progress bar on the main process")

    def validate(self, world_size: int = 1) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.batch_size <= 0 or self.batch_size % world_size:
            problems.append(f"batch_size {self.batch_size} must be a positive multiple of the {world_size} processes")
        elif self.queue_size % self.batch_size:
            problems.append(f"queue_size {self.queue_size} is not divisible by batch_size {self.batch_size} "
                            "(spec §2.6)")
        if self.bn_group_size and (self.batch_size // world_size) % self.bn_group_size:
            problems.append(f"per-process batch {self.batch_size // world_size} does not split into ghost-BN groups "
                            f"of {self.bn_group_size}")
        for name in ("epochs", "image_size", "dim", "queue_size", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, got {value}"
                                + ("; a run at lr 0 cannot learn" if name == "lr" and value == 0 else ""))
        for name in ("momentum", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.moco_momentum) and 0 <= self.moco_momentum < 1):
            problems.append(f"moco_momentum must lie in [0, 1), got {self.moco_momentum}")
        device_problem = _device_problem(self.device)
        if device_problem:
            problems.append(device_problem)
        grid = self.image_size // self.output_stride
        if self.require_paper_grid and self.method == "densecl" and grid < PAPER_GRID:
            problems.append(f"the dense grid is {grid}x{grid} (image_size {self.image_size} / output_stride "
                            f"{self.output_stride}), below the paper's {PAPER_GRID}x{PAPER_GRID}: use image_size >= "
                            f"{PAPER_GRID * self.output_stride} or output_stride 16")
        if not (math.isfinite(self.loss_lambda) and 0.0 <= self.loss_lambda <= 1.0):
            problems.append(f"loss_lambda must lie in [0, 1], got {self.loss_lambda}")
        if not self.data:
            problems.append("no pretraining data given (data)")
        if not self.out:
            problems.append("no output folder given (out)")
        if problems:
            raise configs.ConfigError("; ".join(problems))


# Settings that may differ when a run is resumed; everything else must match the checkpoint.
RUNTIME_FIELDS = {"data", "data_root", "out", "workers", "device", "save_every", "save_every_iters", "log_every",
                  "resume", "skip_bad_images", "progress", "require_paper_grid"}


def _device_problem(name: str) -> str | None:
    """What is wrong with `--device` on this machine, before any work (torch's own errors name no setting)."""
    if name == "auto":
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"device {name}: CUDA is not available on this machine; use --device cpu (or auto)"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 or cuda"
    if device.type not in ("cpu", "cuda"):
        return f"device {name}: pretraining runs on cpu or cuda"
    return None
