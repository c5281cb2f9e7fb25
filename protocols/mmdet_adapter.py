"""Everything mmdet-specific, in one place: model configs, datasets, pipelines and metrics.

The models start from mmdet 3.3.0's own base configs and apply MMSelfSup's deltas (spec
protocols.md §4.2, §4.3), so every difference from stock mmdet is visible here:
- Faster R-CNN R50-C4: torchvision-style (`pytorch`) ResNet with 3 stages, res5 as the RoI shared
  head followed by one extra norm layer (`ResLayerExtraNorm`, MMSelfSup/detectron2 "ExtraNorm"),
  nothing frozen, BN trained; RGB input with ImageNet mean/std.
- Mask R-CNN R50-FPN: norm layers in the backbone, FPN, 4conv+1fc box head and mask head.
The configs say BN: in one process that is BN over the whole batch (recorded as a deviation from SyncBN by
the protocol); under torchrun `protocols.data_parallel` turns every BN into SyncBN.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baselines.distributed import Distributed
from protocols.transfer import quiet_mm_logging, require_mm_stack, use_mm_scope

IMAGENET_RGB = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True)
VOC_IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]  # detectron2's VOC AP: mean over .50:.95
_registered = False


def _setup() -> None:
    """Import mmdet, set its registry scope and register our two small additions (once)."""
    global _registered
    require_mm_stack("mmdet")
    from mmdet.utils import register_all_modules

    quiet_mm_logging()
    register_all_modules(init_default_scope=False)
    use_mm_scope("mmdet")
    if _registered:
        return
    from mmcv.cnn import build_norm_layer
    from mmdet.datasets import VOCDataset
    from mmdet.models.backbones import ResNet
    from mmdet.models.roi_heads.shared_heads import ResLayer
    from mmdet.registry import DATASETS, MODELS

    @MODELS.register_module(force=True)
    class ResLayerExtraNorm(ResLayer):
        """res5 as the C4 RoI head plus one norm layer after it (MoCo/DenseCL detectron2 `Res5ROIHeadsExtraNorm`)."""

        def __init__(self, depth: int, stage: int = 3, **kwargs) -> None:
            super().__init__(depth, stage=stage, **kwargs)
            block = ResNet.arch_settings[depth][0]
            self.add_module("norm", build_norm_layer(self.norm_cfg, 64 * 2**stage * block.expansion)[1])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(getattr(self, f"layer{self.stage + 1}")(x))

    @DATASETS.register_module(force=True)
    class VOCDatasetTrainDifficult(VOCDataset):
        """detectron2's VOC reading: 'difficult' objects are training targets (mmdet ignores them)."""

        def _parse_instance_info(self, raw_ann_info, minus_one: bool = True) -> list[dict]:
            instances = super()._parse_instance_info(raw_ann_info, minus_one=minus_one)
            for instance in instances:
                instance["ignore_flag"] = 0
            return instances

    _registered = True


def _base_config(name: str) -> dict[str, Any]:
    from mmengine.config import Config

    path = resources.files("mmdet") / ".mim" / "configs" / "_base_" / "models" / name
    return Config.fromfile(str(path)).to_dict()["model"]


def _norm(trainable: bool) -> dict[str, Any]:
    return dict(type="BN", requires_grad=trainable)


def faster_rcnn_c4(depth: int, num_classes: int, frozen: bool, rois_per_image: int,
                   test_proposals: int) -> dict[str, Any]:
    """MMSelfSup `faster-rcnn_r50-c4_ms-24k_voc0712.py` on mmdet's base C4 model; frozen: stem+res2..res4 fixed."""
    model = _base_config("faster-rcnn_r50-caffe-c4.py")
    expansion = 4 if depth >= 50 else 1
    c4, c5 = 256 * expansion, 512 * expansion
    model["data_preprocessor"].update(IMAGENET_RGB, pad_size_divisor=32)
    model["backbone"].update(depth=depth, style="pytorch", frozen_stages=3 if frozen else -1,
                             norm_cfg=_norm(True), norm_eval=frozen, init_cfg=None)
    model["rpn_head"].update(in_channels=c4, feat_channels=c4)
    roi = model["roi_head"]
    roi["shared_head"] = dict(type="ResLayerExtraNorm", depth=depth, stage=3, stride=2, dilation=1, style="pytorch",
                              norm_cfg=_norm(True), norm_eval=False)
    roi["bbox_roi_extractor"]["out_channels"] = c4
    roi["bbox_head"].update(in_channels=c5, num_classes=num_classes)
    model["train_cfg"]["rcnn"]["sampler"]["num"] = rois_per_image
    model["test_cfg"]["rpn"]["max_per_img"] = test_proposals
    return model


def mask_rcnn_fpn(depth: int, num_classes: int, frozen: bool, rois_per_image: int,
                  test_proposals: int) -> dict[str, Any]:
    """MMSelfSup `mask-rcnn_r50_fpn_ms-1x_coco.py` on mmdet's base model; frozen: all four stages fixed."""
    model = _base_config("mask-rcnn_r50_fpn.py")
    expansion = 4 if depth >= 50 else 1
    model["backbone"].update(depth=depth, frozen_stages=4 if frozen else -1, norm_cfg=_norm(True),
                             norm_eval=frozen, init_cfg=None)
    model["neck"].update(in_channels=[64 * 2**i * expansion for i in range(4)], norm_cfg=_norm(True))
    roi = model["roi_head"]
    roi["bbox_head"].update(type="Shared4Conv1FCBBoxHead", conv_out_channels=256, norm_cfg=_norm(True),
                            num_classes=num_classes)
    roi["mask_head"].update(norm_cfg=_norm(True), num_classes=num_classes)
    model["train_cfg"]["rcnn"]["sampler"]["num"] = rois_per_image
    model["test_cfg"]["rpn"]["max_per_img"] = test_proposals
    return model


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    _setup()
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    model = MODELS.build(ConfigDict(copy.deepcopy(model_cfg)))
    model.init_weights()
    return model


def backbone_placement(task: str):
    """Where backbone key `k` lives in the detector: C4 moves res5 (`layer4`) into the RoI shared head."""
    if task == "voc-c4":
        return lambda k: f"roi_head.shared_head.{k}" if k.startswith("layer4.") else f"backbone.{k}"
    return lambda k: f"backbone.{k}"


def owned_prefixes(task: str) -> tuple[str, ...]:
    """Model keys the checkpoint must fill; the C4 head's extra norm is new (it has no pretrained weights)."""
    if task == "voc-c4":
        return ("backbone.", "roi_head.shared_head.layer4.")
    return ("backbone.",)


def _train_pipeline(short_sides: tuple[int, ...], max_size: int, with_mask: bool) -> list[dict[str, Any]]:
    return [dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask),
            dict(type="RandomChoiceResize", scales=[(max_size, s) for s in short_sides], keep_ratio=True),
            dict(type="RandomFlip", prob=0.5),
            dict(type="PackDetInputs")]


def _test_pipeline(short_side: int, max_size: int, with_mask: bool) -> list[dict[str, Any]]:
    return [dict(type="LoadImageFromFile"),
            dict(type="Resize", scale=(max_size, short_side), keep_ratio=True),
            dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]


def voc_datasets(roots: list[Path], train_split: str, test_root: Path, test_split: str, short_sides: tuple[int, ...],
                 max_size: int, test_short_side: int, difficult: str) -> tuple[Any, Any]:
    """VOC07(+12) trainval and VOC07 test as mmdet reads them (XML, 1-based boxes minus one)."""
    _setup()
    from mmdet.registry import DATASETS

    train_type = {"ignore": "VOCDataset", "train": "VOCDatasetTrainDifficult"}[difficult]
    parts = [dict(type=train_type, data_root=str(root), ann_file=f"ImageSets/Main/{train_split}.txt",
                  data_prefix=dict(sub_data_root=""), filter_cfg=dict(filter_empty_gt=True, min_size=32),
                  pipeline=_train_pipeline(short_sides, max_size, False)) for root in roots]
    train = parts[0] if len(parts) == 1 else dict(type="ConcatDataset", ignore_keys=["dataset_type"], datasets=parts)
    test = dict(type="VOCDataset", data_root=str(test_root), ann_file=f"ImageSets/Main/{test_split}.txt",
                data_prefix=dict(sub_data_root=""), test_mode=True,
                pipeline=_test_pipeline(test_short_side, max_size, False))
    return DATASETS.build(train), DATASETS.build(test)


def coco_classes(annotation_file: Path) -> tuple[str, ...]:
    """Category names in the file's category order (COCO ids are not contiguous; mmdet maps by name)."""
    return tuple(c["name"] for c in json.loads(annotation_file.read_text())["categories"])


def coco_datasets(root: Path, train_split: str, test_split: str, short_sides: tuple[int, ...], max_size: int,
                  test_short_side: int) -> tuple[Any, Any]:
    _setup()
    from mmdet.registry import DATASETS

    classes = coco_classes(root / "annotations" / f"instances_{train_split}.json")

    def dataset(split: str, pipeline: list[dict[str, Any]], test_mode: bool) -> Any:
        return DATASETS.build(dict(type="CocoDataset", data_root=str(root), metainfo=dict(classes=classes),
                                   ann_file=f"annotations/instances_{split}.json", data_prefix=dict(img=f"{split}/"),
                                   filter_cfg=None if test_mode else dict(filter_empty_gt=True, min_size=32),
                                   test_mode=test_mode, pipeline=pipeline))

    return (dataset(train_split, _train_pipeline(short_sides, max_size, True), False),
            dataset(test_split, _test_pipeline(test_short_side, max_size, True), True))


def collate(batch: list[Any]) -> Any:
    from mmengine.dataset import pseudo_collate

    return pseudo_collate(batch)


def evaluate(model: nn.Module, dataset: Any, task: str, annotation_file: Path | None, ranks: Distributed,
             progress: bool = True) -> dict[str, float]:
    """Predict the test set and score it: VOC 11-point AP at IoU .50:.95 (AP, AP50, AP75) or COCO box/mask AP.

    Under torchrun each rank predicts its share of the images and the metric scores all of them in image
    order (on every rank): `compute_metrics` on the gathered list, not mmengine's `evaluate`, whose own
    collection across ranks would gather the parts a second time (through a temp folder of one machine).
    """
    from mmengine.evaluator import Evaluator

    from protocols.data_parallel import predict_in_order

    if task == "voc-c4":
        from mmdet.evaluation import VOCMetric

        metric = VOCMetric(iou_thrs=VOC_IOU_THRESHOLDS, eval_mode="11points")
    else:
        from mmdet.evaluation import CocoMetric

        metric = CocoMetric(ann_file=str(annotation_file), metric=["bbox", "segm"])
    metric.dataset_meta = dataset.metainfo
    evaluator = Evaluator(metric)  # turns the model's data samples into the dicts the metric reads

    def score_input(batch: Any) -> Any:
        evaluator.process(data_samples=model.test_step(batch), data_batch=batch)
        [scored] = metric.results  # (ground truth, predictions) of the batch's one image
        metric.results.clear()
        return scored

    model.eval()
    scores = metric.compute_metrics(predict_in_order(ranks, dataset, score_input, collate, progress))
    if task == "voc-c4":
        ap = {int(round(t * 100)): scores[f"AP{int(round(t * 100)):02d}"] for t in VOC_IOU_THRESHOLDS}
        return {"AP": 100 * sum(ap.values()) / len(ap), "AP50": 100 * ap[50], "AP75": 100 * ap[75]}
    names = {"bbox_AP": "bbox_mAP", "bbox_AP50": "bbox_mAP_50", "bbox_AP75": "bbox_mAP_75",
             "mask_AP": "segm_mAP", "mask_AP50": "segm_mAP_50", "mask_AP75": "segm_mAP_75"}
    if not scores:  # mmdet logs "results ... empty" and returns nothing: no detections score AP 0
        return {ours: 0.0 for ours in names}
    return {ours: 100 * float(scores[theirs]) for ours, theirs in names.items()}
