"""Readers for the PASCAL VOC layout (`VOCdevkit/VOC2007` or the synthetic copy of it).

Image ids come from `ImageSets/<task>/<split>.txt`; per-class labels from
`ImageSets/Main/<class>_<split>.txt` (1 present, -1 absent, 0 only "difficult" instances);
boxes from `Annotations/<id>.xml`. Classification labels follow the reference's mapping
(spec protocols.md §1.2): 1 -> 1, -1 -> 0, 0 -> -1 (ignore), rows in sorted image-id order,
columns in sorted class-name order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from baselines.infra import UserError

# The 20 PASCAL VOC classes in the devkit's order; label columns use them sorted (spec §1.2).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_LABEL_MAP = {1: 1, -1: 0, 0: -1}


class VOCFormatError(UserError, ValueError):
    """A VOC folder with a missing or malformed file; the message names it."""


@dataclass(frozen=True)
class VOCObject:
    name: str
    bbox: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax, 1-based inclusive as in the XML
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class VOCAnnotation:
    image_id: str
    width: int
    height: int
    objects: tuple[VOCObject, ...]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise VOCFormatError(f"missing {what}: {path}")
    return path


def read_image_set(root: str | os.PathLike, split: str, task: str = "Main") -> list[str]:
    """Image ids of `ImageSets/<task>/<split>.txt`, in file order."""
    path = _require(Path(root) / "ImageSets" / task / f"{split}.txt", f"VOC {task} list for split {split!r}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def parse_annotation(root: str | os.PathLike, image_id: str) -> VOCAnnotation:
    path = _require(Path(root) / "Annotations" / f"{image_id}.xml", "VOC annotation")
    try:
        tree = ET.parse(path).getroot()
        size = tree.find("size")
        objects = tuple(
            VOCObject(
                name=obj.findtext("name").strip(),
                bbox=tuple(int(float(obj.find("bndbox").findtext(t))) for t in ("xmin", "ymin", "xmax", "ymax")),
                difficult=obj.findtext("difficult", "0").strip() == "1",
                truncated=obj.findtext("truncated", "0").strip() == "1",
            )
            for obj in tree.iter("object")
        )
        return VOCAnnotation(image_id, int(size.findtext("width")), int(size.findtext("height")), objects)
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise VOCFormatError(f"malformed VOC annotation {path}: {err}") from err


def classification_labels(root: str | os.PathLike, split: str) -> tuple[list[str], np.ndarray]:
    """(sorted image ids, N x 20 int32 labels with 1 present / 0 absent / -1 ignore)."""
    root = Path(root)
    ids = sorted(read_image_set(root, split))
    row = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.full((len(ids), len(VOC_CLASSES)), -2, dtype=np.int32)
    for c, name in enumerate(sorted(VOC_CLASSES)):
        path = _require(root / "ImageSets" / "Main" / f"{name}_{split}.txt", f"VOC class list for {name!r}")
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                image_id, value = line.split()
                labels[row[image_id], c] = _LABEL_MAP[int(value)]
            except (ValueError, KeyError) as err:
                raise VOCFormatError(f"{path}:{n}: unexpected line {line!r}") from err
    missing = np.argwhere(labels == -2)
    if len(missing):
        i, c = missing[0]
        raise VOCFormatError(f"image {ids[i]} has no entry in {sorted(VOC_CLASSES)[c]}_{split}.txt")
    return ids, labels
