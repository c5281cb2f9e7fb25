"""Checks of the detection/segmentation transfer datasets, and synthetic stand-ins for them.

Why: a dense-protocol run spends hours in mmdet/mmseg/detectron2 before a wrong data layout shows,
often as a silent drop (missing masks skipped, a colour-rendered mask read as class ids, an aug.txt
that overlaps train). The checkers here read only the files (numpy, PIL and stdlib, no pycocotools
or OpenMMLab) and fail at once with one line naming the path and the fix. The writers turn the
synthetic VOC set (`protocols.datasets.synthetic`) into COCO-2017 and Cityscapes layouts, so every
protocol runs end to end on a machine with no datasets. Formats: spec protocols.md §5, counts §4.4.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from baselines.infra import UserError, cache_root, link_or_copy
from protocols.datasets import voc
from protocols.datasets.voc import VOC_CLASSES

VOC12AUG_TRAIN_IMAGES = 10582  # 1,464 VOC12 train + 9,118 SBD-only (spec §4.4)
VOC12_VAL_IMAGES = 1449
VOC12_TRAIN_IMAGES = 1464
VOC12_AUG_ONLY_IMAGES = 9118

_MASK_FOLDERS = ("SegmentationClass", "SegmentationClassAug")
_MARKER = "dataset.json"

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

_COCO_CATEGORY = {  # VOC name -> (COCO 2017 id, COCO name, supercategory)
    "aeroplane": (5, "airplane", "vehicle"), "bicycle": (2, "bicycle", "vehicle"), "bird": (16, "bird", "animal"),
    "boat": (9, "boat", "vehicle"), "bottle": (44, "bottle", "kitchen"), "bus": (6, "bus", "vehicle"),
    "car": (3, "car", "vehicle"), "cat": (17, "cat", "animal"), "chair": (62, "chair", "furniture"),
    "cow": (21, "cow", "animal"), "diningtable": (67, "dining table", "furniture"), "dog": (18, "dog", "animal"),
    "horse": (19, "horse", "animal"), "motorbike": (4, "motorcycle", "vehicle"), "person": (1, "person", "person"),
    "pottedplant": (64, "potted plant", "furniture"), "sheep": (20, "sheep", "animal"),
    "sofa": (63, "couch", "furniture"), "train": (7, "train", "vehicle"), "tvmonitor": (72, "tv", "electronic"),
}
SYNTHETIC_COCO_CATEGORIES = [(_COCO_CATEGORY[name][0], _COCO_CATEGORY[name][1]) for name in VOC_CLASSES]

_CITYSCAPES_CITIES = ("synthA", "synthB")
_CITYSCAPES_CONVERTER = (
    "python -m cityscapesscripts.preparation.createTrainIdLabelImgs (CITYSCAPES_DATASET=<root>) "
    "or mmsegmentation's tools/dataset_converters/cityscapes.py <root>"
)


class DenseDataError(UserError, ValueError):
    """A dense-protocol dataset that would fail or silently mislead a run; one line naming the path and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def _missing(items: list[str], total: int) -> str:
    """'N of M missing, first X': enough to find the problem without flooding the log."""
    return f"{len(items):,} of {total:,} missing, first {items[0]}"


def _read_list(root: Path, task: str, split: str) -> list[str]:
    path = root / "ImageSets" / task / f"{split}.txt"
    if not path.is_file():
        raise DenseDataError(f"{path} not found: {root} is not a VOC root with a {task} split {split!r} "
                             "(expected VOCdevkit/VOC2007 or VOCdevkit/VOC2012)")
    return voc.read_image_set(root, split, task=task)


# ---- PASCAL VOC detection ---------------------------------------------------------------------


def check_voc_detection(roots: list[Path], split: str) -> dict:
    """Images, objects and difficult objects of `split` over the roots (VOC2007 and VOC2012 for 07+12)."""
    per_root: dict[str, dict[str, int]] = {}
    for root in map(Path, roots):
        ids = _read_list(root, "Main", split)
        if not ids:
            raise DenseDataError(f"{root / 'ImageSets' / 'Main' / f'{split}.txt'} is empty: re-extract the VOC tarball")
        for folder, suffix in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
            missing = [str(root / folder / f"{i}{suffix}") for i in ids
                       if not (root / folder / f"{i}{suffix}").is_file()]
            if missing:
                raise DenseDataError(
                    f"{root / folder} lacks files for ImageSets/Main/{split}.txt ({_missing(missing, len(ids))}): "
                    f"re-extract the VOC tarball so {folder}/ is complete"
                )
        objects = difficult = 0
        for image_id in ids:
            try:
                annotation = voc.parse_annotation(root, image_id)
            except voc.VOCFormatError as err:
                raise DenseDataError(f"{err}: re-extract the VOC tarball") from err
            objects += len(annotation.objects)
            difficult += sum(o.difficult for o in annotation.objects)
        per_root[str(root)] = {"images": len(ids), "objects": objects, "difficult": difficult}
    return {
        "images": sum(r["images"] for r in per_root.values()),
        "objects": sum(r["objects"] for r in per_root.values()),
        "difficult": sum(r["difficult"] for r in per_root.values()),
        "per_root": per_root,
    }


# ---- PASCAL VOC segmentation ------------------------------------------------------------------


def _count_hint(split: str, expected: int) -> str:
    if expected == VOC12AUG_TRAIN_IMAGES:
        return (
            f"{split} must be {VOC12AUG_TRAIN_IMAGES:,} = {VOC12_TRAIN_IMAGES:,} train + {VOC12_AUG_ONLY_IMAGES:,} aug "
            "(SBD train+val minus VOC train+val); newer mmseg converters write an aug.txt that overlaps train, "
            "so rebuild the list as train.txt plus the SBD-only ids"
        )
    if expected == VOC12_VAL_IMAGES:
        return (f"VOC2012 ImageSets/Segmentation/val.txt has {VOC12_VAL_IMAGES:,} ids; "
                "re-extract VOCtrainval_11-May-2012.tar")
    return f"expected {expected:,}"


def _check_mask_mode(path: Path) -> None:
    """Class-index masks must be 8-bit; an RGB mask holds palette colours, not class ids."""
    with Image.open(path) as mask:
        mode = mask.mode
    if mode in ("RGB", "RGBA"):
        raise DenseDataError(
            f"{path} is an {mode} colour-rendered mask: masks must hold class indices (8-bit 'P' or 'L'); "
            "use the original VOC SegmentationClass PNGs or SegmentationClassAug from the SBD converter"
        )
    if mode not in ("P", "L"):
        raise DenseDataError(f"{path} has PIL mode {mode!r}: masks must be 8-bit 'P' or 'L' PNGs "
                             "of class indices 0..20 and 255")


def check_voc_segmentation(root: Path, split: str, expected_images: int | None = None) -> dict:
    """Masks for every id of `ImageSets/Segmentation/<split>.txt`, from SegmentationClass then SegmentationClassAug."""
    root = Path(root)
    folders = [f for f in _MASK_FOLDERS if (root / f).is_dir()]
    if not folders:
        raise DenseDataError(
            f"{root} has no segmentation masks (SegmentationClass/ or SegmentationClassAug/): "
            "use VOC2012 with the SBD augmented masks, see README 'Dense protocols data'"
        )
    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = _read_list(root, "Segmentation", split)
    if expected_images is not None and len(ids) != expected_images:
        duplicated = len(ids) - len(set(ids))
        extra = f" ({duplicated:,} ids listed twice)" if duplicated else ""
        raise DenseDataError(f"{list_path} lists {len(ids):,} images{extra}, expected {expected_images:,}: "
                             f"{_count_hint(split, expected_images)}")
    masks_from = {f: 0 for f in _MASK_FOLDERS}
    first_mask: dict[str, Path] = {}
    missing: list[str] = []
    for image_id in ids:
        for folder in folders:
            path = root / folder / f"{image_id}.png"
            if path.is_file():
                masks_from[folder] += 1
                first_mask.setdefault(folder, path)
                break
        else:
            missing.append(image_id)
    if missing:
        where = " or ".join(f"{f}/" for f in folders)
        raise DenseDataError(
            f"{root} has no mask in {where} for ids of {list_path} ({_missing(missing, len(ids))}): "
            "add the SBD masks as SegmentationClassAug/ (README 'Dense protocols data') or use the matching split list"
        )
    missing_images = [str(root / "JPEGImages" / f"{i}.jpg") for i in ids
                      if not (root / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing_images:
        raise DenseDataError(f"{root / 'JPEGImages'} lacks images for {list_path} "
                             f"({_missing(missing_images, len(ids))}): re-extract the VOC2012 JPEGImages")
    for path in first_mask.values():
        _check_mask_mode(path)
    return {"images": len(ids), "masks_from": masks_from}


# ---- COCO -------------------------------------------------------------------------------------


def check_coco(root: Path, split: str) -> dict:
    """`annotations/instances_<split>.json` is consistent with itself and with the images in `<split>/`."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise DenseDataError(f"{path} not found: download annotations_trainval2017.zip and unzip it into {root}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DenseDataError(f"{path} is not valid JSON ({err}): download it again") from err
    if not isinstance(data, dict):
        raise DenseDataError(f"{path} holds a {type(data).__name__}, not a COCO object: download it again")
    absent = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if absent:
        raise DenseDataError(f"{path} has no {', '.join(absent)} list: "
                             "use an instances_*.json (not captions/keypoints/panoptic)")
    images, annotations, categories = data["images"], data["annotations"], data["categories"]
    image_ids = {im.get("id") for im in images}
    category_ids = {c.get("id") for c in categories}
    for key, listing, known, fix in (
        ("image_id", "images", image_ids, "the annotation file does not belong to these images; download it again"),
        ("category_id", "categories", category_ids,
         "annotations use categories the file does not declare; download it again"),
    ):
        unknown = [str(a.get(key)) for a in annotations if a.get(key) not in known]
        if unknown:
            raise DenseDataError(
                f"{path}: {len(unknown):,} of {len(annotations):,} annotations have an unknown {key} "
                f"(not in {listing}), "
                f"first unknown {key} {unknown[0]}: {fix}"
            )
    missing = [str(root / split / str(im.get("file_name"))) for im in images
               if not (root / split / str(im.get("file_name"))).is_file()]
    if missing:
        raise DenseDataError(f"{root / split} lacks images listed in {path} ({_missing(missing, len(images))}): "
                             f"unzip {split}.zip into {root}")
    return {
        "images": len(images),
        "annotations": len(annotations),
        "categories": len(categories),
        "category_ids": sorted(category_ids),
    }


# ---- Cityscapes -------------------------------------------------------------------------------


def check_cityscapes(root: Path, split: str) -> dict:
    """Every `leftImg8bit/<split>/<city>/*_leftImg8bit.png` has its `_gtFine_labelTrainIds.png`."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DenseDataError(f"{image_dir} not found: unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip "
                             f"into {root}")
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DenseDataError(f"{image_dir} has no <city>/*_leftImg8bit.png images: "
                             f"unzip leftImg8bit_trainvaltest.zip into {root}")
    missing: list[Path] = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not label.is_file():
            missing.append(label)
    if missing:
        first = missing[0]
        base = first.parent / first.name[: -len("_labelTrainIds.png")]
        where = (f"{root / 'gtFine' / split} lacks _gtFine_labelTrainIds.png files "
                 f"({_missing([str(p) for p in missing], len(images))})")
        if Path(f"{base}_labelIds.png").is_file() or Path(f"{base}_polygons.json").is_file():
            raise DenseDataError(f"{where} but has labelIds/polygons: "
                                 f"make the train-id labels with {_CITYSCAPES_CONVERTER}")
        raise DenseDataError(f"{where}: unzip gtFine_trainvaltest.zip into {root}, then run {_CITYSCAPES_CONVERTER}")
    return {"images": len(images), "cities": len({p.parent.name for p in images})}


# ---- synthetic COCO / Cityscapes copies of the synthetic VOC set ------------------------------


def _source_summary(voc_root: Path) -> dict:
    path = voc_root / "dataset.json"
    if not path.is_file():
        raise DenseDataError(f"{path} not found: {voc_root} is not a synthetic VOC set; "
                             "make one with protocols.datasets.synthetic.cached()")
    return json.loads(path.read_text())


def _build_cached(voc_root: Path, out: Path | None, suffix: str, write: Callable[[Path, Path], dict]) -> Path:
    """`write(voc_root, tmp)` into a temporary folder renamed to `out`; an existing complete `out` is returned as is."""
    voc_root = Path(voc_root)
    source = _source_summary(voc_root)
    out = Path(out) if out is not None else cache_root() / "synthetic" / f"{voc_root.name}{suffix}"

    def existing() -> Path | None:
        marker = out / _MARKER
        if not marker.is_file():
            return None
        if json.loads(marker.read_text()).get("source_dataset") != source:
            raise DenseDataError(f"{out} was made from a different synthetic VOC set than {voc_root}: "
                                 f"pass another out= or remove {out}")
        return out

    if (done := existing()) is not None:
        return done
    if out.exists():
        raise DenseDataError(f"{out} exists but has no {_MARKER} (an interrupted or foreign folder): "
                             "remove it or pass another out=")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = write(voc_root, tmp)
        summary.update(source=str(voc_root.resolve()), source_dataset=source)
        (tmp / _MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError:
            if (done := existing()) is None:  # not a concurrent writer that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return done
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major mask, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _coco_split(voc_root: Path, ids: list[str], images_dir: Path) -> dict:
    """COCO instances dict for `ids`, object k of the XML = value k of SegmentationObject/<id>.png."""
    images, annotations = [], []
    for image_id in ids:
        annotation = voc.parse_annotation(voc_root, image_id)
        with Image.open(voc_root / "SegmentationObject" / f"{image_id}.png") as png:
            instance = np.asarray(png)
        labelled = set(np.unique(instance).tolist()) - {0, 255}
        if labelled - set(range(1, len(annotation.objects) + 1)):
            raise DenseDataError(f"SegmentationObject/{image_id}.png of {voc_root} has instance ids {sorted(labelled)} "
                                 f"but the XML has {len(annotation.objects)} objects: regenerate the synthetic set")
        link_or_copy(voc_root / "JPEGImages" / f"{image_id}.jpg", images_dir / f"{image_id}.jpg")
        images.append({"id": int(image_id), "file_name": f"{image_id}.jpg", "height": annotation.height,
                       "width": annotation.width})
        for k, obj in enumerate(annotation.objects, start=1):
            mask = instance == k
            xmin, ymin, xmax, ymax = obj.bbox
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": int(image_id),
                "category_id": _COCO_CATEGORY[obj.name][0],
                "bbox": [float(xmin - 1), float(ymin - 1), float(xmax - xmin + 1), float(ymax - ymin + 1)],
                "area": float(mask.sum()),
                "iscrowd": 0,
                "segmentation": rle_encode(mask),
            })
    return {
        "info": {
            "description": f"SYNTHETIC data, not COCO: the densecl-bench synthetic VOC set {voc_root.name} "
                           "in the COCO 2017 layout",
            "version": "1.0",
            "contributor": "densecl-bench protocols.datasets.dense.synthetic_coco",
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": sup}
                       for cid, name, sup in (_COCO_CATEGORY[n] for n in VOC_CLASSES)],
    }


def _write_coco(voc_root: Path, tmp: Path) -> dict:
    (tmp / "annotations").mkdir()
    counts = {}
    for coco_split, voc_split in (("train2017", "trainval"), ("val2017", "test")):
        (tmp / coco_split).mkdir()
        data = _coco_split(voc_root, voc.read_image_set(voc_root, voc_split), tmp / coco_split)
        (tmp / "annotations" / f"instances_{coco_split}.json").write_text(json.dumps(data))
        counts[coco_split] = {"images": len(data["images"]), "annotations": len(data["annotations"])}
    return {"name": "synthetic-coco", "splits": counts}


def synthetic_coco(voc_root: Path, out: Path | None = None) -> Path:
    """A COCO-2017-layout copy of a synthetic VOC set (train2017 = trainval, val2017 = test), made once and cached."""
    return _build_cached(voc_root, out, "-coco", _write_coco)


def _trainid_lut() -> np.ndarray:
    """VOC class map value -> Cityscapes train id: 0 -> 0, c in 1..20 -> 1 + (c-1) % 18, anything else -> 255."""
    lut = np.full(256, 255, np.uint8)
    lut[0] = 0
    for c in range(1, len(VOC_CLASSES) + 1):
        lut[c] = 1 + (c - 1) % 18
    return lut


def _write_cityscapes(voc_root: Path, tmp: Path) -> dict:
    lut, counts = _trainid_lut(), {}
    for split, voc_split in (("train", "trainval"), ("val", "test")):
        ids = voc.read_image_set(voc_root, voc_split)
        for i, image_id in enumerate(ids):
            city = _CITYSCAPES_CITIES[i % len(_CITYSCAPES_CITIES)]
            stem = f"{city}_000000_{int(image_id):06d}"
            image_dir, label_dir = tmp / "leftImg8bit" / split / city, tmp / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as jpeg:
                jpeg.convert("RGB").save(image_dir / f"{stem}_leftImg8bit.png")
            with Image.open(voc_root / "SegmentationClass" / f"{image_id}.png") as png:
                labels = lut[np.asarray(png)]
            Image.fromarray(labels).save(label_dir / f"{stem}_gtFine_labelTrainIds.png")
        counts[split] = len(ids)
    return {"name": "synthetic-cityscapes", "classes": list(CITYSCAPES_CLASSES), "splits": counts}


def synthetic_cityscapes(voc_root: Path, out: Path | None = None) -> Path:
    """A Cityscapes-layout copy of a synthetic VOC set (train = trainval, val = test), made once and cached."""
    return _build_cached(voc_root, out, "-cityscapes", _write_cityscapes)


# Each dense task's split names in its synthetic copy: VOC Main / Segmentation lists, COCO and Cityscapes folders.
SYNTHETIC_SPLITS = {"voc-c4": ("trainval", "test"), "coco-fpn": ("train2017", "val2017"),
                    "voc-fcn": ("train", "val"), "cityscapes-fcn": ("train", "val")}


def synthetic_for_task(task: str, voc_root: Path) -> tuple[Path, dict[str, str]]:
    """The synthetic scenes of `voc_root` in the layout `task` reads, and its {"train_split", "test_split"}."""
    if task not in SYNTHETIC_SPLITS:
        raise ValueError(f"unknown dense task {task!r}; choose from {', '.join(SYNTHETIC_SPLITS)}")
    root = {"coco-fpn": synthetic_coco, "cityscapes-fcn": synthetic_cityscapes}.get(task, Path)(voc_root)
    train_split, test_split = SYNTHETIC_SPLITS[task]
    return root, {"train_split": train_split, "test_split": test_split}
