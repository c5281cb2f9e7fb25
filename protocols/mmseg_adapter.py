"""Everything mmsegmentation-specific, in one place: the FCN config, datasets, pipelines and mIoU.

The model starts from mmseg 1.2.2's `fcn_r50-d8.py` and applies the DenseCL fork's deltas (spec
protocols.md §4.4): the backbone is the plain 7x7-stem `ResNet` (the fork's `ResNetNormal`), not
mmseg's deep-stem `ResNetV1c`, whose stem would not take the pretrained weights (DenseCL#3);
no `pretrained=` (weights arrive through `protocols.transfer`, loudly); BN, which is BN over the whole
batch in one process and becomes SyncBN under torchrun (`protocols.data_parallel`); Cityscapes uses
`align_corners=True` and sliding-window inference.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from baselines.distributed import Distributed
from protocols.transfer import quiet_mm_logging, require_mm_stack, use_mm_scope

IGNORE_INDEX = 255


def _setup() -> None:
    require_mm_stack("mmseg")
    from mmseg.utils import register_all_modules

    quiet_mm_logging()
    register_all_modules(init_default_scope=False)
    use_mm_scope("mmseg")


def fcn(depth: int, num_classes: int, frozen: bool, crop_size: int, cityscapes: bool) -> dict[str, Any]:
    """FCN-D8 (output stride 8, dilations 1,1,2,4) with the decode head on res5 and the auxiliary on res4."""
    from mmengine.config import Config

    path = resources.files("mmseg") / ".mim" / "configs" / "_base_" / "models" / "fcn_r50-d8.py"
    model = Config.fromfile(str(path)).to_dict()["model"]
    expansion = 4 if depth >= 50 else 1
    norm = dict(type="BN", requires_grad=True)
    model.pop("pretrained", None)
    model["data_preprocessor"]["size"] = (crop_size, crop_size)
    model["backbone"].update(type="ResNet", depth=depth, deep_stem=False, avg_down=False, norm_cfg=norm,
                             frozen_stages=4 if frozen else -1, norm_eval=frozen, init_cfg=None)
    for head, stage in (("decode_head", 3), ("auxiliary_head", 2)):
        model[head].update(in_channels=64 * 2**stage * expansion, num_classes=num_classes, norm_cfg=norm,
                           align_corners=cityscapes)
    if cityscapes:
        stride = max(1, (crop_size * 2) // 3)
        model["test_cfg"] = dict(mode="slide", crop_size=(crop_size, crop_size), stride=(stride, stride))
    return model


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    _setup()
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    model = MODELS.build(ConfigDict(copy.deepcopy(model_cfg)))
    model.init_weights()
    if type(model.backbone).__name__ != "ResNet" or model.backbone.deep_stem:
        raise RuntimeError("the FCN backbone must be the plain 7x7-stem ResNet (spec §4.4), not ResNetV1c")
    return model


def backbone_placement(key: str) -> str:
    return f"backbone.{key}"


def _train_pipeline(scale: tuple[int, int], crop_size: int) -> list[dict[str, Any]]:
    return [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
            dict(type="RandomResize", scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
            dict(type="RandomCrop", crop_size=(crop_size, crop_size), cat_max_ratio=0.75),
            dict(type="RandomFlip", prob=0.5), dict(type="PhotoMetricDistortion"),
            dict(type="PackSegInputs")]


def _test_pipeline(scale: tuple[int, int]) -> list[dict[str, Any]]:
    return [dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=True),
            dict(type="LoadAnnotations"), dict(type="PackSegInputs")]


def voc_datasets(root: Path, train_split: str, aug_split: str | None, test_split: str, scale: tuple[int, int],
                 crop_size: int) -> tuple[Any, Any]:
    """VOC12 train (SegmentationClass) + aug (SegmentationClassAug), tested on val, as the 20k config reads them."""
    _setup()
    from mmseg.registry import DATASETS

    def part(split: str, masks: str, pipeline: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(type="PascalVOCDataset", data_root=str(root), ann_file=f"ImageSets/Segmentation/{split}.txt",
                    data_prefix=dict(img_path="JPEGImages", seg_map_path=masks), pipeline=pipeline)

    train = part(train_split, "SegmentationClass", _train_pipeline(scale, crop_size))
    if aug_split:
        train = dict(type="ConcatDataset", datasets=[train, part(aug_split, "SegmentationClassAug",
                                                                  _train_pipeline(scale, crop_size))])
    return DATASETS.build(train), DATASETS.build(part(test_split, "SegmentationClass", _test_pipeline(scale)))


def cityscapes_datasets(root: Path, train_split: str, test_split: str, scale: tuple[int, int],
                        crop_size: int) -> tuple[Any, Any]:
    _setup()
    from mmseg.registry import DATASETS

    def dataset(split: str, pipeline: list[dict[str, Any]]) -> Any:
        return DATASETS.build(dict(type="CityscapesDataset", data_root=str(root), pipeline=pipeline,
                                   data_prefix=dict(img_path=f"leftImg8bit/{split}", seg_map_path=f"gtFine/{split}")))

    return dataset(train_split, _train_pipeline(scale, crop_size)), dataset(test_split, _test_pipeline(scale))


def collate(batch: list[Any]) -> Any:
    from mmengine.dataset import pseudo_collate

    return pseudo_collate(batch)


def miou(intersect: np.ndarray, union: np.ndarray, label_area: np.ndarray) -> dict[str, float]:
    """mmseg's IoUMetric: areas summed over the whole set per class, mIoU = nanmean over classes, unrounded."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
    return {"mIoU": 100 * float(np.nanmean(iou)), "aAcc": 100 * float(intersect.sum() / label_area.sum())}


def evaluate(model: nn.Module, dataset: Any, ranks: Distributed,
             progress: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, per-class IoU) of the model's predictions on `dataset` at the original resolution; under
    torchrun each rank predicts its share of the images and every rank sums all the areas in image order."""
    from mmseg.evaluation import IoUMetric

    from protocols.data_parallel import predict_in_order

    classes = dataset.metainfo["classes"]

    def areas(batch: Any) -> np.ndarray:
        """(intersection, union, label) area per class of the batch's image(s)."""
        total = np.zeros((3, len(classes)), np.float64)
        for sample in model.test_step(batch):
            intersect, union, _, label = IoUMetric.intersect_and_union(
                sample.pred_sem_seg.data.squeeze(0), sample.gt_sem_seg.data.squeeze(0).to(sample.pred_sem_seg.data),
                len(classes), IGNORE_INDEX)
            total += np.stack([intersect.cpu().numpy(), union.cpu().numpy(), label.cpu().numpy()])
        return total

    model.eval()
    totals = np.zeros((3, len(classes)), np.float64)
    for image_areas in predict_in_order(ranks, dataset, areas, collate, progress):
        totals += image_areas
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = {name: (100 * float(i / u) if u > 0 else float("nan"))
                     for name, i, u in zip(classes, *totals[:2], strict=True)}
    return miou(*totals), per_class
