"""Semantic segmentation transfer: FCN-D8 fine-tuned (or heads on a frozen backbone), scored by mIoU.

Two tasks (spec protocols.md §4.4), on mmsegmentation 1.2.2 through `protocols.mmseg_adapter`:
- `voc-fcn`: VOC12 train + SBD aug (10,582 images) at 512x512, 20k iterations at batch 16,
  tested on val (1,449) with whole-image inference;
- `cityscapes-fcn`: Cityscapes train (2,975) at 769x769, 40k iterations at batch 8, tested on val
  with sliding windows.
Both with the plain 7x7-stem ResNet the authors used, SGD lr 0.01, wd 5e-4, poly decay (power
0.9, min lr 1e-4), and mIoU as mmseg computes it (areas summed over the set, nanmean over classes).

`--mode frozen` (journal, spec §4.6): all four backbone stages fixed with BN in eval mode; the
decode and auxiliary heads train. The dataset counts of the reference sets are checked when the
reference preset runs on real data, since a wrong `aug.txt` or a 2-GPU batch are the classic causes
of low mIoU (DenseCL#3, #19, #38).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baselines.config import ConfigError, option
from protocols import transfer
from protocols.common import BackboneUnderTest, resolve_device
from protocols.registry import Protocol, Reading
from protocols.result import ProtocolResult

TASKS = ("voc-fcn", "cityscapes-fcn")
MODES, PRESETS = transfer.MODES, transfer.PRESETS


@dataclass
class SegmentationConfig(transfer.TransferSettings):
    task: str = option("voc-fcn", "voc-fcn (VOC12 aug) or cityscapes-fcn", choices=TASKS)
    iterations: int = option(20000, "training iterations")
    batch_size: int = option(16, "images per iteration over all devices (the reference: 4 per GPU x 4 GPUs)")
    lr: float = option(0.01, "base learning rate")
    weight_decay: float = option(5e-4, "weight decay")
    min_lr: float = option(1e-4, "poly schedule's final LR")
    crop_size: int = option(512, "training crop (reference 512 VOC, 769 Cityscapes)")
    scale: tuple[int, ...] = option((2048, 512), "RandomResize base scale (x0.5-2.0) and the test resize: W,H")
    train_split: str = option("train", "training list")
    aug_split: str = option("aug", "VOC: the SBD list read from SegmentationClassAug ('' for none)")
    test_split: str = option("val", "test list")
    check_counts: bool = option(True, "require the reference sets' sizes (10,582 / 1,449; 2,975 / 500)")

    def validate(self) -> None:
        for name, value, allowed in (("task", self.task, TASKS), ("mode", self.mode, MODES)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
        if self.iterations < 1 or self.batch_size < 1 or self.crop_size < 16:
            raise ConfigError("iterations and batch size must be positive and the crop at least 16 pixels")


REFERENCE = {
    "voc-fcn": SegmentationConfig(),
    "cityscapes-fcn": SegmentationConfig(task="cityscapes-fcn", iterations=40000, batch_size=8, crop_size=769,
                                         scale=(2049, 1025), aug_split=""),
}
EXPECTED_IMAGES = {"voc-fcn": {"train": 10582, "test": 1449}, "cityscapes-fcn": {"train": 2975, "test": 500}}
# CPU scale (resnet18 on the 96-pixel synthetic scenes): 96-pixel crops of images resized around 96
# (x0.5-2.0), batch 4, the reference LR.
SMALL = {
    "voc-fcn": dict(iterations=200, batch_size=4, crop_size=96, scale=(384, 96), aug_split="", check_counts=False),
    "cityscapes-fcn": dict(iterations=200, batch_size=4, crop_size=96, scale=(192, 96), check_counts=False),
}


def make_config(task: str = "voc-fcn", preset: str = "reference", **overrides: Any) -> SegmentationConfig:
    """The reference protocol of `task`, scaled down by the `small` preset, then `overrides` (None ignored)."""
    return transfer.make_task_config(SegmentationConfig, REFERENCE, SMALL, task, preset, overrides)


def settings(cfg: SegmentationConfig) -> dict[str, Any]:
    return {"total_batch": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "iterations": cfg.iterations, "crop_size": cfg.crop_size, "scale": tuple(cfg.scale),
            "norm": "BN (one device)", "train_sets": [s for s in (cfg.train_split, cfg.aug_split) if s]}


def _reference_settings(task: str) -> dict[str, Any]:
    reference = settings(REFERENCE[task])
    reference["norm"] = "SyncBN"
    return reference


def _data(cfg: SegmentationConfig, root: Path) -> tuple[Any, Any, dict[str, Any]]:
    from protocols import mmseg_adapter
    from protocols.datasets import dense

    expected = EXPECTED_IMAGES[cfg.task] if cfg.check_counts else {}
    if cfg.task == "voc-fcn":
        train_counts = [dense.check_voc_segmentation(root, s) for s in (cfg.train_split, cfg.aug_split) if s]
        n_train = sum(c["images"] for c in train_counts)
        test_counts = dense.check_voc_segmentation(root, cfg.test_split)
        n_test = test_counts["images"]
        train, test = mmseg_adapter.voc_datasets(root, cfg.train_split, cfg.aug_split or None, cfg.test_split,
                                                 tuple(cfg.scale), cfg.crop_size)
        layout = "pascal-voc"
    else:
        n_train = dense.check_cityscapes(root, cfg.train_split)["images"]
        n_test = dense.check_cityscapes(root, cfg.test_split)["images"]
        train, test = mmseg_adapter.cityscapes_datasets(root, cfg.train_split, cfg.test_split, tuple(cfg.scale),
                                                        cfg.crop_size)
        layout = "cityscapes"
    if expected and n_train != expected["train"]:
        raise dense.DenseDataError(
            f"{root}: {n_train} training images, the reference protocol trains on {expected['train']:,} "
            + ("(VOC12 train 1,464 + SBD aug 9,118: check aug.txt excludes the VOC train/val ids)"
               if cfg.task == "voc-fcn" else "(Cityscapes gtFine train)")
            + "; pass --no-check-counts to run anyway")
    if expected and n_test != expected["test"]:
        raise dense.DenseDataError(f"{root}: {n_test} test images, the reference protocol tests on "
                                   f"{expected['test']:,}; pass --no-check-counts to run anyway")
    if len(train) != n_train:
        raise dense.DenseDataError(f"{root}: mmseg read {len(train)} training images, the lists name {n_train}")
    info = {"name": root.name, "root": str(root.resolve()), "layout": layout,
            "classes": len(train.metainfo["classes"]), "splits": {"train": n_train, "test": n_test}}
    return train, test, info


def run(subject: BackboneUnderTest, data: str | Path | list, cfg: SegmentationConfig, *, work_dir: str | Path | None,
        progress: bool = True) -> ProtocolResult:
    """Train the FCN from `subject`'s weights in `work_dir` (resumable) and report mIoU on the test split."""
    from protocols import mmseg_adapter

    cfg.validate()
    transfer.require_mm_stack("mmseg")
    if work_dir is None:
        raise ValueError("segmentation needs a work_dir for its resumable training state")
    if isinstance(data, (list, tuple)):
        if len(data) != 1:
            raise ConfigError(f"segmentation takes one data root, got {len(data)}")
        data = data[0]
    depth = transfer.resnet_depth(subject.info["arch"])
    train_set, test_set, dataset_info = _data(cfg, Path(data))
    num_classes = len(train_set.metainfo["classes"])
    model_cfg = mmseg_adapter.fcn(depth, num_classes, cfg.mode == "frozen", cfg.crop_size,
                                  cityscapes=cfg.task == "cityscapes-fcn")
    schedule = transfer.Schedule(iterations=cfg.iterations, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 policy="poly", min_lr=cfg.min_lr)
    per_class: dict[str, float] = {}

    def evaluate(model, ranks) -> dict[str, float]:
        metrics, classes = mmseg_adapter.evaluate(model, test_set, ranks, progress)
        per_class.update(classes)
        return metrics

    result = transfer.fine_tune_and_test(
        protocol=PROTOCOL_OF_TASK[cfg.task], subject=subject, cfg=dataclasses.asdict(cfg),
        settings=settings(cfg), reference=_reference_settings(cfg.task),
        reference_label=f"the {cfg.task} reference protocol", build_model=lambda: mmseg_adapter.build_model(model_cfg),
        model_cfg=model_cfg,
        place=mmseg_adapter.backbone_placement, owned=("backbone.",), train_set=train_set,
        collate=mmseg_adapter.collate, schedule=schedule, batch_size=cfg.batch_size, evaluate=evaluate,
        dataset_info=dataset_info, work_dir=Path(work_dir), device=str(resolve_device(cfg.device)), seed=cfg.seed,
        workers=cfg.workers, save_every=cfg.save_every, progress=progress, frozen=cfg.mode == "frozen",
        frozen_note="stem+res2..res5 frozen, BN in eval; decode and auxiliary heads train")
    result.details["per_class_iou"] = per_class
    return result


PROTOCOL_OF_TASK = {"voc-fcn": "seg_voc_fcn", "cityscapes-fcn": "seg_cityscapes_fcn"}
# Our FCN runs *are* mainline mmseg's protocol, so a fine-tuned VOC run also answers MMSelfSup's mIoU rows.
MM_REIMPLEMENTATIONS = {("seg_voc_fcn", "mIoU"): "seg_voc_fcn_mmseg"}


def measurements(result: ProtocolResult) -> list[Reading]:
    return transfer.dense_readings(result, ("mIoU",), MM_REIMPLEMENTATIONS)


_SEG_HELP = ("FCN-D8 (plain 7x7-stem ResNet, output stride 8, aux head on res4) fine-tuned from the checkpoint's "
             "backbone; mIoU as mmseg computes it. Settings that differ from the reference are warned about and "
             "recorded. Without --data: the synthetic scenes with the small preset. Needs the OpenMMLab stack "
             "(README 'Dense protocols'). The same command resumes an interrupted run.")
_COMMON = dict(config=SegmentationConfig, body=run, measurements=measurements, metrics=("mIoU",), needs="mmseg",
               resumable=True, torchrun=True)
SEG_VOC_FCN = Protocol(
    name="seg_voc_fcn", summary="FCN-D8 on VOC12 aug, 512x512, 20k iterations: mIoU (spec §4.4)",
    description="--data VOCdevkit/VOC2012 with SegmentationClass and SegmentationClassAug plus "
    "ImageSets/Segmentation/{train,aug,val}.txt (10,582 training images, checked). " + _SEG_HELP,
    produces=("seg_voc_fcn_frozen", "seg_voc_fcn_mmseg", "seg_voc_fcn_frozen_minus_finetune"),
    fixed={"task": "voc-fcn"}, configure=transfer.preset_configure(make_config, "voc-fcn"),
    default_data=transfer.synthetic_task_data("voc-fcn", several_roots=False),
    derived=lambda rows: transfer.frozen_gap_rows(rows, "seg_voc_fcn", "mIoU"), **_COMMON)
SEG_CITYSCAPES_FCN = Protocol(
    name="seg_cityscapes_fcn", summary="FCN-D8 on Cityscapes, 769x769, 40k iterations: mIoU (spec §4.4)",
    description="--data the folder with leftImg8bit/ and gtFine/ (*_gtFine_labelTrainIds.png); sliding-window "
    "test. " + _SEG_HELP,
    produces=("seg_cityscapes_fcn_frozen",), fixed={"task": "cityscapes-fcn"},
    configure=transfer.preset_configure(make_config, "cityscapes-fcn"),
    default_data=transfer.synthetic_task_data("cityscapes-fcn", several_roots=False), **_COMMON)
