"""A frozen-backbone dense probe: a per-location linear classifier on feature maps, scored by segmentation mIoU.

A declared small-scale *proxy* for the journal's frozen-backbone segmentation claims (issue 12), not a
protocol of the paper. It measures what DenseCL says it improves, spatially discriminative features:
- each image is squashed to `input_size` x `input_size` and passed once through the frozen backbone (eval
  mode); each location of a layer's map is one sample, labelled with the majority class of its cell of
  the mask (cells whose majority is the 255 boundary are left out);
- one multinomial logistic regression per layer (L2 as scikit-learn's `C`, the bias unpenalised, features
  standardised on the training locations), fitted by full-batch L-BFGS in float32 on the training split:
  deterministic given the features. It is the objective of scikit-learn's LogisticRegression (same mIoU to
  0.04 points on a random ResNet-18), solved in torch because lbfgs there took a minute a checkpoint on 2
  cores; a ridge classifier is
  faster still but scores a random ResNet-18's feature4 at half the mIoU (one-vs-rest least squares is
  swamped by the background class);
- on the test split its logits are upsampled bilinearly to the mask and the argmax is scored as mmseg
  scores segmentation: intersections and unions summed over the set, IoU per class, nan-mean (spec §4.4).

Data: a VOC-layout root with `SegmentationClass/*.png` (palette indices, 255 ignored) and the split lists
of `ImageSets/Segmentation/` (else `ImageSets/Main/`).

torch, PIL and the feature code are imported by the functions that use them, so the declaration below (and
`densecl-bench eval seg_voc_dense_probe --help`) needs none of them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from baselines.backbone_names import FEATURE_NAMES, layer_list
from baselines.config import ConfigError, option
from baselines.infra import UserError
from protocols.registry import DefaultData, Protocol, Reading
from protocols.result import ProtocolResult

if TYPE_CHECKING:
    import torch

IGNORE = 255
NUM_CLASSES = 21  # background + the 20 VOC classes


class DenseProbeInputError(UserError, ValueError):
    """A mask the probe cannot read as class indices; the message names the file."""


@dataclass
class DenseProbeConfig:
    layers: tuple[str, ...] = option(("feature4", "feature5"), "stages probed: comma list or 'all'", parse=layer_list)
    input_size: int = option(128, "images are squashed to this square before the backbone")
    train_split: str = option("train", "split list the classifier is fitted on")
    test_split: str = option("val", "split list it is scored on")
    regularization: float = option(1.0, "inverse L2 strength C of the logistic regression")
    max_iter: int = option(100, "L-BFGS iterations")
    batch_size: int = option(32, "images per forward pass")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")


def split_ids(root: Path, split: str) -> list[str]:
    for task in ("Segmentation", "Main"):
        path = root / "ImageSets" / task / f"{split}.txt"
        if path.is_file():
            ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
            if ids:
                return ids
    raise FileNotFoundError(f"{root}: no ImageSets/Segmentation/{split}.txt or ImageSets/Main/{split}.txt")


def _mask(root: Path, image_id: str, size: int) -> np.ndarray:
    from PIL import Image

    path = root / "SegmentationClass" / f"{image_id}.png"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the dense probe needs a segmentation mask for every image")
    with Image.open(path) as mask:
        if mask.mode != "P" and mask.mode != "L":
            raise DenseProbeInputError(f"{path} is a {mask.mode} image; masks are palette indices "
                                       "(VOC SegmentationClass)")
        return np.asarray(mask.resize((size, size), Image.NEAREST), dtype=np.int64)


def _images(root: Path, ids: list[str], size: int) -> torch.Tensor:
    import torch
    from PIL import Image

    from baselines.data import load_rgb
    from protocols.features import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batch = []
    for image_id in ids:
        image = load_rgb(str(root / "JPEGImages" / f"{image_id}.jpg")).resize((size, size), Image.BILINEAR)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        batch.append((array - mean) / std)
    return torch.stack(batch)


def feature_maps(subject, root: Path, ids: list[str], cfg: DenseProbeConfig, progress: bool) -> dict[str, np.ndarray]:
    """layer -> (images, C, g, g) float32 maps of the frozen backbone."""
    import torch
    from tqdm.auto import tqdm

    from protocols.common import resolve_device

    device = resolve_device(cfg.device)
    backbone = subject.backbone.to(device).eval()
    maps: dict[str, list[np.ndarray]] = {layer: [] for layer in cfg.layers}
    with torch.inference_mode():
        for start in tqdm(range(0, len(ids), cfg.batch_size), desc="probe features", disable=not progress,
                          leave=False):
            features = backbone(_images(root, ids[start:start + cfg.batch_size], cfg.input_size).to(device))
            for layer in cfg.layers:
                maps[layer].append(features[layer].float().cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in maps.items()}


def cell_labels(masks: np.ndarray, grid: int) -> np.ndarray:
    """(images, grid, grid) majority class of each cell; IGNORE where the majority is the boundary label."""
    n, size, _ = masks.shape
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    labels = np.full((n, grid, grid), IGNORE, dtype=np.int64)
    for i in range(grid):
        for j in range(grid):
            cell = masks[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].reshape(n, -1)
            counts = np.stack([(cell == c).sum(1) for c in (*range(NUM_CLASSES), IGNORE)], axis=1)
            labels[:, i, j] = np.array([*range(NUM_CLASSES), IGNORE])[counts.argmax(1)]
    return labels


def miou(confusion: np.ndarray) -> tuple[float, list[float]]:
    """mmseg's IoU: per class intersection / union over the whole set, nan-mean over classes (x100)."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
    return 100.0 * float(np.nanmean(iou)), [100.0 * float(v) for v in iou]


def fit_softmax(rows: np.ndarray, labels: np.ndarray, regularization: float, max_iter: int
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """argmin_W,b  C * sum_i CE(x_i W + b, y_i) + ||W||^2 / 2 (scikit-learn's multinomial objective), by L-BFGS."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(rows.astype(np.float32))
    y = torch.from_numpy(labels)
    weight = torch.zeros(x.shape[1], NUM_CLASSES, requires_grad=True)
    bias = torch.zeros(NUM_CLASSES, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")
    scale = 1.0 / (regularization * len(y))  # the objective divided by C * n: the same minimiser, O(1) values

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y, reduction="mean") + 0.5 * scale * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach(), int(optimizer.state[optimizer._params[0]]["n_iter"])


def probe_layer(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_masks: np.ndarray,
                cfg: DenseProbeConfig) -> dict:
    """Fit the per-location classifier on `train` maps and score `test` maps against full-size masks."""
    import torch
    import torch.nn.functional as F

    c = train.shape[1]
    rows = train.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    labels = train_labels.reshape(-1)
    keep = labels != IGNORE
    rows, labels = rows[keep], labels[keep]
    mean, std = rows.mean(0), rows.std(0) + 1e-6
    weight, bias, iterations = fit_softmax((rows - mean) / std, labels, cfg.regularization, cfg.max_iter)
    n, _, g, _ = test.shape
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for start in range(0, n, 32):  # logits upsampled a few images at a time: full-size float maps add up
        chunk = test[start:start + 32]
        flat = (chunk.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64) - mean) / std
        scores = torch.from_numpy(flat.astype(np.float32)) @ weight + bias
        logits = scores.reshape(len(chunk), g, g, NUM_CLASSES).permute(0, 3, 1, 2)
        masks = test_masks[start:start + 32]
        predicted = F.interpolate(logits, size=masks.shape[1:], mode="bilinear", align_corners=False).argmax(1).numpy()
        valid = masks != IGNORE
        confusion += np.bincount(masks[valid] * NUM_CLASSES + predicted[valid],
                                 minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)
    value, per_class = miou(confusion)
    return {"mIoU": value, "per_class_iou": per_class, "train_locations": int(keep.sum()), "grid": g,
            "classes_seen": sorted(int(k) for k in np.unique(labels)), "iterations": iterations}


def run(subject, data, cfg: DenseProbeConfig, *, work_dir=None, progress: bool = True) -> ProtocolResult:
    """Features of both splits, one classifier per layer, mIoU per layer; work_dir is unused."""
    root = Path(data[0] if isinstance(data, (list, tuple)) else data)
    unknown = [layer for layer in cfg.layers if layer not in FEATURE_NAMES]
    if unknown or cfg.input_size < 32:
        raise ConfigError(f"dense probe: layers must be feature1..feature5 and input_size >= 32, got {cfg.layers}, "
                          f"{cfg.input_size}")
    started = time.perf_counter()
    ids = {split: split_ids(root, split) for split in (cfg.train_split, cfg.test_split)}
    masks = {split: np.stack([_mask(root, i, cfg.input_size) for i in ids[split]]) for split in ids}
    maps = {split: feature_maps(subject, root, ids[split], cfg, progress) for split in ids}
    extracted = time.perf_counter()
    metrics, details = {}, {}
    for layer in cfg.layers:
        grid = maps[cfg.train_split][layer].shape[-1]
        fitted = probe_layer(maps[cfg.train_split][layer], cell_labels(masks[cfg.train_split], grid),
                             maps[cfg.test_split][layer], masks[cfg.test_split], cfg)
        metrics[f"{layer}/mIoU"] = fitted["mIoU"]
        details[layer] = fitted
    dataset = {"name": root.name, "root": str(root.resolve()), "layout": "pascal-voc segmentation masks",
               "splits": {split: len(v) for split, v in ids.items()}}
    return ProtocolResult(
        protocol="seg_voc_dense_probe", metrics=metrics, config=asdict(cfg), dataset=dataset, checkpoint=subject.info,
        timings={"features_s": extracted - started, "fit_s": time.perf_counter() - extracted},
        details={"layers": details, "proxy_for": "the frozen-backbone segmentation claims (journal, spec §4.6)"},
    )


def measurements(result: ProtocolResult) -> list[Reading]:
    return [Reading("seg_voc_dense_probe", "mIoU", value, layer=name.split("/")[0])
            for name, value in result.metrics.items() if name.endswith("/mIoU") and value is not None]


def _synthetic(progress: bool = True) -> DefaultData:
    from protocols.common import default_voc_root

    root = default_voc_root(progress=progress)
    return DefaultData(root, {"train_split": "trainval", "test_split": "test"},
                       f"the synthetic VOC-layout dataset in {root} (trainval / test)")


SEG_VOC_DENSE_PROBE = Protocol(
    name="seg_voc_dense_probe", summary="small-scale proxy: per-location linear probe of frozen feature maps (mIoU)",
    description="A declared small-scale proxy for the frozen-backbone segmentation claims, not the paper's protocol: "
    "a multinomial logistic regression per location of each frozen stage's map, fitted on the train split's masks "
    "(majority class per cell), scored on the test split by mIoU with its logits upsampled to the mask. "
    "Deterministic given the features. Data: a VOC-layout root with SegmentationClass masks.",
    config=DenseProbeConfig, body=run, measurements=measurements, default_data=_synthetic, metrics=("mIoU",))
