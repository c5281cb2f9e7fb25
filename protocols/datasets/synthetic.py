"""A deterministic generator of multi-object scenes, written in the real PASCAL VOC layout.

Why: every command and test needs data on a machine with no datasets and no internet, and the
data should make *dense* features matter. Each scene has a textured background, unlabelled
clutter and 2-5 objects of the 20 VOC classes at scales from a few percent to most of the image,
painted in depth order so that later objects occlude earlier ones. A class is a shape, a texture
and a hue, each jittered per instance, so recognising it takes local evidence, not one global
colour statistic.

Output (`generate(out, ...)`), the layout of `VOCdevkit/VOC2007`:
  JPEGImages/<id>.jpg, Annotations/<id>.xml (bndbox 1-based, truncated, difficult, occluded),
  ImageSets/Main/{train,val,trainval,test}.txt and <class>_<split>.txt (1 / -1 / 0 = difficult only),
  ImageSets/Segmentation/{train,val,trainval}.txt,
  SegmentationClass/<id>.png and SegmentationObject/<id>.png (palette PNGs, 255 on object borders),
  dataset.json (parameters and counts).
Image i depends only on (seed, i), so a larger dataset extends a smaller one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image
from tqdm import tqdm

from baselines.config import ConfigError
from baselines.infra import cache_root
from protocols.datasets.voc import VOC_CLASSES

GENERATOR_VERSION = 1

SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "star", "cross", "ring", "hexagon", "crescent", "arrow")
MIN_VISIBLE_PIXELS = 12


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (index 255, the void label, is cream)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-size shape in local coordinates (u, v in [-1, 1])."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "ellipse":
        return rho <= 1
    if shape == "rectangle":
        return (np.abs(u) <= 1) & (np.abs(v) <= 0.65)
    if shape == "triangle":
        return (v <= 0.8) & (v >= 2.0 * np.abs(u) - 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "star":
        return rho <= 0.55 + 0.45 * np.cos(5 * phi)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    if shape == "ring":
        return (rho <= 1) & (rho >= 0.55)
    if shape == "hexagon":
        return (np.abs(v) <= 0.866) & (np.abs(u) + 0.577 * np.abs(v) <= 1)
    if shape == "crescent":
        return (rho <= 1) & (np.hypot(u - 0.45, v) >= 0.7)
    if shape == "arrow":
        shaft = (np.abs(v) <= 0.25) & (u >= -1) & (u <= 0.2)
        head = (u >= 0.2) & (u <= 1) & (np.abs(v) <= (1 - u) * 1.2)
        return shaft | head
    raise ValueError(shape)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]) * 255


def _texture(kind: int, x: np.ndarray, y: np.ndarray, angle: float, period: float) -> np.ndarray:
    """A two-tone pattern in [0, 1]: 0 stripes, 1 checker, 2 dots."""
    xr = x * np.cos(angle) + y * np.sin(angle)
    yr = -x * np.sin(angle) + y * np.cos(angle)
    if kind == 0:
        return (np.sin(2 * np.pi * xr / period) > 0).astype(np.float32)
    if kind == 1:
        return ((np.floor(xr / period) + np.floor(yr / period)) % 2).astype(np.float32)
    cell_x, cell_y = (xr / period) % 1 - 0.5, (yr / period) % 1 - 0.5
    return (np.hypot(cell_x, cell_y) < 0.3).astype(np.float32)


@dataclass
class ClassLook:
    shape: str
    texture: int
    hue: float
    angle: float


def class_look(c: int) -> ClassLook:
    """Class c: one of 10 shapes, one of 3 textures (the pair is unique), its own hue and angle."""
    return ClassLook(shape=SHAPES[c % 10], texture=c % 3, hue=(c * 7 % 20) / 20.0, angle=(c * 37 % 180) * np.pi / 180)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))


def _background(rng: np.random.Generator, h: int, w: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    base = _hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.8))
    shade = _smooth_noise(rng, h, w, int(rng.integers(2, 5)))[..., None] - 0.5
    pattern = _texture(int(rng.integers(0, 3)), x, y, rng.uniform(0, np.pi), rng.uniform(4, 14))[..., None]
    contrast = rng.uniform(10, 40)
    return base + 90 * shade + contrast * (pattern - 0.5)


@dataclass
class SceneObject:
    cls: int
    bbox: tuple[int, int, int, int]  # 1-based inclusive xmin, ymin, xmax, ymax (VOC)
    truncated: int
    difficult: int
    occluded: int


def render_scene(
    seed: int, index: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[SceneObject], bool]:
    """(RGB image, class map, instance map, objects, in_trainval) for image `index`."""
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    short = int(round(size * rng.uniform(0.75, 1.0)))
    h, w = (short, size) if rng.random() < 0.7 else (size, short)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = _background(rng, h, w, y, x)
    instance = np.zeros((h, w), np.int32)
    classes, full_masks = [], []

    n_clutter, n_objects = int(rng.integers(0, 4)), int(rng.integers(2, 6))
    for k in range(n_clutter + n_objects):
        is_object = k >= n_clutter
        c = int(rng.integers(0, len(VOC_CLASSES)))
        look = class_look(c) if is_object else ClassLook(
            SHAPES[int(rng.integers(0, len(SHAPES)))], int(rng.integers(0, 3)), rng.random(), rng.uniform(0, np.pi)
        )
        radius = size * float(np.exp(rng.uniform(np.log(0.06), np.log(0.45))))
        if not is_object:
            radius *= 0.5
        cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
        aspect, rot = float(np.exp(rng.uniform(-0.35, 0.35))), rng.uniform(-0.5, 0.5)
        u = ((x - cx) * np.cos(rot) + (y - cy) * np.sin(rot)) / (radius * aspect)
        v = (-(x - cx) * np.sin(rot) + (y - cy) * np.cos(rot)) / (radius / aspect)
        mask = _shape_mask(look.shape, u, v)
        if not mask.any():
            continue
        hue = (look.hue + rng.normal(0, 0.02)) % 1.0
        saturation = rng.uniform(0.55, 0.95) if is_object else rng.uniform(0.0, 0.3)
        light, dark = (_hsv_to_rgb(hue, saturation, rng.uniform(0.7, 1.0)),
                       _hsv_to_rgb(hue, saturation, rng.uniform(0.25, 0.5)))
        period = max(2.5, radius * rng.uniform(0.25, 0.4))
        pattern = _texture(look.texture, x - cx, y - cy, look.angle + rot, period)[..., None]
        shading = 1 + 0.25 * np.clip(u[..., None], -1, 1)
        paint = (light * pattern + dark * (1 - pattern)) * shading
        image = np.where(mask[..., None], paint, image)
        if is_object:
            classes.append(c)
            full_masks.append(mask)
            instance[mask] = len(classes)
        else:
            instance[mask] = 0

    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    objects, class_map, kept_instance = [], np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    for i, (c, full) in enumerate(zip(classes, full_masks, strict=True), start=1):
        visible = instance == i
        n_visible = int(visible.sum())
        if n_visible < MIN_VISIBLE_PIXELS:
            continue
        rows, cols = np.nonzero(visible)
        truncated = int(full[0].any() or full[-1].any() or full[:, 0].any() or full[:, -1].any())
        visible_fraction = n_visible / max(1, int(full.sum()))
        difficult = int(n_visible < 0.004 * h * w or visible_fraction < 0.25)
        objects.append(SceneObject(c, (int(cols.min()) + 1, int(rows.min()) + 1,
                                       int(cols.max()) + 1, int(rows.max()) + 1),
                                   truncated, difficult, int(visible_fraction < 0.85)))
        class_map[visible] = c + 1
        kept_instance[visible] = len(objects)
    border = _borders(kept_instance)
    class_map[border] = 255
    kept_instance[border] = 255
    return image, class_map, kept_instance, objects, bool(rng.random() < 0.5)


def _borders(labels: np.ndarray) -> np.ndarray:
    """Pixels of an object next to a different label: VOC's 'void' outline, one pixel wide."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels > 0)


def annotation_xml(image_id: str, width: int, height: int, objects: list[SceneObject]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "densecl-bench synthetic VOC"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = VOC_CLASSES[obj.cls]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(obj.truncated)
        ET.SubElement(node, "occluded").text = str(obj.occluded)
        ET.SubElement(node, "difficult").text = str(obj.difficult)
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.bbox, strict=True):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8")


def _write_image(
    root: Path, palette: list[int], seed: int, index: int, size: int
) -> tuple[str, list[SceneObject], bool]:
    image_id = f"{index + 1:06d}"
    image, class_map, instance, objects, trainval = render_scene(seed, index, size)
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
    for folder, labels in (("SegmentationClass", class_map), ("SegmentationObject", instance)):
        png = Image.fromarray(labels, mode="P")
        png.putpalette(palette)
        png.save(root / folder / f"{image_id}.png")
    (root / "Annotations" / f"{image_id}.xml").write_bytes(
        annotation_xml(image_id, image.shape[1], image.shape[0], objects))
    return image_id, objects, trainval


def _write_lists(root: Path, records: list[tuple[str, list[SceneObject], bool]]) -> dict[str, list[str]]:
    trainval = [r for r in records if r[2]]
    test = [r for r in records if not r[2]]
    splits = {"trainval": trainval, "test": test, "train": trainval[0::2], "val": trainval[1::2]}
    main, seg = root / "ImageSets" / "Main", root / "ImageSets" / "Segmentation"
    for split, rows in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{r[0]}\n" for r in rows))
        for c, name in enumerate(VOC_CLASSES):
            lines = []
            for image_id, objects, _ in rows:
                flags = [o.difficult for o in objects if o.cls == c]
                label = -1 if not flags else (1 if 0 in flags else 0)
                lines.append(f"{image_id} {label:2d}\n")
            (main / f"{name}_{split}.txt").write_text("".join(lines))
        if split in ("train", "val", "trainval"):
            (seg / f"{split}.txt").write_text("".join(f"{r[0]}\n" for r in rows))
    return {split: [r[0] for r in rows] for split, rows in splits.items()}


def generate(out: str | os.PathLike, images: int = 512, size: int = 96, seed: int = 0, progress: bool = True) -> Path:
    """Write the dataset to `out` (which must not exist) via a temporary folder renamed at the end."""
    out = Path(out)
    if images < 2:
        raise ConfigError(f"need at least 2 images, got {images}")
    if size < 32:
        raise ConfigError(f"image size must be at least 32 pixels, got {size}")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for folder in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "ImageSets/Main",
                       "ImageSets/Segmentation"):
            (tmp / folder).mkdir(parents=True)
        palette = voc_palette()
        records = [
            _write_image(tmp, palette, seed, i, size)
            for i in tqdm(range(images), desc="synthetic VOC", unit="img", disable=not progress, mininterval=1.0)
        ]
        splits = _write_lists(tmp, records)
        summary = {
            "name": "synthetic-voc",
            "generator_version": GENERATOR_VERSION,
            "images": images,
            "size": size,
            "seed": seed,
            "classes": list(VOC_CLASSES),
            "split_sizes": {k: len(v) for k, v in splits.items()},
            "objects": sum(len(r[1]) for r in records),
            "difficult_objects": sum(o.difficult for r in records for o in r[1]),
        }
        (tmp / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError as err:
            if out.exists():  # a concurrent writer finished first
                raise FileExistsError(f"{out} already exists") from err
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached(images: int = 512, size: int = 96, seed: int = 0, progress: bool = True) -> Path:
    """The dataset for these parameters, generated on first use; safe with concurrent callers."""
    root = cache_root() / "synthetic" / f"voc-v{GENERATOR_VERSION}-n{images}-s{size}-seed{seed}"
    if not (root / "dataset.json").exists():
        try:
            generate(root, images, size, seed, progress)
        except FileExistsError:
            if not (root / "dataset.json").exists():  # another process won the race but left no summary
                raise
    return root


def content_hash(root: str | os.PathLike) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def is_synthetic_root(root: str | os.PathLike) -> bool:
    """True for a dataset our generator wrote (or a dense layout made from one): its `dataset.json` says so."""
    marker = Path(root) / "dataset.json"
    try:
        summary = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and (str(summary.get("name", "")).startswith("synthetic")
                                          or "source_dataset" in summary)
