"""Object detection transfer: fine-tune (or train heads on a frozen backbone) and report AP.

Two tasks (spec protocols.md §4.2, §4.3), both on mmdet 3.3.0 through `protocols.mmdet_adapter`:
- `voc-c4`: Faster R-CNN R50-C4 on VOC07+12 trainval, tested on VOC07 test. Reports AP50 with
  11-point VOC AP (MMSelfSup's number) and AP = mean over IoU .50:.95 plus AP75 (the paper's
  detectron2 numbers, §4.1).
- `coco-fpn`: Mask R-CNN R50-FPN 1x on COCO train2017, tested on val2017: box and mask AP (pycocotools).

`--mode frozen` (journal protocol, spec §4.6, definition unverified): backbone stages fixed and their
BN in eval mode; everything after trains. For C4 the res5 RoI head *trains* (the FAIR benchmark's
"freeze the entire body and tune res5 ROI head onwards"). The frozen and trained module lists are
written into every result.

The `reference` preset is the protocol as published; `small` scales iterations, sizes, batch and
RoIs down for CPU runs. Every difference from the reference is warned about and recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols import transfer
from protocols.common import BackboneUnderTest
from protocols.result import ProtocolResult

TASKS = ("voc-c4", "coco-fpn")
MODES, PRESETS = transfer.MODES, transfer.PRESETS


@dataclass
class DetectionConfig:
    task: str = "voc-c4"
    mode: str = "finetune"
    iterations: int = 24000
    batch_size: int = 16  # total images per iteration (the reference: 2 per GPU x 8 GPUs)
    lr: float = 0.02
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    steps: tuple[int, ...] = (18000, 22000)
    train_short_sides: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    test_short_side: int = 800
    rois_per_image: int = 512
    test_proposals: int = 1000  # RPN proposals per test image (C4 runs res5 once per proposal)
    difficult: str = "ignore"  # mmdet: difficult VOC boxes ignored in training; "train": detectron2 keeps them
    train_split: str = "trainval"  # VOC: ImageSets/Main list of every root; COCO: train2017
    test_split: str = "test"  # VOC: of the first root (VOC2007); COCO: val2017
    seed: int = 0
    save_every: int = 50
    workers: int = 0
    device: str = "cpu"
    preset: str = "reference"

    def validate(self) -> None:
        for name, value, allowed in (("task", self.task, TASKS), ("mode", self.mode, MODES),
                                     ("difficult", self.difficult, ("ignore", "train"))):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("iterations and batch size must be positive")


REFERENCE = {
    "voc-c4": DetectionConfig(),
    "coco-fpn": DetectionConfig(task="coco-fpn", iterations=90000, steps=(60000, 80000), warmup_iters=1000,
                                train_short_sides=tuple(range(640, 801, 32)), train_split="train2017",
                                test_split="val2017"),
}
# CPU scale (resnet18 on the 96-pixel synthetic scenes): about native resolution, LR scaled linearly
# with the batch (0.02 x 4/16), and few RoIs: C4 runs res5 once per RoI, which dominates its cost.
_SMALL_COMMON = dict(iterations=200, batch_size=4, lr=0.005, warmup_iters=20, steps=(150, 185),
                     train_short_sides=(96, 112, 128, 144, 160), max_size=400, test_short_side=128,
                     rois_per_image=16, test_proposals=50)
SMALL = {"voc-c4": dict(_SMALL_COMMON), "coco-fpn": dict(_SMALL_COMMON, rois_per_image=32)}


def make_config(task: str = "voc-c4", preset: str = "reference", **overrides: Any) -> DetectionConfig:
    """The reference protocol of `task`, scaled down by the `small` preset, then `overrides` (None ignored)."""
    return transfer.make_task_config(DetectionConfig, REFERENCE, SMALL, task, preset, overrides)


def settings(cfg: DetectionConfig) -> dict[str, Any]:
    return {"total_batch": cfg.batch_size, "lr": cfg.lr, "iterations": cfg.iterations, "steps": tuple(cfg.steps),
            "train_short_sides": tuple(cfg.train_short_sides), "max_size": cfg.max_size,
            "test_short_side": cfg.test_short_side, "rois_per_image": cfg.rois_per_image,
            "test_proposals": cfg.test_proposals,
            "norm": "BN (one device)", "difficult": cfg.difficult}


def _reference_settings(task: str) -> dict[str, Any]:
    reference = settings(REFERENCE[task])
    reference["norm"] = "SyncBN"
    if task == "coco-fpn":
        reference.pop("difficult")
    return reference


def _data(cfg: DetectionConfig, roots: list[Path]) -> tuple[Any, Any, dict[str, Any], Path | None]:
    from protocols import mmdet_adapter
    from protocols.datasets import dense

    if cfg.task == "voc-c4":
        counts = dense.check_voc_detection(roots, cfg.train_split)
        test_counts = dense.check_voc_detection(roots[:1], cfg.test_split)
        train, test = mmdet_adapter.voc_datasets(roots, cfg.train_split, roots[0], cfg.test_split,
                                                 tuple(cfg.train_short_sides), cfg.max_size, cfg.test_short_side,
                                                 cfg.difficult)
        info = {"name": "+".join(r.name for r in roots), "roots": [str(r.resolve()) for r in roots],
                "layout": "pascal-voc", "splits": {cfg.train_split: counts["images"], cfg.test_split: test_counts["images"]},
                "objects": {cfg.train_split: counts["objects"], cfg.test_split: test_counts["objects"]},
                "difficult": {cfg.train_split: counts["difficult"], cfg.test_split: test_counts["difficult"]}}
        return train, test, info, None
    if len(roots) != 1:
        raise ValueError(f"COCO takes one root (the folder holding annotations/ and {cfg.train_split}/), got {len(roots)}")
    root = roots[0]
    counts = {split: dense.check_coco(root, split) for split in (cfg.train_split, cfg.test_split)}
    train, test = mmdet_adapter.coco_datasets(root, cfg.train_split, cfg.test_split, tuple(cfg.train_short_sides),
                                              cfg.max_size, cfg.test_short_side)
    info = {"name": root.name, "roots": [str(root.resolve())], "layout": "coco",
            "splits": {s: c["images"] for s, c in counts.items()},
            "annotations": {s: c["annotations"] for s, c in counts.items()},
            "categories": counts[cfg.train_split]["categories"]}
    return train, test, info, root / "annotations" / f"instances_{cfg.test_split}.json"


def run(subject: BackboneUnderTest, data: list[str | Path] | str | Path, cfg: DetectionConfig,
        work_dir: str | Path, progress: bool = True) -> ProtocolResult:
    """Train the detector from `subject`'s weights in `work_dir` (resumable) and test it."""
    from protocols import mmdet_adapter

    cfg.validate()
    transfer.require_mm_stack("mmdet")
    depth = transfer.resnet_depth(subject.info["arch"])
    roots = [Path(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    train_set, test_set, dataset_info, annotation_file = _data(cfg, roots)
    num_classes = len(train_set.metainfo["classes"])
    build = mmdet_adapter.faster_rcnn_c4 if cfg.task == "voc-c4" else mmdet_adapter.mask_rcnn_fpn
    model_cfg = build(depth, num_classes, cfg.mode == "frozen", cfg.rois_per_image, cfg.test_proposals)
    schedule = transfer.Schedule(iterations=cfg.iterations, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 warmup_iters=cfg.warmup_iters, policy="step", steps=tuple(cfg.steps))
    return transfer.fine_tune_and_test(
        protocol=f"det_{cfg.task.replace('-', '_')}", subject=subject, cfg=dataclasses.asdict(cfg),
        settings=settings(cfg), reference=_reference_settings(cfg.task), reference_label=f"the {cfg.task} reference protocol",
        build_model=lambda: mmdet_adapter.build_model(model_cfg), model_cfg=model_cfg,
        place=mmdet_adapter.backbone_placement(cfg.task), owned=mmdet_adapter.owned_prefixes(cfg.task),
        train_set=train_set, collate=mmdet_adapter.collate, schedule=schedule, batch_size=cfg.batch_size,
        evaluate=lambda model: mmdet_adapter.evaluate(model, test_set, cfg.task, annotation_file, progress),
        dataset_info=dataset_info, work_dir=Path(work_dir), device=cfg.device, seed=cfg.seed, workers=cfg.workers,
        save_every=cfg.save_every, progress=progress, frozen=cfg.mode == "frozen",
        frozen_note=("stem+res2..res4 frozen, BN in eval; res5 (C4 RoI head) and its extra norm train"
                     if cfg.task == "voc-c4" else "stem+res2..res5 frozen, BN in eval; FPN and heads train"))

