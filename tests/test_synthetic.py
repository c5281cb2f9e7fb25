import json

import numpy as np
import pytest
from PIL import Image

from protocols.datasets import synthetic
from protocols.datasets.voc import VOC_CLASSES, VOCFormatError, classification_labels, parse_annotation, read_image_set


def test_generator_is_deterministic_and_prefix_stable(tmp_path):
    a = synthetic.generate(tmp_path / "a", images=12, size=48, seed=3, progress=False)
    b = synthetic.generate(tmp_path / "b", images=12, size=48, seed=3, progress=False)
    assert synthetic.content_hash(a) == synthetic.content_hash(b)
    c = synthetic.generate(tmp_path / "c", images=16, size=48, seed=3, progress=False)
    for name in ("JPEGImages/000007.jpg", "Annotations/000012.xml", "SegmentationClass/000001.png"):
        assert (a / name).read_bytes() == (c / name).read_bytes()  # image i depends on (seed, i) only
    d = synthetic.generate(tmp_path / "d", images=12, size=48, seed=4, progress=False)
    assert (a / "JPEGImages/000001.jpg").read_bytes() != (d / "JPEGImages/000001.jpg").read_bytes()


def test_layout_parses_with_the_voc_reader(voc_root):
    summary = json.loads((voc_root / "dataset.json").read_text())
    trainval, test = read_image_set(voc_root, "trainval"), read_image_set(voc_root, "test")
    assert len(trainval) + len(test) == summary["images"] == 48 and not set(trainval) & set(test)
    assert sorted(read_image_set(voc_root, "train") + read_image_set(voc_root, "val")) == sorted(trainval)
    assert read_image_set(voc_root, "train", task="Segmentation") == read_image_set(voc_root, "train")
    n_objects = 0
    for image_id in trainval + test:
        ann = parse_annotation(voc_root, image_id)
        with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as img:
            assert img.size == (ann.width, ann.height) and img.mode == "RGB"
        for obj in ann.objects:
            assert obj.name in VOC_CLASSES
            x0, y0, x1, y1 = obj.bbox
            assert 1 <= x0 <= x1 <= ann.width and 1 <= y0 <= y1 <= ann.height
        n_objects += len(ann.objects)
    assert n_objects == summary["objects"]


def test_class_lists_agree_with_the_annotations(voc_root):
    ids, labels = classification_labels(voc_root, "test")
    assert ids == sorted(ids) and labels.shape == (len(ids), 20) and labels.dtype == np.int32
    for row, image_id in enumerate(ids):
        objects = parse_annotation(voc_root, image_id).objects
        for c, name in enumerate(VOC_CLASSES):
            flags = [o.difficult for o in objects if o.name == name]
            expected = 0 if not flags else (1 if not all(flags) else -1)
            assert labels[row, c] == expected


def test_scenes_have_several_objects_at_several_scales_with_occlusion_and_hard_cases(voc_root):
    per_image, areas, difficult, truncated = [], [], 0, 0
    for image_id in read_image_set(voc_root, "trainval") + read_image_set(voc_root, "test"):
        ann = parse_annotation(voc_root, image_id)
        per_image.append(len(ann.objects))
        for o in ann.objects:
            areas.append((o.bbox[2] - o.bbox[0] + 1) * (o.bbox[3] - o.bbox[1] + 1) / (ann.width * ann.height))
            difficult += o.difficult
            truncated += o.truncated
    assert np.mean(per_image) >= 2.0 and max(per_image) >= 4
    assert min(areas) < 0.02 and max(areas) > 0.3  # small and large objects
    assert difficult > 0 and truncated > 0
    assert len({c for c in VOC_CLASSES}) == 20


def test_segmentation_masks_are_palette_pngs_with_void_borders(voc_root):
    image_id = read_image_set(voc_root, "trainval")[0]
    ann = parse_annotation(voc_root, image_id)
    for folder in ("SegmentationClass", "SegmentationObject"):
        with Image.open(voc_root / folder / f"{image_id}.png") as png:
            assert png.mode == "P" and png.size == (ann.width, ann.height)
            assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
            mask = np.asarray(png)
        assert 255 in mask and 0 in mask
    classes = set(np.unique(np.asarray(Image.open(voc_root / "SegmentationClass" / f"{image_id}.png")))) - {0, 255}
    assert classes == {VOC_CLASSES.index(o.name) + 1 for o in ann.objects}


def test_bad_arguments_and_existing_output(tmp_path):
    with pytest.raises(ValueError, match="at least 2 images"):
        synthetic.generate(tmp_path / "x", images=1)
    with pytest.raises(ValueError, match="at least 32 pixels"):
        synthetic.generate(tmp_path / "x", images=4, size=8)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        synthetic.generate(tmp_path / "taken", images=4)


def test_voc_reader_names_missing_files(tmp_path):
    with pytest.raises(VOCFormatError, match="missing VOC Main list for split 'trainval'"):
        read_image_set(tmp_path, "trainval")


def test_cached_dataset_is_generated_once(private_cache):
    root = synthetic.cached(images=6, size=40, seed=9, progress=False)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert synthetic.cached(images=6, size=40, seed=9, progress=False) == root
    assert (root / "dataset.json").stat().st_mtime_ns == stamp and root.is_relative_to(private_cache)
