"""Linear probes on a frozen backbone: one head per stage ("mhead", spec protocols.md §2.1) or a
single head on the pooled last stage ("avgpool", §2.3).

The backbone stays in eval mode with `requires_grad=False` for the whole run (the reference's
`frozen_stages=4` re-freezes it in every `train()` call), so its BN running statistics never
move; each batch goes through it once and the five heads share that forward.

Reproducible and resumable by construction: the epoch's sample order depends only on
(seed, epoch) and each sample's augmentation only on (seed, epoch, index), so a run restarted from
`<out>/linear_state.pt` at any iteration, with any number of loader workers, continues exactly as
if it had never stopped. The state is written atomically at the end of every epoch, every
`checkpoint_seconds`, and on SIGINT/SIGTERM (at the next iteration boundary).

Under torchrun the heads train with DDP on the same batches, each rank taking an even part of each (the
total batch and the LR stay the reference's); the heads' BN then normalises with the whole batch's
statistics, as the reference's SyncBN does (§2.1), and rank 0 alone writes the state.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms as T
from tqdm.auto import tqdm

from baselines.backbone import FEATURE_NAMES, Backbone
from baselines.config import ConfigError
from baselines.data import load_rgb
from baselines.distributed import Distributed
from baselines.infra import Interrupted, StopRequest, atomic_torch_save, derived_seed, seed_everything
from protocols.common import resolve_device, scale_milestones
from protocols.data_parallel import to_sync_batchnorm
from protocols.datasets.classification import (
    ClassificationSplit,
    LabeledImages,
    check_same_classes,
    dataset_info,
    default_splits,
    load_split,
)
from protocols.features import IMAGENET_MEAN, IMAGENET_STD, SVM_POOLS, batch_spans, svm_pool
from protocols.linear_protocols import (  # noqa: F401  (the declarations and settings, re-exported)
    LINEAR_IN1K,
    LINEAR_IN1K_MHEAD,
    LINEAR_PLACES205_MHEAD,
    RECIPES,
    SPEC_IMAGE_SIZE,
    LinearConfig,
    Recipe,
    measurements,
)
from protocols.result import ProtocolResult

STATE_FILE = "linear_state.pt"
STATE_VERSION = 1


# Fields that change the numbers: a resumed run must agree on all of them.
RESULT_FIELDS = ("variant", "probe_epochs", "milestones", "batch_size", "lr", "weight_decay", "momentum", "nesterov",
                 "image_size", "layers", "train_split", "test_split", "seed")


def lr_at(epoch: int, base_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Step schedule (mmcv `policy='step'`, torch MultiStepLR): x gamma at each milestone reached."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def resolve_config(cfg: LinearConfig, data: str | os.PathLike) -> tuple[LinearConfig, dict[str, Any]]:
    """Every `None` replaced by the recipe's value; also returns how lr and milestones were derived."""
    if cfg.variant not in RECIPES:
        raise ConfigError(f"unknown linear-probe variant {cfg.variant!r}: choose from {', '.join(RECIPES)}")
    recipe = RECIPES[cfg.variant]
    epochs = recipe.epochs if cfg.probe_epochs is None else int(cfg.probe_epochs)
    if epochs < 1 or cfg.batch_size < 1 or cfg.image_size < 32:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, image_size >= 32; "
                         f"got {epochs}, {cfg.batch_size}, {cfg.image_size}")
    layers = recipe.layers if cfg.layers is None else tuple(cfg.layers)
    if recipe.head == "avgpool" and layers != ("feature5",):
        raise ConfigError("the avgpool probe (§2.3) has a single head on feature5")
    unknown = [layer for layer in layers if layer not in FEATURE_NAMES]
    if unknown or not layers:
        raise ConfigError(f"unknown layers {unknown or list(layers)}: choose from {', '.join(FEATURE_NAMES)}")
    milestones = (scale_milestones(recipe.milestones, recipe.epochs, epochs) if cfg.milestones is None
                  else tuple(int(m) for m in cfg.milestones))
    base_lr = recipe.lr if cfg.lr is None else float(cfg.lr)
    lr = base_lr * cfg.batch_size / recipe.batch_size if cfg.scale_lr else base_lr
    default_train, default_test = default_splits(data)
    resolved = replace(
        cfg, probe_epochs=epochs, milestones=milestones, lr=lr, layers=layers, device=str(resolve_device(cfg.device)),
        weight_decay=recipe.weight_decay if cfg.weight_decay is None else float(cfg.weight_decay),
        nesterov=recipe.nesterov if cfg.nesterov is None else bool(cfg.nesterov),
        train_split=cfg.train_split or default_train, test_split=cfg.test_split or default_test,
    )
    derivation = {"base_lr": base_lr, "lr_scaled_by": cfg.batch_size / recipe.batch_size if cfg.scale_lr else 1.0,
                  "milestones_from": "given" if cfg.milestones is not None
                  else f"{list(recipe.milestones)} of {recipe.epochs} epochs, scaled to {epochs}",
                  "gamma": 0.1}
    return resolved, derivation


def spec_grid(layer: str, reduction: int) -> int:
    """Side of the §1.3 pooled map for a 224 input: 12, 6, 4, 3, 2 for feature1..feature5."""
    kernel, stride, padding = SVM_POOLS[layer]
    return (SPEC_IMAGE_SIZE // reduction + 2 * padding - kernel) // stride + 1


def stage_pool(layer: str, reduction: int, image_size: int) -> nn.Module:
    """§1.3's AvgPool2d at 224; at other sizes an adaptive pool to the same grid, so dims are unchanged."""
    if image_size == SPEC_IMAGE_SIZE:
        return svm_pool(layer)
    return nn.AdaptiveAvgPool2d(spec_grid(layer, reduction))


def linear_layer(in_features: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(in_features, num_classes)
    nn.init.normal_(fc.weight, 0.0, 0.01)  # §2.1 / §2.3: N(0, 0.01), bias 0
    nn.init.zeros_(fc.bias)
    return fc


def build_heads(backbone: Backbone, variant: str, num_classes: int, image_size: int = SPEC_IMAGE_SIZE,
                layers: Sequence[str] | None = None, ranks: Distributed | None = None) -> nn.ModuleDict:
    """One head per layer. mhead: pool -> BN(affine=False) on the pooled map -> flatten -> fc (§2.1).

    With `ranks` of a torchrun job every BN becomes SyncBN (`protocols.data_parallel`; the reference's heads use
    SyncBN, spec §2.1): statistics over the whole batch of 256, as one process's BatchNorm2d computes them.
    """
    heads = nn.ModuleDict()
    if variant not in RECIPES:
        raise ConfigError(f"unknown linear-probe variant {variant!r}: choose from {', '.join(RECIPES)}")
    if RECIPES[variant].head == "avgpool":
        channels = backbone.channels["feature5"]
        heads["feature5"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear_layer(channels, num_classes))
        return heads
    for layer in layers or FEATURE_NAMES:
        channels, grid = backbone.channels[layer], spec_grid(layer, backbone.reductions[layer])
        heads[layer] = nn.Sequential(
            stage_pool(layer, backbone.reductions[layer], image_size),
            nn.BatchNorm2d(channels, affine=False, momentum=0.1),
            nn.Flatten(),
            linear_layer(channels * grid * grid, num_classes),
        )
    if ranks is not None and ranks.world_size > 1:
        to_sync_batchnorm(heads, ranks.device.type)
    return heads


def head_dims(heads: nn.ModuleDict) -> dict[str, int]:
    return {layer: head[-1].in_features for layer, head in heads.items()}


class HeadsForward(nn.Module):
    """The heads as one module with one forward (backbone maps -> logits per head): what DDP wraps."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {layer: head(features[layer]) for layer, head in self.heads.items()}


class Lighting:
    """AlexNet PCA colour noise on a [0, 1] tensor: add eigvec @ (alpha * eigval), alpha ~ N(0, std) (§2.1)."""

    EIGVAL = (0.2175, 0.0188, 0.0045)
    EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

    def __init__(self, alphastd: float = 0.1) -> None:
        self.alphastd = alphastd
        self.eigval = torch.tensor(self.EIGVAL)
        self.eigvec = torch.tensor(self.EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd  # torch's RNG: reproduced by the per-sample seed
        shift = self.eigvec @ (alpha * self.eigval)
        return img + shift.view(3, 1, 1).to(img.dtype)

    def __repr__(self) -> str:
        return f"Lighting(alphastd={self.alphastd})"


def train_transform(variant: str, image_size: int = SPEC_IMAGE_SIZE) -> T.Compose:
    augment = RECIPES[variant].augment
    normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment == "places":  # §2.2: Resize(256) -> CenterCrop(256) -> RandomCrop(224) -> flip, no colour aug
        side = round(image_size * 256 / SPEC_IMAGE_SIZE)
        return T.Compose([T.Resize(side), T.CenterCrop(side), T.RandomCrop(image_size), T.RandomHorizontalFlip(),
                          *normalise])
    crop_flip = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    if augment == "crop-flip":  # §2.3: crop + flip only
        return T.Compose([*crop_flip, *normalise])
    return T.Compose([*crop_flip, T.ColorJitter(0.4, 0.4, 0.4, 0.0), T.ToTensor(), Lighting(0.1),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int = SPEC_IMAGE_SIZE) -> T.Compose:
    """Resize(256) + CenterCrop(224), the same 256:224 ratio at other sizes."""
    resize = round(image_size * 256 / SPEC_IMAGE_SIZE)
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class SeededImages(Dataset):
    """(image, label) for (epoch, index) keys, augmented under a torch seed of (seed, epoch, index)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: T.Compose, seed: int) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        path, label = self.samples[index]
        image = load_rgb(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            return self.transform(image), label


class EpochOrder(Sampler):
    """The epoch's (epoch, index) keys in an order fixed by (seed, epoch), from sample `start` on."""

    def __init__(self, num_samples: int, seed: int, epoch: int, start: int = 0) -> None:
        self.num_samples, self.seed, self.epoch, self.start = num_samples, seed, epoch, start

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        return ((self.epoch, index) for index in order[self.start :])


def global_batch_rows(num_samples: int, batch_size: int, iteration: int) -> int:
    """Images in batch `iteration` of an epoch (the last one may be short; none is dropped)."""
    return min(batch_size, num_samples - iteration * batch_size)


class RankBatches(Sampler):
    """This rank's part of every batch of the epoch's (seed, epoch) order, from batch `start` on.

    Batch b holds the same L keys at any number of ranks N; rank r takes keys [L*r//N, L*(r+1)//N), so the
    ranks together see exactly the one-process batch (N=1: the whole batch).
    """

    def __init__(self, order: EpochOrder, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.order, self.batch_size, self.rank, self.world_size, self.start = order, batch_size, rank, world_size, start

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = list(self.order)
        for first in range(self.start * self.batch_size, len(keys), self.batch_size):
            batch = keys[first : first + self.batch_size]
            rows = len(batch)
            yield batch[rows * self.rank // self.world_size : rows * (self.rank + 1) // self.world_size]


def check_ranks(cfg: LinearConfig, num_samples: int, world_size: int) -> None:
    """The total batch is the reference's at any number of ranks, so it must split evenly over them."""
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {world_size} ranks: the batch is the "
                          f"total over all ranks, so give a multiple of {world_size} or another --nproc_per_node")
    last = num_samples % cfg.batch_size
    if 0 < last < world_size:
        raise ConfigError(f"the last batch of each epoch ({last} of {num_samples} images) cannot give each of the "
                          f"{world_size} ranks an image: use another batch_size or number of ranks")


@dataclass
class TrainingState:
    """Where training stands; with the heads and optimizer it is all a resumed run needs."""

    epoch: int = 0  # completed epochs
    iteration: int = 0  # completed iterations of the current epoch
    loss_sums: dict[str, float] = field(default_factory=dict)  # current epoch, sample-weighted
    seen: int = 0  # samples of the current epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # per finished epoch: lr, mean loss per head
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> metrics


@contextlib.contextmanager
def frozen(backbone: nn.Module) -> Iterator[nn.Module]:
    """Backbone in eval mode without gradients for the block; the caller's flags come back afterwards."""
    was_training = backbone.training
    flags = {name: p.requires_grad for name, p in backbone.named_parameters()}
    backbone.eval().requires_grad_(False)
    try:
        yield backbone
    finally:
        for name, p in backbone.named_parameters():
            p.requires_grad_(flags[name])
        backbone.train(was_training)


def train_step(backbone: nn.Module, heads: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> dict[str, float]:
    """One shared backbone forward, one CE loss per head, their sum back-propagated (§2.1); the mean CE per head.

    `heads` maps the backbone's maps to logits per head (`HeadsForward`, DDP-wrapped under torchrun). `weight`
    (this rank's images x ranks / images in the global batch) makes DDP's mean of the ranks' gradients the
    gradient of the global batch's mean loss, also when the last batch splits unevenly; 1 in one process.
    """
    with torch.no_grad():
        features = backbone(images)
    losses = {layer: F.cross_entropy(logits, labels) for layer, logits in heads(features).items()}
    optimizer.zero_grad(set_to_none=True)
    (torch.stack(list(losses.values())).sum() * weight).backward()
    optimizer.step()
    return {layer: float(loss.detach()) for layer, loss in losses.items()}


@torch.no_grad()
def evaluate(backbone: nn.Module, heads: nn.ModuleDict, split: ClassificationSplit, cfg: LinearConfig,
             num_classes: int, progress: bool = True, ranks: Distributed | None = None) -> dict[str, float]:
    """Top-1/top-5 (x100) of every head on the centre-cropped split.

    Under torchrun (`ranks`) the one-process batches are dealt out in turn and the hit counts summed.
    """
    heads.eval()
    device = torch.device(cfg.device)
    rank, world = (ranks.rank, ranks.world_size) if ranks is not None else (0, 1)
    mine = [row for first, stop in batch_spans(0, len(split), cfg.batch_size)[rank::world]
            for row in range(first, stop)]
    images_of = LabeledImages(split.samples, eval_transform(cfg.image_size))
    loader = DataLoader(Subset(images_of, mine) if world > 1 else images_of, batch_size=cfg.batch_size,
                        shuffle=False, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    top1 = dict.fromkeys(heads, 0)
    top5 = dict.fromkeys(heads, 0)
    for images, labels, _ in tqdm(loader, desc=f"evaluate {split.name}", disable=not progress, dynamic_ncols=True):
        features = backbone(images.to(device, non_blocking=True))
        labels = labels.to(device)
        for layer, head in heads.items():
            best = head(features[layer]).topk(min(5, num_classes), dim=1).indices
            hits = best == labels[:, None]
            top1[layer] += int(hits[:, 0].sum())
            top5[layer] += int(hits.any(dim=1).sum())
    if world > 1:
        counts = ranks.all_sum(torch.tensor([*top1.values(), *top5.values()], dtype=torch.float64, device=device))
        top1 = dict(zip(heads, map(int, counts[: len(heads)].tolist()), strict=True))
        top5 = dict(zip(heads, map(int, counts[len(heads) :].tolist()), strict=True))
    metrics = {}
    for layer in heads:
        metrics[f"{layer}/top1"] = 100.0 * top1[layer] / len(split)
        metrics[f"{layer}/top5"] = 100.0 * top5[layer] / len(split)
    return metrics


def run_identity(cfg: LinearConfig, weights_key: str, train: ClassificationSplit, num_classes: int) -> dict[str, Any]:
    """What a saved state must match to be resumed: the result-changing config, weights and data."""
    values = asdict(cfg)
    identity = {name: values[name] for name in RESULT_FIELDS}
    identity.update(milestones=list(cfg.milestones), layers=list(cfg.layers), weights=weights_key,
                    train_data=train.fingerprint(), num_classes=num_classes)
    return identity


def save_state(path: Path, identity: dict[str, Any], heads: nn.ModuleDict, optimizer: torch.optim.Optimizer,
               state: TrainingState) -> None:
    atomic_torch_save({"version": STATE_VERSION, "identity": identity, "heads": heads.state_dict(),
                 "optimizer": optimizer.state_dict(), "state": asdict(state)}, path)


def load_state(path: Path, identity: dict[str, Any], heads: nn.ModuleDict,
               optimizer: torch.optim.Optimizer) -> TrainingState:
    """The probe state saved at `path`, checked to belong to this run; a damaged or foreign file is one line."""
    from baselines.infra import load_torch_file

    fix = "delete it to start the probe afresh, or give another --work-dir"
    saved = load_torch_file(path, "linear-probe state", fix)
    version = saved.get("version") if isinstance(saved, dict) else None
    if version != STATE_VERSION:
        raise ConfigError(f"{path} is not a linear-probe state of version {STATE_VERSION} (found "
                          f"{type(saved).__name__ if version is None else f'version {version}'}); {fix}")
    differs = sorted(key for key in identity if saved["identity"].get(key) != identity[key])
    if differs:
        raise ConfigError(f"{path} belongs to a run with another {', '.join(differs)}: give another --work-dir")
    try:
        heads.load_state_dict(saved["heads"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainingState(**saved["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{path} does not fit this probe ({str(err).strip().splitlines()[0]}); {fix}") from None
    state.evaluations = {int(epoch): metrics for epoch, metrics in state.evaluations.items()}
    return state


def _sum_over_ranks(ranks: Distributed, loss_sums: dict[str, float], stop: bool, save: bool,
                    device: torch.device) -> tuple[dict[str, float], bool, bool]:
    """The batch's loss sums over every rank, whether any rank was asked to stop, and whether rank 0 saves now:
    the ranks take the same decisions at the same iteration (a no-op in one process)."""
    values = ranks.all_sum(torch.tensor([*loss_sums.values(), float(stop), float(save)], dtype=torch.float64,
                                        device=device)).tolist()
    return dict(zip(loss_sums, values[:-2], strict=True)), values[-2] > 0, values[-1] > 0


def train_epoch(backbone: nn.Module, heads: nn.Module, optimizer: torch.optim.Optimizer,
                data: SeededImages, state: TrainingState, cfg: LinearConfig, checkpoint: Any,
                stop: StopRequest, progress: bool = True, ranks: Distributed | None = None) -> bool:
    """Train from `state.iteration` to the end of `state.epoch`; False when a stop was requested.

    `heads` is the `HeadsForward` (DDP-wrapped under torchrun, where each rank takes its part of every batch).
    """
    ranks = ranks or Distributed(cfg.device)
    device = torch.device(cfg.device)
    batches = RankBatches(EpochOrder(len(data), cfg.seed, state.epoch), cfg.batch_size, ranks.rank, ranks.world_size,
                          start=state.iteration)
    loader = DataLoader(data, batch_sampler=batches, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(derived_seed(cfg.seed, state.epoch)))
    heads.train()
    last_save = time.monotonic()
    bar = tqdm(total=math.ceil(len(data) / cfg.batch_size), initial=state.iteration,
               desc=f"linear epoch {state.epoch + 1}/{cfg.probe_epochs}", disable=not progress, dynamic_ncols=True)
    try:
        for images, labels in loader:
            rows = global_batch_rows(len(data), cfg.batch_size, state.iteration)
            losses = train_step(backbone, heads, optimizer, images.to(device, non_blocking=True), labels.to(device),
                                weight=len(labels) * ranks.world_size / rows)
            save_due = ranks.is_main and time.monotonic() - last_save > cfg.checkpoint_seconds
            sums, stopping, saving = _sum_over_ranks(
                ranks, {layer: loss * len(labels) for layer, loss in losses.items()}, stop.requested, save_due, device)
            for layer, total in sums.items():
                state.loss_sums[layer] = state.loss_sums.get(layer, 0.0) + total
            state.seen += rows
            state.iteration += 1
            bar.update()
            bar.set_postfix(loss=f"{sum(sums.values()) / len(sums) / rows:.3f}")
            if stopping:
                checkpoint()
                return False
            if saving:
                checkpoint()
                last_save = time.monotonic()
    finally:
        bar.close()
    return True


def run(subject, data: str | os.PathLike, cfg: LinearConfig, *, work_dir: str | os.PathLike | None = None,
        progress: bool = True) -> ProtocolResult:
    """Train the heads on `train_split` and report top-1/top-5 per head on `test_split`.

    With `work_dir`, the run resumes from `<work_dir>/linear_state.pt` when one with the same config exists,
    and an interrupted run (SIGINT/SIGTERM) saves its state there first.

    Under torchrun the heads train with DDP: `batch_size` stays the total over the ranks (each takes its part of
    the same (seed, epoch) batches), the LR is unchanged and the heads' BN sees the global batch (the reference's
    SyncBN); rank 0 alone writes the state, and a run resumes at any number of ranks.
    """
    backbone = subject.backbone
    cfg, derivation = resolve_config(cfg, data)
    train = load_split(data, cfg.train_split)
    test = load_split(data, cfg.test_split)
    check_same_classes(train, test)
    num_classes = len(train.classes)
    ranks = Distributed(cfg.device)
    check_ranks(cfg, len(train), ranks.world_size)
    identity = run_identity(cfg, subject.cache_id, train, num_classes)
    device = torch.device(cfg.device)
    seed_everything(cfg.seed)
    heads = build_heads(backbone, cfg.variant, num_classes, cfg.image_size, cfg.layers, ranks).to(device)
    optimizer = torch.optim.SGD(heads.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    state_path = Path(work_dir) / STATE_FILE if work_dir is not None else None
    state = TrainingState()
    resumed_from = None
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        if state_path.exists():
            state = load_state(state_path, identity, heads, optimizer)
            resumed_from = {"epoch": state.epoch, "iteration": state.iteration}

    def checkpoint_now() -> None:
        if state_path is not None:
            if ranks.is_main:
                save_state(state_path, identity, heads, optimizer, state)
            ranks.barrier()  # no rank exits (on a stop) before the state is on disk

    net: nn.Module = HeadsForward(heads)
    if ranks.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[ranks.device.index] if device.type == "cuda" else None)
    train_data = SeededImages(train.samples, train_transform(cfg.variant, cfg.image_size), cfg.seed)
    start = time.perf_counter()
    with frozen(backbone.to(device)):
        while state.epoch < cfg.probe_epochs:
            lr = lr_at(state.epoch, cfg.lr, cfg.milestones)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with StopRequest() as stop:  # evaluations keep the default handlers: Ctrl-C stops them at once
                finished = train_epoch(backbone, net, optimizer, train_data, state, cfg, checkpoint_now, stop,
                                       progress, ranks)
            if not finished:
                saved = f"; state saved to {state_path}" if state_path else ""
                raise Interrupted(f"linear probe stopped by signal {stop.signal} at epoch {state.epoch} "
                                  f"iteration {state.iteration}{saved}; run the same command to resume")
            state.history.append({"epoch": state.epoch + 1, "lr": lr,
                                  "loss": {layer: s / state.seen for layer, s in state.loss_sums.items()}})
            state.epoch, state.iteration, state.loss_sums, state.seen = state.epoch + 1, 0, {}, 0
            if cfg.eval_every and state.epoch % cfg.eval_every == 0 and state.epoch < cfg.probe_epochs:
                state.evaluations[state.epoch] = evaluate(backbone, heads, test, cfg, num_classes, progress, ranks)
            checkpoint_now()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        metrics = evaluate(backbone, heads, test, cfg, num_classes, progress, ranks)
        eval_seconds = time.perf_counter() - start
    best = max(heads, key=lambda layer: metrics[f"{layer}/top1"])
    metrics["best/top1"] = metrics[f"{best}/top1"]
    config = {**asdict(cfg), **derivation, "arch": backbone.name, "num_classes": num_classes,
              "pooling": "§1.3 AvgPool2d" if cfg.image_size == SPEC_IMAGE_SIZE else "adaptive to the §1.3 grid",
              "train_transform": repr(train_transform(cfg.variant, cfg.image_size)),
              "eval_transform": repr(eval_transform(cfg.image_size))}
    return ProtocolResult(
        protocol=PROTOCOL_OF_VARIANT[cfg.variant], metrics=metrics, config=config,
        dataset=dataset_info(data, [train, test]), checkpoint=subject.info,
        timings={"train": train_seconds, "evaluate": eval_seconds},
        details={"best_layer": best, "head_dims": head_dims(heads), "history": state.history,
                 "evaluations": state.evaluations, "resumed_from": resumed_from,
                 "state_file": str(state_path) if state_path else None},
    )


PROTOCOL_OF_VARIANT = {"avgpool": "linear_in1k", "mhead": "linear_in1k_mhead", "places205": "linear_places205_mhead"}
