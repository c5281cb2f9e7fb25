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

from baselines.config import ConfigError, option
from protocols import transfer
from protocols.common import BackboneUnderTest, resolve_device, scale_milestones
from protocols.registry import Protocol, Reading
from protocols.result import ProtocolResult

TASKS = ("voc-c4", "coco-fpn")
MODES, PRESETS = transfer.MODES, transfer.PRESETS


@dataclass
class DetectionConfig(transfer.TransferSettings):
    task: str = option("voc-c4", "voc-c4 (Faster R-CNN C4, VOC) or coco-fpn (Mask R-CNN FPN, COCO)", choices=TASKS)
    iterations: int = option(24000, "training iterations (without --steps, the LR steps keep their fractions of it)")
    batch_size: int = option(16, "images per iteration over all devices (the reference: 2 per GPU x 8 GPUs)")
    lr: float = option(0.02, "base learning rate")
    weight_decay: float = option(1e-4, "weight decay")
    warmup_iters: int = option(100, "linear warm-up iterations")
    steps: tuple[int, ...] = option((18000, 22000), "LR steps (x0.1), in iterations")
    train_short_sides: tuple[int, ...] = option(tuple(range(480, 801, 32)), "multi-scale training short sides")
    max_size: int = option(1333, "longest image side")
    test_short_side: int = option(800, "test short side")
    rois_per_image: int = option(512, "RoI head samples per image")
    test_proposals: int = option(1000, "RPN proposals per test image (C4 runs res5 once per proposal)")
    difficult: str = option("ignore", "VOC 'difficult' boxes: ignore (mmdet) or train on them (detectron2)",
                            choices=("ignore", "train"))
    train_split: str = option("trainval", "VOC: ImageSets/Main list of every root; COCO: train2017")
    test_split: str = option("test", "VOC: of the first root (VOC2007); COCO: val2017")

    def validate(self) -> None:
        for name, value, allowed in (("task", self.task, TASKS), ("mode", self.mode, MODES),
                                     ("difficult", self.difficult, ("ignore", "train"))):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError("iterations and batch size must be positive")


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
    """The reference protocol of `task`, scaled down by the `small` preset, then `overrides` (None ignored).

    Iterations given without steps keep the preset's steps at the same fractions of the run (the small
    preset's 150 and 185 of 200 become 90 and 111 of 120): fixed steps past a shorter run's end would
    never decay the LR.
    """
    if overrides.get("iterations") is not None and overrides.get("steps") is None:
        preset_cfg = transfer.make_task_config(DetectionConfig, REFERENCE, SMALL, task, preset, {})
        overrides = dict(overrides, steps=scale_milestones(preset_cfg.steps, preset_cfg.iterations,
                                                           int(overrides["iterations"])))
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
                "layout": "pascal-voc",
                "splits": {cfg.train_split: counts["images"], cfg.test_split: test_counts["images"]},
                "objects": {cfg.train_split: counts["objects"], cfg.test_split: test_counts["objects"]},
                "difficult": {cfg.train_split: counts["difficult"], cfg.test_split: test_counts["difficult"]}}
        return train, test, info, None
    if len(roots) != 1:
        raise ConfigError(f"COCO takes one root (the folder holding annotations/ and {cfg.train_split}/), "
                          f"got {len(roots)}")
    root = roots[0]
    counts = {split: dense.check_coco(root, split) for split in (cfg.train_split, cfg.test_split)}
    train, test = mmdet_adapter.coco_datasets(root, cfg.train_split, cfg.test_split, tuple(cfg.train_short_sides),
                                              cfg.max_size, cfg.test_short_side)
    info = {"name": root.name, "roots": [str(root.resolve())], "layout": "coco",
            "splits": {s: c["images"] for s, c in counts.items()},
            "annotations": {s: c["annotations"] for s, c in counts.items()},
            "categories": counts[cfg.train_split]["categories"]}
    return train, test, info, root / "annotations" / f"instances_{cfg.test_split}.json"


def run(subject: BackboneUnderTest, data: list[str | Path] | str | Path, cfg: DetectionConfig, *,
        work_dir: str | Path | None, progress: bool = True) -> ProtocolResult:
    """Train the detector from `subject`'s weights in `work_dir` (resumable) and test it."""
    from protocols import mmdet_adapter

    cfg.validate()
    transfer.require_mm_stack("mmdet")
    if work_dir is None:
        raise ValueError("detection needs a work_dir for its resumable training state")
    depth = transfer.resnet_depth(subject.info["arch"])
    roots = [Path(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    train_set, test_set, dataset_info, annotation_file = _data(cfg, roots)
    num_classes = len(train_set.metainfo["classes"])
    build = mmdet_adapter.faster_rcnn_c4 if cfg.task == "voc-c4" else mmdet_adapter.mask_rcnn_fpn
    model_cfg = build(depth, num_classes, cfg.mode == "frozen", cfg.rois_per_image, cfg.test_proposals)
    schedule = transfer.Schedule(iterations=cfg.iterations, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 warmup_iters=cfg.warmup_iters, policy="step", steps=tuple(cfg.steps))
    return transfer.fine_tune_and_test(
        protocol=PROTOCOL_OF_TASK[cfg.task], subject=subject, cfg=dataclasses.asdict(cfg),
        settings=settings(cfg), reference=_reference_settings(cfg.task),
        reference_label=f"the {cfg.task} reference protocol", build_model=lambda: mmdet_adapter.build_model(model_cfg),
        model_cfg=model_cfg,
        place=mmdet_adapter.backbone_placement(cfg.task), owned=mmdet_adapter.owned_prefixes(cfg.task),
        train_set=train_set, collate=mmdet_adapter.collate, schedule=schedule, batch_size=cfg.batch_size,
        evaluate=lambda model, ranks: mmdet_adapter.evaluate(model, test_set, cfg.task, annotation_file, ranks,
                                                            progress),
        dataset_info=dataset_info, work_dir=Path(work_dir), device=str(resolve_device(cfg.device)), seed=cfg.seed,
        workers=cfg.workers, save_every=cfg.save_every, progress=progress, frozen=cfg.mode == "frozen",
        frozen_note=("stem+res2..res4 frozen, BN in eval; res5 (C4 RoI head) and its extra norm train"
                     if cfg.task == "voc-c4" else "stem+res2..res5 frozen, BN in eval; FPN and heads train"))



PROTOCOL_OF_TASK = {"voc-c4": "det_voc_c4", "coco-fpn": "det_coco_mask_fpn"}
METRICS = ("AP", "AP50", "AP75", "bbox_AP", "bbox_AP50", "bbox_AP75", "mask_AP", "mask_AP50", "mask_AP75")
# Our C4 runs *are* MMSelfSup's mmdet protocol, so a fine-tuned run also answers its AP50 rows.
MM_REIMPLEMENTATIONS = {("det_voc_c4", "AP50"): "det_voc_c4_mmdet"}


def measurements(result: ProtocolResult) -> list[Reading]:
    return transfer.dense_readings(result, METRICS, MM_REIMPLEMENTATIONS)


_DET_HELP = ("Fine-tune a detector from the checkpoint's backbone (every backbone key must load) and test it. "
             "Settings that differ from the reference (batch, LR, iterations, sizes, SyncBN) are warned about and "
             "recorded. Without --data: the synthetic scenes with the small preset. Needs the OpenMMLab stack "
             "(README 'Dense protocols'). The same command resumes an interrupted run.")
_COMMON = dict(config=DetectionConfig, body=run, measurements=measurements, needs="mmdet", resumable=True,
               torchrun=True)
DET_VOC_C4 = Protocol(
    name="det_voc_c4", summary="Faster R-CNN R50-C4 on VOC07+12, tested on VOC07 (spec §4.1-4.2)",
    description="Faster R-CNN C4 on VOC07(+12) trainval, res5 + extra norm as the RoI head, tested on VOC07 test: "
    "AP50 (11-point, MMSelfSup's number), AP over IoU .50:.95 and AP75 (the paper's detectron2 numbers). Pass "
    "--data VOCdevkit/VOC2007 VOCdevkit/VOC2012 for 07+12. " + _DET_HELP,
    metrics=("AP", "AP50", "AP75"),
    produces=("det_voc_c4_frozen", "det_voc_c4_mmdet", "det_voc_c4_frozen_minus_finetune"),
    fixed={"task": "voc-c4"}, configure=transfer.preset_configure(make_config, "voc-c4"),
    default_data=transfer.synthetic_task_data("voc-c4", several_roots=True),
    derived=lambda rows: transfer.frozen_gap_rows(rows, "det_voc_c4", "AP"), **_COMMON)
DET_COCO_MASK_FPN = Protocol(
    name="det_coco_mask_fpn", summary="Mask R-CNN R50-FPN 1x on COCO: box and mask AP (spec §4.3)",
    description="Mask R-CNN FPN 1x on COCO train2017, tested on val2017 (--data the folder with annotations/, "
    "train2017/, val2017/): box and mask AP from pycocotools. " + _DET_HELP,
    metrics=tuple(m for m in METRICS if m.startswith(("bbox", "mask"))), produces=("det_coco_mask_fpn_frozen",),
    fixed={"task": "coco-fpn"}, configure=transfer.preset_configure(make_config, "coco-fpn"),
    default_data=transfer.synthetic_task_data("coco-fpn", several_roots=True), **_COMMON)
