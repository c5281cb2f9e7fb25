"""Single-label image classification splits, for k-NN and the linear probe.

Three layouts are read (spec protocols.md §5.4):
- torchvision `ImageFolder`: `<data>/<split>/<class>/*` (class index = sorted folder order);
- OpenSelfSup/MMSelfSup list files: `<data>/meta/<split>_labeled.txt` or `<data>/meta/<split>.txt`
  with `"<path> <label>"` lines, paths relative to `<data>/<split>/` (or `<data>/`);
- a PASCAL VOC root (the synthetic default): each image is labelled with the class covering the
  largest non-difficult box area, so a multi-label set doubles as a single-label one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from baselines.data import IMAGE_EXTENSIONS, load_rgb
from baselines.infra import UserError
from protocols.datasets import voc
from protocols.datasets.voc import VOC_CLASSES


class DatasetLayoutError(UserError, ValueError):
    """A data folder none of the readers understands, or a malformed list file."""


@dataclass(frozen=True)
class ClassificationSplit:
    name: str  # "train", "val", "trainval", "test", ...
    layout: str  # "image-folder", "list-file", "voc"
    root: str
    samples: tuple[tuple[str, int], ...]  # (absolute image path, class index)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, label) of every sample: cheap on ImageNet, changes with the data."""
        digest = hashlib.sha256(self.layout.encode())
        root = Path(self.root)
        for path, label in self.samples:
            p = Path(path)
            rel = os.path.relpath(p, root)
            digest.update(f"{rel}\0{p.stat().st_size}\0{label}\n".encode())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {"split": self.name, "layout": self.layout, "root": self.root, "images": len(self),
                "classes": len(self.classes)}


class LabeledImages(Dataset):
    """(image tensor, label, row index) for every sample of a split, in split order."""

    def __init__(self, samples: tuple[tuple[str, int], ...] | list[tuple[str, int]], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label, index


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def image_folder(root: str | os.PathLike, split: str) -> ClassificationSplit:
    folder = Path(root) / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetLayoutError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    samples = tuple(
        (str(path), index)
        for index, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if _is_image(path)
    )
    if not samples:
        raise DatasetLayoutError(f"no images under {folder}/<class>/")
    return ClassificationSplit(split, "image-folder", str(Path(root)), samples, tuple(classes))


def list_file(path: str | os.PathLike, image_root: str | os.PathLike, split: str,
              root: str | os.PathLike | None = None) -> ClassificationSplit:
    """`"<path> <label>"` lines; labels are integers 0..C-1 (class names are the label numbers)."""
    path, image_root = Path(path), Path(image_root)
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit() or int(fields[1]) < 0:
            raise DatasetLayoutError(f"{path}:{n}: expected '<path> <label>', got {line!r}")
        samples.append((str(image_root / fields[0]), int(fields[1])))
    if not samples:
        raise DatasetLayoutError(f"{path} lists no images")
    missing = next((p for p, _ in samples if not Path(p).is_file()), None)
    if missing:
        raise DatasetLayoutError(f"{path} lists {missing}, which does not exist")
    num_classes = max(label for _, label in samples) + 1
    return ClassificationSplit(split, "list-file", str(Path(root or image_root)), tuple(samples),
                               tuple(str(i) for i in range(num_classes)))


def voc_primary_label(root: str | os.PathLike, split: str) -> ClassificationSplit:
    """VOC images in sorted id order, each labelled by its largest-area non-difficult class."""
    root = Path(root)
    classes = tuple(sorted(VOC_CLASSES))
    samples = []
    for image_id in sorted(voc.read_image_set(root, split)):
        area: dict[str, int] = {}
        for obj in voc.parse_annotation(root, image_id).objects:
            if not obj.difficult:
                xmin, ymin, xmax, ymax = obj.bbox
                area[obj.name] = area.get(obj.name, 0) + (xmax - xmin + 1) * (ymax - ymin + 1)
        if area:
            best = max(sorted(area), key=area.__getitem__)
            samples.append((str(root / "JPEGImages" / f"{image_id}.jpg"), classes.index(best)))
    if not samples:
        raise DatasetLayoutError(f"no labelled images in VOC split {split!r} of {root}")
    return ClassificationSplit(split, "voc", str(root), tuple(samples), classes)


def load_split(data: str | os.PathLike, split: str) -> ClassificationSplit:
    """Whichever layout `data` has (see the module docstring)."""
    data = Path(data)
    if not data.is_dir():
        raise DatasetLayoutError(f"data folder {data} does not exist")
    if (data / "ImageSets" / "Main").is_dir():
        return voc_primary_label(data, split)
    for name in (f"{split}_labeled.txt", f"{split}.txt"):
        listed = data / "meta" / name
        if listed.is_file():
            image_root = data / split if (data / split).is_dir() else data
            return list_file(listed, image_root, split, root=data)
    if (data / split).is_dir():
        return image_folder(data, split)
    raise DatasetLayoutError(
        f"cannot find split {split!r} in {data}: expected {data}/{split}/<class>/*, "
        f"{data}/meta/{split}_labeled.txt, or a VOC root with ImageSets/Main"
    )


def default_splits(data: str | os.PathLike) -> tuple[str, str]:
    """(bank split, query split): ImageNet-style data has train/val, a VOC root trainval/test."""
    if (Path(data) / "ImageSets" / "Main").is_dir():
        return "trainval", "test"
    return "train", "val"


def dataset_info(data: str | os.PathLike, splits: Sequence[ClassificationSplit]) -> dict[str, Any]:
    return {
        "name": Path(data).name,
        "root": str(Path(data).resolve()),
        "layout": splits[0].layout,
        "classes": len(splits[0].classes),
        "splits": {s.name: len(s) for s in splits},
        "fingerprint": {s.name: s.fingerprint() for s in splits},
    }


def check_same_classes(train: ClassificationSplit, test: ClassificationSplit) -> None:
    if train.classes != test.classes:
        raise DatasetLayoutError(
            f"splits {train.name!r} and {test.name!r} have different class lists "
            f"({len(train.classes)} vs {len(test.classes)} classes): labels would not line up"
        )
