"""Feature extraction as spec protocols.md §1.3, the on-disk cache, and VOC row alignment."""

import json
import shutil

import numpy as np
import pytest
import torch

from baselines.backbone import create_backbone
from protocols import features as F
from protocols.datasets import voc
from protocols.datasets.classification import LabeledImages


def test_svm_pool_dims_match_the_reference_for_resnet50():
    backbone = create_backbone("resnet50").eval()
    with torch.inference_mode():
        pooled = F.pool_features(backbone(torch.zeros(1, 3, 224, 224)), list(F.SVM_POOLS), "svm")
    assert {k: v.shape[1] for k, v in pooled.items()} == {
        "feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216, "feature5": 8192}


def test_stem_pool_counts_the_padding():
    pooled = F.svm_pool("feature1")(torch.ones(1, 1, 112, 112))
    assert pooled.shape[-2:] == (12, 12)
    assert pooled[0, 0, 0, 0].item() == pytest.approx(0.36)  # 6x6 real cells over a 10x10 window
    assert pooled[0, 0, 5, 5].item() == pytest.approx(1.0)


def test_svm_transform_squashes_without_cropping():
    from PIL import Image

    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (290, 0, 300, 100))  # a blue strip at the right edge survives a squash, not a crop
    x = F.svm_transform()(image)
    assert x.shape == (3, 224, 224)
    assert x[2, 112, -1] > x[0, 112, -1]


@pytest.fixture()
def tiny_set(voc_root):
    ids, labels = voc.classification_labels(voc_root, "trainval")
    ds = LabeledImages([(str(voc_root / "JPEGImages" / f"{i}.jpg"), 0) for i in ids], F.svm_transform())
    return ds, ids, labels


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, inner, fail_at=None):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner[i]


def test_cache_is_reused_and_an_interrupted_extraction_resumes(tiny_set, tmp_path, monkeypatch):
    ds, ids, labels = tiny_set
    backbone = create_backbone("resnet18").eval()
    args = dict(split="trainval", layers=["feature2", "feature5"], pooling="svm", key={"checkpoint": "x"},
                labels=labels, ids=ids, batch_size=4, workers=0, progress=False)
    full, folder = F.cached_features(backbone, ds, cache_dir=tmp_path / "a", **args)
    assert full["feature5"].shape == (len(ids), 512 * 4)
    assert np.array_equal(np.load(folder / "trainval_labels.npy"), labels)
    assert json.loads((folder / "trainval_ids.json").read_text()) == ids

    counting = CountingDataset(ds)
    again, _ = F.cached_features(backbone, counting, cache_dir=tmp_path / "a", **args)
    assert counting.calls == 0 and np.array_equal(again["feature5"], full["feature5"])

    monkeypatch.setattr(F, "FLUSH_SECONDS", 0.0)
    with pytest.raises(KeyboardInterrupt):
        F.cached_features(backbone, CountingDataset(ds, fail_at=10), cache_dir=tmp_path / "b", **args)
    resumed = CountingDataset(ds)
    out, _ = F.cached_features(backbone, resumed, cache_dir=tmp_path / "b", **args)
    assert resumed.calls == len(ids) - 8  # rows 0..7 (two batches of 4) were flushed before the interrupt
    for layer in args["layers"]:
        assert np.allclose(out[layer], full[layer], atol=1e-6)


def test_cache_refuses_other_ids(tiny_set, tmp_path):
    ds, ids, labels = tiny_set
    backbone = create_backbone("resnet18").eval()
    args = dict(split="trainval", layers=["feature5"], pooling="gap", key={"checkpoint": "x"}, labels=labels,
                batch_size=8, workers=0, progress=False, cache_dir=tmp_path)
    F.cached_features(backbone, ds, ids=ids, **args)
    with pytest.raises(RuntimeError, match="other image ids"):
        F.cached_features(backbone, ds, ids=list(reversed(ids)), **args)
    with pytest.raises(ValueError, match="unknown layers"):
        F.cached_features(backbone, ds, ids=ids, **{**args, "layers": ["res5"]})


def test_labels_align_by_id_when_the_lists_are_not_sorted(voc_root, tmp_path):
    shuffled = tmp_path / "VOC2007"
    shutil.copytree(voc_root, shuffled)
    rng = np.random.default_rng(0)
    for path in (shuffled / "ImageSets" / "Main").glob("*trainval.txt"):
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[i] for i in rng.permutation(len(lines))) + "\n")
    ids, labels = voc.classification_labels(voc_root, "trainval")
    ids2, labels2 = voc.classification_labels(shuffled, "trainval")
    assert ids2 == ids == sorted(ids)
    assert np.array_equal(labels, labels2)
    assert set(np.unique(labels)) <= {-1, 0, 1}
