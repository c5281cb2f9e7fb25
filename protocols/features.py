"""Frozen-backbone feature extraction, cached on disk as plain `.npy` files.

Pooling and transforms follow spec protocols.md §1.3 (VOC07 SVM: short side 256, then a 224x224
squash; per-layer AvgPool2d with `count_include_pad=True`) and §3.1 (k-NN: global average pool of
the last stage after a 224 centre crop). Features are computed by the query backbone in eval mode,
so BN uses its running statistics (§1.6, item 5).

The cache folder is keyed by checkpoint sha256 + dataset fingerprint + transform + pooling, holds
one `<split>_<layer>.npy` per layer plus `<split>_labels.npy` and `<split>_ids.json`, and an
interrupted extraction resumes from the last flushed row. Under torchrun the ranks share the batches and
rank 0 alone writes the folder (which must be on a filesystem every rank reads); the files have the same
bytes as one process's, and a run interrupted at one number of ranks resumes at any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from tqdm.auto import tqdm

from baselines.backbone import FEATURE_NAMES, Backbone
from baselines.distributed import Distributed
from baselines.infra import UserError, atomic_numpy_save, atomic_write_json, cache_root, get_logger


class FeatureCacheError(UserError, RuntimeError):
    """A feature cache folder that belongs to other images; the message names it."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (kernel, stride, padding) of `MultiPooling(pool_type='specified')` for 224x224 inputs (spec §1.3):
# pooled maps are 12x12, 6x6, 4x4, 3x3 and 2x2, i.e. 9216/9216/8192/9216/8192 dims for ResNet-50.
SVM_POOLS: dict[str, tuple[int, int, int]] = {
    "feature1": (10, 10, 4),
    "feature2": (16, 8, 0),
    "feature3": (13, 5, 0),
    "feature4": (8, 3, 0),
    "feature5": (6, 1, 0),
}
POOLINGS = ("svm", "gap")
FLUSH_SECONDS = 30.0
LOG = get_logger("features")


def svm_pool(layer: str) -> nn.AvgPool2d:
    kernel, stride, padding = SVM_POOLS[layer]
    return nn.AvgPool2d(kernel, stride, padding)  # count_include_pad=True, ceil_mode=False: as the reference


def svm_transform() -> Callable:
    """Resize(256) then squash to 224x224, no crop (spec §1.3, `extract_info/voc07.py`)."""
    return T.Compose([T.Resize(256), T.Resize((224, 224)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def center_crop_transform() -> Callable:
    """Resize(256) then CenterCrop(224): the k-NN bank/query and linear-probe test transform (§2.1, §3.1)."""
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def pool_features(features: dict[str, torch.Tensor], layers: Iterable[str], pooling: str) -> dict[str, torch.Tensor]:
    """Flattened (N, D) features per layer; `svm` keeps the spatial grid channel-major as `x.view(N, -1)`."""
    pooled = {}
    for layer in layers:
        x = features[layer]
        if pooling == "svm":
            pooled[layer] = svm_pool(layer)(x).flatten(1)
        else:
            pooled[layer] = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pooled


def _check_layers(layers: Iterable[str], pooling: str) -> list[str]:
    layers = list(layers)
    unknown = [layer for layer in layers if layer not in FEATURE_NAMES]
    if unknown or not layers:
        raise ValueError(f"unknown layers {unknown or layers}: choose from {', '.join(FEATURE_NAMES)}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: choose from {', '.join(POOLINGS)}")
    return layers


def _feature_dims(backbone: Backbone, layers: list[str], pooling: str, device: torch.device) -> dict[str, int]:
    with torch.inference_mode():
        probe = backbone(torch.zeros(1, 3, 224, 224, device=device))
        return {layer: int(v.shape[1]) for layer, v in pool_features(probe, layers, pooling).items()}


def _resume_row(marker: Path, partial: dict[str, Path], layers: list[str], n: int) -> int:
    """The rows an interrupted extraction flushed (0 when there is none, or it was of other layers or rows)."""
    if marker.exists() and all(p.exists() for p in partial.values()):
        state = json.loads(marker.read_text())
        if state.get("layers") == layers and state.get("rows") == n:
            return int(state["done"])
    return 0


def batch_spans(start: int, n: int, batch_size: int) -> list[tuple[int, int]]:
    """The (first, stop) rows of every batch from `start`: the same batches at any number of ranks."""
    return [(first, min(first + batch_size, n)) for first in range(start, n, batch_size)]


def extract_to(
    out: Path,
    backbone: Backbone,
    dataset,
    layers: list[str],
    pooling: str,
    split: str,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> None:
    """Fill `out/<split>_<layer>.npy` row by row; resumable via `<split>.progress.json`.

    Under torchrun the batches are dealt out in turn (batch b to rank b mod N), so each batch holds the same
    images as in one process and its features have the same bytes; rank 0 gathers every round of N batches,
    writes them in image order and alone owns the files (flushes, the resume marker, the final rename).
    """
    ranks = Distributed(str(device))
    device = ranks.device
    backbone = backbone.to(device).eval()
    n = len(dataset)
    dims = _feature_dims(backbone, layers, pooling, device)
    marker = out / f"{split}.progress.json"
    partial = {layer: out / f"{split}_{layer}.npy.partial" for layer in layers}
    arrays: dict[str, np.ndarray] = {}
    done = 0
    if ranks.is_main:
        done = _resume_row(marker, partial, layers, n)
        if done == 0:
            arrays = {layer: open_memmap(partial[layer], mode="w+", dtype=np.float32, shape=(n, dims[layer]))
                      for layer in layers}
        else:
            arrays = {layer: open_memmap(partial[layer], mode="r+") for layer in layers}
            LOG.info("%s: resuming an interrupted feature extraction at image %d of %d", split, done, n)
    done = int(ranks.broadcast_object(done))

    def flush(rows: int) -> None:
        for array in arrays.values():
            array.flush()
        atomic_write_json(marker, {"layers": layers, "rows": n, "done": rows}, indent=None)

    batches = batch_spans(done, n, batch_size)
    mine = [row for first, stop in batches[ranks.rank :: ranks.world_size] for row in range(first, stop)]
    loader = iter(DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                             pin_memory=device.type == "cuda"))
    last_flush = time.monotonic()
    bar = tqdm(total=n, initial=done, desc=f"features {split}", unit="img",
               disable=not (progress and ranks.is_main), dynamic_ncols=True)
    with torch.inference_mode():
        for round_start in range(0, len(batches), ranks.world_size):
            pooled = None
            if round_start + ranks.rank < len(batches):
                images, _, index = next(loader)
                features = pool_features(backbone(images.to(device, non_blocking=True)), layers, pooling)
                pooled = (int(index[0]), {layer: value.float().cpu().numpy() for layer, value in features.items()})
            gathered = ranks.gather_object(pooled)
            if not ranks.is_main:
                continue
            for first, values in (item for item in gathered if item is not None):
                for layer, value in values.items():
                    arrays[layer][first : first + len(value)] = value
                bar.update(len(value))
            done = batches[min(round_start + ranks.world_size, len(batches)) - 1][1]
            if time.monotonic() - last_flush > FLUSH_SECONDS:
                flush(done)
                last_flush = time.monotonic()
    bar.close()
    if ranks.is_main:
        flush(done)
        arrays.clear()  # drop the memmaps before renaming their files
        for layer in layers:
            os.replace(partial[layer], out / f"{split}_{layer}.npy")
        marker.unlink()
    ranks.barrier()  # the other ranks read the finished files next


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return cache_root() / "features"


def cached_features(
    backbone: Backbone,
    dataset,
    split: str,
    layers: Iterable[str],
    pooling: str,
    key: dict,
    labels: np.ndarray,
    ids: list[str],
    cache_dir: str | os.PathLike | None = None,
    **extract_kwargs,
) -> tuple[dict[str, np.ndarray], Path]:
    """Features of `dataset` (rows = `ids`), computed once per `key` and then read back from disk.

    `key` must identify everything the features depend on: the checkpoint sha256, the dataset
    fingerprint and the transform; `pooling` and the architecture are added here.
    """
    layers = _check_layers(layers, pooling)
    if len(ids) != len(dataset) or len(labels) != len(dataset):
        raise ValueError(f"{len(dataset)} images but {len(ids)} ids and {len(labels)} label rows")
    ranks = Distributed(str(extract_kwargs.get("device", "cpu")))
    folder = Path(cache_dir or default_cache_dir()) / cache_key(pooling=pooling, arch=backbone.name, **key)
    meta = folder / "meta.json"
    if ranks.is_main:  # under torchrun rank 0 writes the cache; the others read it once it is complete
        folder.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            atomic_write_json(meta, dict(sorted({"pooling": pooling, "arch": backbone.name, **key}.items())))
    ranks.barrier()
    ids_file = folder / f"{split}_ids.json"
    if ids_file.exists() and json.loads(ids_file.read_text()) != list(ids):
        raise FeatureCacheError(f"feature cache {folder} holds other image ids for split {split!r}; delete it")
    missing = ranks.broadcast_object([layer for layer in layers if not (folder / f"{split}_{layer}.npy").exists()])
    if missing:
        extract_to(folder, backbone, dataset, missing, pooling, split, **extract_kwargs)
    if ranks.is_main:
        atomic_numpy_save(folder / f"{split}_labels.npy", np.asarray(labels))
        if not ids_file.exists():
            atomic_write_json(ids_file, list(ids), indent=None)
    ranks.barrier()
    return {layer: np.load(folder / f"{split}_{layer}.npy", mmap_mode="r") for layer in layers}, folder
