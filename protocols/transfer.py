"""What the detection and segmentation protocols share: fine-tuning a pretrained backbone inside an
OpenMMLab model, with the parts users get wrong made loud.

- `require_mm_stack`: the core package works without mmcv/mmdet/mmseg; the dense commands say
  exactly how to install them.
- `transfer_backbone_weights`: every backbone key of the checkpoint must land in the model and every
  backbone parameter of the model must come from the checkpoint (the authors' fork loads with
  `strict=False` and no logging, spec protocols.md §4.4 "Weight loading is silent").
- `Schedule` + `train`: a plain SGD loop (linear warm-up, then step or poly decay as mmdet/mmseg
  schedules define them), checkpointed every few iterations so an interrupted run resumes.
- `deviations`: how a run differs from the reference protocol (batch, LR, iterations, sizes, norm),
  written into every result and warned about: most reproduction gaps users report come from these.

torch and tqdm are imported by the functions that train, so the protocol declarations built on this
module (settings, presets) stay importable without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from baselines.config import ConfigError, option
from baselines.infra import Interrupted, StopRequest, UserError, atomic_torch_save, derived_seed, seed_everything

if TYPE_CHECKING:
    import torch
    from torch import nn

    from baselines.distributed import Distributed

MODES = ("finetune", "frozen")
PRESETS = ("reference", "small")


@dataclass
class TransferSettings:
    """What every dense protocol's config has; DetectionConfig and SegmentationConfig add their task's settings."""

    mode: str = option("finetune", "finetune: nothing frozen (the paper); frozen: backbone stages fixed, BN in eval "
                       "(the journal; for C4 the res5 RoI head trains)", choices=MODES)
    seed: int = option(0, "seeds the data order, augmentation and new layers")
    save_every: int = option(50, "iterations between resumable state saves")
    workers: int = option(2, "data-loading processes")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    preset: str = option("reference", "reference: the published protocol; small: CPU scale (the default on the "
                         "synthetic data)", choices=PRESETS)
INSTALL_HINT = ("install the OpenMMLab stack: `pip install -e '.[dense]'` then "
                "`python scripts/install_mm_stack.py` (builds and caches mmcv 2.1.0 with its ops; "
                "README 'Dense protocols')")
RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


class MMStackMissing(UserError, RuntimeError):
    """mmcv (with compiled ops), mmdet or mmsegmentation is not importable."""


class WeightTransferError(UserError, RuntimeError):
    """The checkpoint's backbone does not fit the model exactly; the message lists the keys."""


class DivergedError(UserError, FloatingPointError):
    """The training loss became non-finite; the message names the iteration and what to lower."""


def require_mm_stack(package: str) -> None:
    """Import mmcv's compiled ops and `package` (mmdet or mmseg), or fail with the install command."""
    try:
        import mmcv  # noqa: F401
        from mmcv.ops import nms  # noqa: F401  (mmcv-lite lacks the compiled ops)
    except ImportError as err:
        raise MMStackMissing(f"the dense protocols need mmcv 2.1.0 with compiled ops ({err}); {INSTALL_HINT}") from None
    try:
        __import__(package)
    except ImportError as err:
        raise MMStackMissing(f"the dense protocols need {package} ({err}); {INSTALL_HINT}") from None


def quiet_mm_logging() -> None:
    """Make a WARNING-level MMLogger the current one: mmdet/mmseg print init and metric tables at INFO."""
    from mmengine.logging import MMLogger

    if not MMLogger.check_instance_created("densecl-bench"):
        MMLogger.get_instance("densecl-bench", log_level="WARNING")


def use_mm_scope(scope: str) -> None:
    """Make `scope` (mmdet or mmseg) the default registry scope without mmengine's switch warning."""
    from mmengine.registry import DefaultScope

    current = DefaultScope.get_current_instance()
    if current is None or current.scope_name != scope:
        DefaultScope.get_instance(f"densecl-bench-{scope}-{time.monotonic_ns()}", scope_name=scope)


def resnet_depth(arch: str) -> int:
    """The mmdet/mmseg `ResNet(depth=...)` equal to our torchvision-style ResNet `arch`."""
    if arch not in RESNET_DEPTHS:
        raise WeightTransferError(f"the dense protocols take a torchvision-style ResNet ({', '.join(RESNET_DEPTHS)}); "
                         f"the checkpoint is a {arch}")
    return RESNET_DEPTHS[arch]


def transfer_backbone_weights(model: nn.Module, backbone_state: Mapping[str, torch.Tensor],
                              place: Callable[[str], str], owned: tuple[str, ...]) -> dict[str, Any]:
    """Copy a torchvision-keyed backbone state into `model`, strictly, and say what was loaded.

    `place` maps a backbone key (`layer4.0.conv1.weight`) to its model key (`backbone.layer4...` or,
    for C4, `roi_head.shared_head.layer4...`). `owned` are the model prefixes the backbone must fill
    completely; a model key under them that the checkpoint does not provide is an error, except the
    norm layers the protocol adds (they are listed by the caller as prefixes outside `owned`).
    """
    model_state = model.state_dict()
    placed = {place(key): value for key, value in backbone_state.items()}
    nowhere = sorted(k for k in placed if k not in model_state)
    if nowhere:
        raise WeightTransferError(f"{len(nowhere)} checkpoint key(s) have no place in the model, e.g. {nowhere[:4]}: "
                                  "is the checkpoint a different architecture than --arch?")
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
              for k, v in placed.items() if tuple(v.shape) != tuple(model_state[k].shape)]
    if shapes:
        raise WeightTransferError(f"{len(shapes)} backbone tensor(s) differ in shape, e.g. {shapes[:3]}")
    expected = [k for k in model_state if k.startswith(owned)]
    missing = sorted(k for k in expected if k not in placed)
    if missing:
        raise WeightTransferError(f"{len(missing)} backbone key(s) of the model are not in the checkpoint, "
                                  f"e.g. {missing[:4]}: the run would train them from random init")
    model.load_state_dict(placed, strict=False)  # strict about the backbone above; the heads keep their init
    return {"loaded_tensors": len(placed), "into": sorted({".".join(k.split(".")[:2]) for k in placed}),
            "model_backbone_tensors": len(expected)}


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Top-level module paths (two levels deep) whose parameters train / stay frozen, for the record."""
    trained: set[str] = set()
    frozen: set[str] = set()
    for name, param in model.named_parameters():
        group = ".".join(name.split(".")[:2]) if name.split(".")[0] in ("backbone", "roi_head") else name.split(".")[0]
        (trained if param.requires_grad else frozen).add(group)
    return {"trained": sorted(trained), "frozen": sorted(frozen - trained), "partly_frozen": sorted(frozen & trained)}


def batchnorm_in_eval(module: nn.Module) -> bool:
    from torch import nn

    return all(not m.training for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@dataclass(frozen=True)
class Schedule:
    """SGD with linear warm-up (factor `warmup_ratio` -> 1) then step decay or poly decay, per iteration."""

    iterations: int
    lr: float
    weight_decay: float
    momentum: float = 0.9
    warmup_iters: int = 0
    warmup_ratio: float = 1e-3
    policy: str = "step"  # "step" (mmdet MultiStepLR) or "poly" (mmseg PolyLR)
    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 0.9
    min_lr: float = 1e-4

    def lr_at(self, iteration: int) -> float:
        if self.policy == "step":
            lr = self.lr * self.gamma ** sum(iteration >= s for s in self.steps)
        elif self.policy == "poly":
            lr = (self.lr - self.min_lr) * (1 - iteration / self.iterations) ** self.power + self.min_lr
        else:
            raise ValueError(f"unknown LR policy {self.policy!r}")
        if iteration < self.warmup_iters:
            lr *= self.warmup_ratio + (1 - self.warmup_ratio) * iteration / self.warmup_iters
        return lr


def make_task_config(config_class, reference: Mapping[str, Any], small: Mapping[str, dict[str, Any]], task: str,
                     preset: str, overrides: Mapping[str, Any]):
    """`reference[task]`, scaled down by the `small` preset, then `overrides` (None values ignored), validated."""
    if task not in reference:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(reference)}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dataclasses.asdict(reference[task])
    if preset == "small":
        values.update(small[task])
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    cfg = config_class(**values)
    cfg.validate()
    return cfg


class ProtocolDeviation(UserWarning):
    """A setting of this run that differs from the reference protocol (also recorded in the result)."""


def deviations(actual: Mapping[str, Any], reference: Mapping[str, Any], label: str) -> list[str]:
    """One line per setting where this run differs from the reference protocol; each is also warned."""
    lines = [f"{key}: {actual.get(key)!r} here, {ref!r} in {label}" for key, ref in reference.items()
             if actual.get(key) != ref]
    for line in lines:
        warnings.warn(line, ProtocolDeviation, stacklevel=3)
    return lines


def config_digest(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def infinite_batches(size: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
    """Batches of (iteration, index) over a reshuffled-per-epoch order; batch i depends only on (seed, i)."""
    if size < batch_size:
        raise ConfigError(f"the training set has {size} images, fewer than one batch of {batch_size}")
    per_epoch = size // batch_size
    iteration = start
    while True:
        epoch, within = divmod(iteration, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(size)
        yield [(iteration, int(i)) for i in order[within * batch_size:(within + 1) * batch_size]]
        iteration += 1


class SeededSamples:
    """Seeds python/numpy/torch from (seed, iteration, index) before each sample's random transforms,
    so an interrupted run resumes with exactly the augmentation it would have had, with any workers."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        iteration, index = key
        seed_everything(derived_seed(self.seed, iteration, index))
        return self.dataset[index]


def train(model: nn.Module, dataset, collate: Callable, schedule: Schedule, batch_size: int, seed: int,
          state_path: Path, digest: str, *, ranks: Distributed, save_every: int = 50, workers: int = 0,
          progress: bool = True, desc: str = "fine-tune") -> dict[str, Any]:
    """Train `model` (an mmengine BaseModel: data_preprocessor + `loss`) for `schedule.iterations`.

    `batch_size` is the total over the torchrun ranks: each rank trains on its share of every global batch
    under DDP, and logs the loss averaged over them (one process's loss over the whole batch). State (model,
    optimizer, iteration, loss log) is saved atomically by rank 0 every `save_every` iterations and at the
    end; a second call with the same `digest` resumes from it (a finished run returns at once). Returns
    {"losses": [[iteration, total], ...], "seconds": ..., "resumed_from": ..., "images": this rank's, this call,
    "samples_checksum": this rank's `data_parallel.samples_checksum` over every iteration, resumed ones included}.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from protocols.data_parallel import combined_checksum, rank_share, samples_checksum

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    start, losses, seconds, checksum = 0, [], 0.0, 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("digest") != digest:
            raise ConfigError(f"{state_path} belongs to a different run configuration; remove it or choose another "
                              "--work-dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses, seconds = state["iteration"], state["losses"], state["seconds"]
        checksum = state.get("samples_checksum")  # None: saved before the checksum was kept
    resumed_from = start
    state_path.parent.mkdir(parents=True, exist_ok=True)
    if start >= schedule.iterations:
        return {"losses": losses, "seconds": seconds, "resumed_from": resumed_from, "images": 0,
                "samples_checksum": checksum}
    batches = rank_share(infinite_batches(len(dataset), batch_size, seed, start), ranks.rank, ranks.world_size)
    loader = torch.utils.data.DataLoader(SeededSamples(dataset, seed), batch_sampler=batches, collate_fn=collate,
                                         num_workers=workers)
    # Frozen parameters (requires_grad False) are not DDP's: it averages the gradients of the trained ones only.
    net = model if ranks.world_size == 1 else DistributedDataParallel(
        model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)

    def save(iteration: int) -> None:
        if ranks.is_main:
            atomic_torch_save({"digest": digest, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "iteration": iteration, "losses": losses, "seconds": seconds,
                               "samples_checksum": checksum}, state_path)

    model.train()
    bar = tqdm(total=schedule.iterations, initial=start, desc=desc, unit="it", disable=not (progress and ranks.is_main),
               mininterval=2.0, file=sys.stderr)
    batches, images = iter(loader), 0
    with StopRequest() as stop:
        for iteration in range(start, schedule.iterations):
            tic = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(iteration)
            batch = next(batches)
            # RoI sampling, dropout: a function of the iteration, the same seed on every rank (mmengine's default)
            seed_everything(derived_seed(seed, iteration, 2**31))
            data = model.data_preprocessor(batch, training=True)
            images += len(data["data_samples"])
            loss_terms = net(**data, mode="loss")
            loss, log = model.parse_losses(loss_terms)
            total = ranks.all_mean(loss.detach().clone()).item()  # every rank sees a divergence at the same iteration
            if not math.isfinite(total):
                save(iteration)
                raise DivergedError(f"{desc}: loss is {total} at iteration {iteration} "
                                         f"({', '.join(f'{k}={float(v):.3g}' for k, v in log.items())}); lower the LR")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if checksum is not None:  # after the step: a diverged iteration, saved undone, is not counted
                checksum = combined_checksum([checksum, samples_checksum(iteration, data["data_samples"])])
            losses.append([iteration, round(total, 5)])
            seconds += time.perf_counter() - tic
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", refresh=False)
            stopping = _any_rank(ranks, stop.requested)
            if (iteration + 1) % save_every == 0 or iteration + 1 == schedule.iterations or stopping:
                save(iteration + 1)
            if stopping:
                bar.close()
                raise Interrupted(f"{desc}: interrupted after iteration {iteration + 1}; the state is in {state_path}: "
                                  "run the same command to resume")
    bar.close()
    return {"losses": losses, "seconds": seconds, "resumed_from": resumed_from, "images": images,
            "samples_checksum": checksum}


def _any_rank(ranks: Distributed, flag: bool) -> bool:
    """True on every rank when it is true on any (a SIGTERM that reached one rank stops all at one iteration)."""
    import torch

    if ranks.world_size == 1:
        return flag
    return ranks.all_mean(torch.tensor([float(flag)], device=ranks.device)).item() > 0


def _thin(losses: list[list[float]], keep: int = 200) -> list[list[float]]:
    """At most `keep` evenly spaced points of the loss curve (plus the last), for the result file."""
    step = max(1, len(losses) // keep)
    thinned = losses[::step]
    if losses and thinned[-1] != losses[-1]:
        thinned.append(losses[-1])
    return thinned


def fine_tune_and_test(*, protocol: str, subject, cfg: dict[str, Any], settings: dict[str, Any],
                       reference: dict[str, Any], reference_label: str, build_model: Callable[[], nn.Module],
                       model_cfg: dict[str, Any], place: Callable[[str], str], owned: tuple[str, ...], train_set,
                       collate: Callable, schedule: Schedule, batch_size: int,
                       evaluate: Callable[[nn.Module, Distributed], dict[str, float]], dataset_info: dict[str, Any],
                       work_dir: Path, device: str, seed: int, workers: int, save_every: int, progress: bool,
                       frozen: bool, frozen_note: str):
    """The shared body of both dense protocols: build, load loudly, check freezing, train (resumable), test.

    Under torchrun every rank runs it: the ranks first agree on the checkpoint and the run's settings, train
    their shares of each batch under DDP with SyncBN, test their shares of the images, and all return the
    same result (the caller stores rank 0's). `evaluate(model, ranks)` returns the metrics on every rank.
    """
    from protocols import data_parallel
    from protocols.result import ProtocolResult

    started = time.perf_counter()
    ranks = _ranks(device, batch_size)
    if ranks.world_size > 1:
        settings = {**settings, "norm": "SyncBN"}  # over all ranks' images, as the reference
    with warnings.catch_warnings():
        if not ranks.is_main:  # one copy of each deviation line, not one per rank
            warnings.simplefilter("ignore", ProtocolDeviation)
        noted = deviations(settings, reference, reference_label)
    ranks.check_same(subject.info.get("sha256") or subject.cache_id, "checkpoints (sha256)")
    seed_everything(seed)
    model = build_model()
    weights = transfer_backbone_weights(model, subject.backbone.state_dict(), place, owned)
    parallel = data_parallel.for_ranks(model, ranks)
    model.to(ranks.device)
    model.train()
    groups = parameter_groups(model)
    backbone = model.backbone
    if frozen and (any(p.requires_grad for p in backbone.parameters()) or not batchnorm_in_eval(backbone)):
        raise RuntimeError("frozen mode left backbone parameters trainable or BN in train mode")
    if not frozen and groups["frozen"]:
        raise RuntimeError(f"fine-tune mode froze {groups['frozen']}")
    runtime = ("workers", "device", "save_every")
    digest_values = {"protocol": protocol, "cfg": {k: v for k, v in cfg.items() if k not in runtime},
                     "weights": subject.cache_id, "data": dataset_info}
    digest = config_digest(digest_values)
    ranks.check_same(digest, "settings or data (run digest)")
    build_seconds = time.perf_counter() - started
    log = train(model, train_set, collate, schedule, batch_size, seed, Path(work_dir) / "state.pt", digest,
                ranks=ranks, save_every=save_every, workers=workers, progress=progress, desc=protocol)
    checksums = ranks.all_gather_object(log["samples_checksum"])
    trained = None if None in checksums else f"{data_parallel.combined_checksum(checksums):016x}"
    if ranks.world_size > 1:
        ranks.check_same(_weights_digest(model), "trained weights")  # what rank 0 saved is what every rank tests
        parallel.update(per_rank_batch=batch_size // ranks.world_size,
                        images_trained_per_rank=ranks.all_gather_object(log["images"]),
                        evaluation="test images sharded over the ranks (rank r: r, r+N, ...), scored in image order")
    tic = time.perf_counter()
    metrics = evaluate(model, ranks)
    test_seconds = time.perf_counter() - tic
    ranks.close()
    details = {"weights": weights, "parameters": groups, "frozen": frozen_note if frozen else "nothing frozen",
               "deviations": noted, "reference": reference, "losses": _thin(log["losses"]),
               "resumed_from_iteration": log["resumed_from"], "work_dir": str(Path(work_dir).resolve()),
               # the (iteration, image) pairs trained on, over all ranks: one process's at any N (issue 13)
               "trained_samples_checksum": trained,
               "model": model_cfg}
    if parallel:
        details["distributed"] = parallel
    config = {**cfg, "settings": settings, "digest": digest}
    return ProtocolResult(protocol=protocol, metrics=metrics, config=config, dataset=dataset_info,
                          checkpoint=subject.info, details=details,
                          timings={"build": build_seconds, "train": log["seconds"], "test": test_seconds,
                                   "seconds_per_iteration": log["seconds"] / max(1, len(log["losses"]))})


def _ranks(device: str, batch_size: int) -> Distributed:
    """The torchrun process group (world size 1 without torchrun), after the one-line refusals; `Distributed`
    refuses one GPU index for every rank."""
    import os

    from baselines.distributed import Distributed, TorchrunError

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world_size:
        raise TorchrunError(f"the total batch of {batch_size} images does not split over {world_size} processes: "
                            "it stays the reference's at any number of processes, so launch a number that divides it")
    return Distributed(device)


def _weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in state-dict order."""
    import torch

    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def dense_readings(result, metrics: tuple[str, ...], reimplementations: Mapping[tuple[str, str], str]) -> list:
    """A dense run's metrics as claims name them: `<protocol>` fine-tuned, `<protocol>_frozen` frozen, plus the
    rows of the MMSelfSup re-implementation our protocol equals (fine-tuned only)."""
    from protocols.registry import Reading

    frozen = result.config.get("mode") == "frozen"
    readings = []
    for metric in metrics:
        value = result.metrics.get(metric)
        if value is None:
            continue
        readings.append(Reading(result.protocol + ("_frozen" if frozen else ""), metric, value))
        twin = reimplementations.get((result.protocol, metric))
        if twin and not frozen:
            readings.append(Reading(twin, metric, value))
    return readings


def frozen_gap_rows(rows: list, protocol_id: str, metric: str) -> list:
    """Per (method, seed, scale): frozen minus fine-tuned `metric`, for the journal's 'larger gains when frozen'.

    `rows` are the report's measurements (any objects with protocol_id, metric, method, seed, scale, value, run_id).
    """
    index = {(m.protocol_id, m.metric, m.method, m.seed, m.scale): m for m in rows}
    gaps = []
    for (pid, met, method, seed, scale), frozen in index.items():
        finetuned = index.get((protocol_id, metric, method, seed, scale))
        if pid == f"{protocol_id}_frozen" and met == metric and finetuned is not None:
            gaps.append(dataclasses.replace(frozen, protocol_id=f"{protocol_id}_frozen_minus_finetune",
                                            value=frozen.value - finetuned.value,
                                            run_id=f"{frozen.run_id}-{finetuned.run_id}"))
    return gaps


def preset_configure(make_config: Callable[..., Any], task: str) -> Callable[[dict[str, Any], bool], Any]:
    """A Protocol `configure`: the task's reference config, or the `small` preset on synthetic data (unless given)."""
    def configure(values: dict[str, Any], synthetic: bool):
        values = dict(values)
        preset = values.pop("preset", None) or ("small" if synthetic else "reference")
        return make_config(values.pop("task", task), preset, **values)
    return configure


def synthetic_task_data(task: str, several_roots: bool) -> Callable[[bool], Any]:
    """A Protocol `default_data`: the synthetic scenes in `task`'s layout, with the splits that go with them."""
    def default(progress: bool = True):
        from protocols.common import default_voc_root
        from protocols.datasets import dense
        from protocols.registry import DefaultData

        root, splits = dense.synthetic_for_task(task, default_voc_root(progress=progress))
        return DefaultData([root] if several_roots else root, splits, f"the synthetic {task} scenes in {root} "
                           "(small preset)")
    return default
