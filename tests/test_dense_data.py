"""Dense-protocol data: the checkers accept good layouts, reject bad ones in one line, and the synthetic
copies are exact."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from baselines.infra import cache_root
from protocols.datasets import dense, synthetic
from protocols.datasets.dense import DenseDataError
from protocols.datasets.voc import VOC_CLASSES, parse_annotation, read_image_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """One small synthetic VOC set and its COCO/Cityscapes copies, in a cache of this module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSECL_BENCH_CACHE", str(tmp_path_factory.mktemp("dense-cache")))
        voc = synthetic.cached(images=24, size=64, seed=0, progress=False)
        yield {"voc": voc, "coco": dense.synthetic_coco(voc), "cityscapes": dense.synthetic_cityscapes(voc)}


def copy_of(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    """A private copy to break, so the shared fixture stays intact."""
    return Path(shutil.copytree(src, tmp_path / (name or src.name)))


def error_of(fn: Callable[..., object], *args: object, match: str, **kwargs: object) -> str:
    """The DenseDataError message, checked to be one line matching `match`."""
    with pytest.raises(DenseDataError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of COCO uncompressed RLE: alternating runs of 0s and 1s over the column-major mask."""
    h, w = rle["size"]
    flat, pos = np.zeros(h * w, bool), 0
    for i, n in enumerate(rle["counts"]):
        flat[pos:pos + n] = i % 2 == 1
        pos += n
    assert pos == h * w
    return flat.reshape((h, w), order="F")


def test_dense_module_imports_without_frameworks():
    """The checks must run before (and without) the OpenMMLab / pycocotools / torch install."""
    code = (
        "import sys, protocols.datasets.dense; "
        "bad = [m for m in ('torch', 'pycocotools', 'mmdet', 'mmseg', 'mmcv', 'detectron2') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_voc_detection_counts_match_the_annotations(data, tmp_path):
    voc = data["voc"]
    summary = json.loads((voc / "dataset.json").read_text())
    trainval, test = dense.check_voc_detection([voc], "trainval"), dense.check_voc_detection([voc], "test")
    assert trainval["images"] == summary["split_sizes"]["trainval"] and test["images"] == summary["split_sizes"]["test"]
    assert trainval["objects"] + test["objects"] == summary["objects"]
    assert trainval["difficult"] + test["difficult"] == summary["difficult_objects"]
    voc12 = copy_of(voc, tmp_path, "VOC2012")
    both = dense.check_voc_detection([voc, voc12], "trainval")
    assert both["images"] == 2 * trainval["images"] and both["objects"] == 2 * trainval["objects"]
    assert both["per_root"][str(voc12)] == {k: trainval[k] for k in ("images", "objects", "difficult")}


def test_voc_detection_names_the_first_missing_file_and_the_count(data, tmp_path):
    voc = copy_of(data["voc"], tmp_path)
    ids = read_image_set(voc, "trainval")
    for image_id in ids[:2]:
        (voc / "JPEGImages" / f"{image_id}.jpg").unlink()
    message = error_of(dense.check_voc_detection, [voc], "trainval", match="JPEGImages lacks files")
    assert f"2 of {len(ids)} missing, first {voc / 'JPEGImages' / ids[0]}.jpg" in message
    error_of(dense.check_voc_detection, [voc], "nosuchsplit", match=r"nosuchsplit\.txt not found")


def test_voc_segmentation_reads_class_and_aug_masks(data, tmp_path):
    voc = data["voc"]
    ids = read_image_set(voc, "train", task="Segmentation")
    assert dense.check_voc_segmentation(voc, "train", expected_images=len(ids)) == {
        "images": len(ids), "masks_from": {"SegmentationClass": len(ids), "SegmentationClassAug": 0},
    }
    aug = copy_of(voc, tmp_path)
    (aug / "SegmentationClassAug").mkdir()
    for image_id in ids[:3]:  # SBD masks are single-channel "L" PNGs
        with Image.open(aug / "SegmentationClass" / f"{image_id}.png") as png:
            Image.fromarray(np.asarray(png)).save(aug / "SegmentationClassAug" / f"{image_id}.png")
        (aug / "SegmentationClass" / f"{image_id}.png").unlink()
    result = dense.check_voc_segmentation(aug, "train")
    assert result["masks_from"] == {"SegmentationClass": len(ids) - 3, "SegmentationClassAug": 3}


def test_voc_segmentation_errors(data, tmp_path):
    voc = copy_of(data["voc"], tmp_path)
    ids = read_image_set(voc, "train", task="Segmentation")
    message = error_of(dense.check_voc_segmentation, voc, "train", expected_images=dense.VOC12AUG_TRAIN_IMAGES,
                       match=f"lists {len(ids)} images, expected 10,582")
    assert "10,582 = 1,464 train + 9,118 aug" in message and "overlaps train" in message
    error_of(dense.check_voc_segmentation, voc, "val", expected_images=dense.VOC12_VAL_IMAGES, match="expected 1,449")

    rgb = voc / "SegmentationClass" / f"{ids[0]}.png"
    with Image.open(rgb) as png:
        png.convert("RGB").save(rgb)
    error_of(dense.check_voc_segmentation, voc, "train", match=f"{re.escape(str(rgb))} is an RGB colour-rendered mask")

    for image_id in ids[1:3]:
        (voc / "SegmentationClass" / f"{image_id}.png").unlink()
    error_of(dense.check_voc_segmentation, voc, "train", match=re.escape(f"(2 of {len(ids)} missing, first {ids[1]})"))

    shutil.rmtree(voc / "SegmentationClass")
    error_of(
        dense.check_voc_segmentation, voc, "train",
        match=re.escape(f"{voc} has no segmentation masks (SegmentationClass/ or SegmentationClassAug/): "
                        "use VOC2012 with the SBD augmented masks, see README 'Dense protocols data'"),
    )


def test_coco_copy_passes_the_checker_with_real_coco_category_ids(data):
    voc, coco = data["voc"], data["coco"]
    for coco_split, voc_split in (("train2017", "trainval"), ("val2017", "test")):
        result = dense.check_coco(coco, coco_split)
        ids = read_image_set(voc, voc_split)
        assert result["images"] == len(ids) and result["categories"] == 20
        assert result["annotations"] == sum(len(parse_annotation(voc, i).objects) for i in ids)
        assert result["category_ids"] == sorted(cid for cid, _ in dense.SYNTHETIC_COCO_CATEGORIES)
    ids = [cid for cid, _ in dense.SYNTHETIC_COCO_CATEGORIES]
    assert ids != list(range(1, 21)) and max(ids) == 72  # non-contiguous, as in COCO 2017
    names = dict((name, cid) for cid, name in dense.SYNTHETIC_COCO_CATEGORIES)
    assert names["airplane"] == 5 and names["dining table"] == 67 and names["tv"] == 72 and names["person"] == 1
    info = json.loads((coco / "annotations" / "instances_val2017.json").read_text())["info"]
    assert "SYNTHETIC" in info["description"]


def test_coco_rle_decodes_to_the_instance_masks(data):
    voc, coco = data["voc"], data["coco"]
    instances = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    category = {cid: name for cid, name in dense.SYNTHETIC_COCO_CATEGORIES}
    checked = 0
    for image in instances["images"][:4]:
        image_id = image["file_name"][:-4]
        assert image["id"] == int(image_id) and (coco / "train2017" / image["file_name"]).is_file()
        objects = parse_annotation(voc, image_id).objects
        with Image.open(voc / "SegmentationObject" / f"{image_id}.png") as png:
            instance = np.asarray(png)
        assert (image["height"], image["width"]) == instance.shape
        for k, (obj, ann) in enumerate(zip(objects, by_image[image["id"]], strict=True), start=1):
            mask = rle_decode(ann["segmentation"])
            assert np.array_equal(mask, instance == k) and ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert category[ann["category_id"]] == dense.SYNTHETIC_COCO_CATEGORIES[VOC_CLASSES.index(obj.name)][1]
            x, y, w, h = ann["bbox"]
            xmin, ymin, xmax, ymax = obj.bbox
            assert (x, y, w, h) == (xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1)
            if mask.any():  # the mask lies inside the box (object borders are void, so it may be smaller)
                rows, cols = np.nonzero(mask)
                assert x <= cols.min() and cols.max() < x + w and y <= rows.min() and rows.max() < y + h
            checked += 1
    assert checked >= 6


def test_coco_errors(data, tmp_path):
    coco = copy_of(data["coco"], tmp_path)
    path = coco / "annotations" / "instances_val2017.json"
    original = json.loads(path.read_text())

    def write(change: Callable[[dict], None]) -> None:
        broken = json.loads(json.dumps(original))
        change(broken)
        path.write_text(json.dumps(broken))

    n = len(original["annotations"])
    write(lambda d: [a.update(image_id=999999) for a in d["annotations"][:2]])
    error_of(dense.check_coco, coco, "val2017",
             match=rf"2 of {n} annotations have an unknown image_id \(not in images\), first unknown image_id 999999")
    write(lambda d: d["annotations"][-1].update(category_id=91))
    error_of(dense.check_coco, coco, "val2017",
             match=rf"1 of {n} annotations have an unknown category_id \(not in categories\), "
                   r"first unknown category_id 91")
    write(lambda d: d.pop("categories"))
    error_of(dense.check_coco, coco, "val2017", match="has no categories list")
    path.write_text(json.dumps(original))
    first = original["images"][0]["file_name"]
    (coco / "val2017" / first).unlink()
    error_of(dense.check_coco, coco, "val2017",
             match=re.escape(f"(1 of {len(original['images'])} missing, first {coco / 'val2017' / first})"))
    error_of(dense.check_coco, coco, "test2017", match="instances_test2017.json not found")


def test_cityscapes_copy_maps_voc_classes_to_train_ids(data):
    voc, cityscapes = data["voc"], data["cityscapes"]
    assert (len(dense.CITYSCAPES_CLASSES) == 19 and dense.CITYSCAPES_CLASSES[0] == "road"
            and dense.CITYSCAPES_CLASSES[-1] == "bicycle")
    for split, voc_split in (("train", "trainval"), ("val", "test")):
        ids = read_image_set(voc, voc_split)
        assert dense.check_cityscapes(cityscapes, split) == {"images": len(ids), "cities": 2}
        for image_path in sorted((cityscapes / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            city, seq, frame = image_path.name.split("_")[:3]
            assert city in ("synthA", "synthB") and seq == "000000" and f"{int(frame):06d}" in ids
            label_path = (cityscapes / "gtFine" / split / city
                          / image_path.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"))
            with (Image.open(label_path) as png, Image.open(voc / "SegmentationClass" / f"{frame}.png") as voc_png,
                  Image.open(image_path) as image):
                labels, classes = np.asarray(png), np.asarray(voc_png).astype(int)
                assert png.mode == "L" and image.size == voc_png.size
            assert set(np.unique(labels).tolist()) <= set(range(19)) | {255}
            expected = np.where(classes == 0, 0, np.where(classes == 255, 255, 1 + (classes - 1) % 18))
            assert np.array_equal(labels, expected)


def test_cityscapes_errors(data, tmp_path):
    cityscapes = copy_of(data["cityscapes"], tmp_path)
    labels = sorted((cityscapes / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png"))
    for path in labels:
        path.rename(path.with_name(path.name.replace("_labelTrainIds", "_labelIds")))
    message = error_of(dense.check_cityscapes, cityscapes, "val", match=f"{len(labels)} of {len(labels)} missing")
    assert "createTrainIdLabelImgs" in message and "tools/dataset_converters/cityscapes.py" in message
    error_of(dense.check_cityscapes, cityscapes, "test", match="leftImg8bit/test not found")


def test_synthetic_copies_are_cached_and_tied_to_their_source(data, tmp_path):
    voc = data["voc"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSECL_BENCH_CACHE", str(data["coco"].parents[1]))
        for make, out in ((dense.synthetic_coco, data["coco"]), (dense.synthetic_cityscapes, data["cityscapes"])):
            assert out == cache_root() / "synthetic" / f"{voc.name}-{out.name.rsplit('-', 1)[1]}"
            stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
            assert make(voc) == out
            assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
        impostor = synthetic.generate(tmp_path / voc.name, images=6, size=48, seed=1, progress=False)
        error_of(dense.synthetic_coco, impostor, match="was made from a different synthetic VOC set")
    (tmp_path / "half").mkdir()
    error_of(dense.synthetic_cityscapes, voc, tmp_path / "half", match="exists but has no dataset.json")
    error_of(dense.synthetic_coco, tmp_path, tmp_path / "x", match="is not a synthetic VOC set")
