"""Detection and segmentation transfer, run for real (mmdet/mmseg, resnet18, a few iterations) on the
synthetic scenes. Skipped where the OpenMMLab stack is not installed (`tox -e dense` installs it)."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

from baselines.distributed import TorchrunError
from baselines.infra import Interrupted
from protocols import transfer
from protocols.common import backbone_under_test
from protocols.datasets import dense

pytest.importorskip("mmcv.ops", reason="the OpenMMLab stack is not installed (tox -e dense)")
pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from protocols import detection, mmdet_adapter, mmseg_adapter, segmentation
from replication import cli

TINY_DET = dict(iterations=3, batch_size=2, warmup_iters=1, steps=(2,), train_short_sides=(64,), max_size=128,
                test_short_side=64, rois_per_image=8, test_proposals=20, save_every=1)
TINY_SEG = dict(iterations=3, batch_size=2, crop_size=48, scale=(128, 48), save_every=1)


@pytest.fixture(scope="module")
def checkpoint(random_bn_checkpoint) -> Path:
    return random_bn_checkpoint


@pytest.fixture(scope="module")
def subject(checkpoint):
    return backbone_under_test(checkpoint)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _saved_model(work_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(work_dir / "state.pt", map_location="cpu", weights_only=True)["model"]


def test_c4_places_res5_in_the_roi_head_and_loads_every_tensor(subject):
    model = mmdet_adapter.build_model(mmdet_adapter.faster_rcnn_c4(18, 20, False, 8, 20))
    source = subject.backbone.state_dict()
    report = transfer.transfer_backbone_weights(model, source, mmdet_adapter.backbone_placement("voc-c4"),
                                                mmdet_adapter.owned_prefixes("voc-c4"))
    state = model.state_dict()
    assert report["loaded_tensors"] == len(source)
    assert torch.equal(state["roi_head.shared_head.layer4.1.bn2.running_var"], source["layer4.1.bn2.running_var"])
    assert torch.equal(state["backbone.layer3.0.downsample.0.weight"], source["layer3.0.downsample.0.weight"])
    assert not any(k.startswith("backbone.layer4") for k in state)
    assert "roi_head.shared_head.norm.weight" in state  # the extra norm: new, not from the checkpoint


def test_weights_go_in_loudly(subject):
    model = mmdet_adapter.build_model(mmdet_adapter.mask_rcnn_fpn(18, 20, False, 8, 20))
    place, owned = mmdet_adapter.backbone_placement("coco-fpn"), mmdet_adapter.owned_prefixes("coco-fpn")
    source = subject.backbone.state_dict()
    missing = {k: v for k, v in source.items() if k != "layer2.0.bn1.weight"}
    with pytest.raises(transfer.WeightTransferError,
                       match=r"1 backbone key\(s\) of the model are not in the checkpoint"):
        transfer.transfer_backbone_weights(model, missing, place, owned)
    prefixed = {f"backbone.{k}": v for k, v in source.items()}
    with pytest.raises(transfer.WeightTransferError, match="no place in the model"):
        transfer.transfer_backbone_weights(model, prefixed, place, owned)
    resnet50 = mmdet_adapter.build_model(mmdet_adapter.mask_rcnn_fpn(50, 20, False, 8, 20))
    with pytest.raises(transfer.WeightTransferError, match="differ in shape"):
        transfer.transfer_backbone_weights(resnet50, source, place, owned)


def test_only_torchvision_style_resnets_are_taken():
    with pytest.raises(transfer.WeightTransferError, match="torchvision-style ResNet"):
        transfer.resnet_depth("efficientnet_b0")


def test_fcn_uses_the_plain_7x7_stem(subject):
    model = mmseg_adapter.build_model(mmseg_adapter.fcn(18, 21, False, 48, cityscapes=False))
    assert not model.backbone.deep_stem and model.backbone.conv1.kernel_size == (7, 7)
    dilations = {name: max(m.dilation[0] for m in getattr(model.backbone, name).modules()
                           if isinstance(m, torch.nn.Conv2d)) for name in ("layer2", "layer3", "layer4")}
    assert dilations == {"layer2": 1, "layer3": 2, "layer4": 4}  # output stride 8
    assert model.backbone.layer3[0].downsample[0].stride == (1, 1)


def test_voc_c4_finetune_runs_and_records_what_differs(subject, voc_root, tmp_path):
    cfg = detection.make_config("voc-c4", "small", **TINY_DET)
    with pytest.warns(transfer.ProtocolDeviation, match="total_batch: 2 here, 16 in the voc-c4 reference"):
        result = detection.run(subject, [voc_root], cfg, work_dir=tmp_path / "w", progress=False)
    assert set(result.metrics) == {"AP", "AP50", "AP75"}
    assert all(0.0 <= v <= 100.0 for v in result.metrics.values())
    assert result.protocol == "det_voc_c4"
    assert result.details["frozen"] == "nothing frozen" and result.details["parameters"]["frozen"] == []
    assert any(line.startswith("norm: 'BN (one device)'") for line in result.details["deviations"])
    assert result.details["weights"]["loaded_tensors"] == len(subject.backbone.state_dict())
    assert result.checkpoint["sha256"] == subject.info["sha256"]
    assert result.dataset["splits"]["trainval"] + result.dataset["splits"]["test"] == 48
    assert [it for it, _ in result.details["losses"]] == [0, 1, 2]
    json.dumps(result.to_dict())  # storable as is
    readings = {(r.protocol_id, r.metric) for r in detection.DET_VOC_C4.measurements(result)}
    assert readings == {("det_voc_c4", "AP"), ("det_voc_c4", "AP50"), ("det_voc_c4", "AP75"),
                        ("det_voc_c4_mmdet", "AP50")}  # our C4 run is MMSelfSup's mmdet protocol too


def test_voc_c4_frozen_keeps_the_body_and_trains_the_res5_head(subject, voc_root, tmp_path):
    cfg = detection.make_config("voc-c4", "small", mode="frozen", **TINY_DET)
    result = _quiet(detection.run, subject, [voc_root], cfg, work_dir=tmp_path / "w", progress=False)
    trained = _saved_model(tmp_path / "w")
    source = subject.backbone.state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.running_mean", "layer3.1.conv2.weight", "layer3.1.bn2.running_var"):
        assert torch.equal(trained[f"backbone.{key}"], source[key]), key
    assert not torch.equal(trained["roi_head.shared_head.layer4.0.conv1.weight"], source["layer4.0.conv1.weight"])
    assert "roi_head.shared_head" in result.details["parameters"]["trained"]
    assert "backbone.layer3" in result.details["parameters"]["frozen"]
    assert "res5 (C4 RoI head) and its extra norm train" in result.details["frozen"]
    assert {r.protocol_id for r in detection.DET_VOC_C4.measurements(result)} == {"det_voc_c4_frozen"}


def test_interrupted_training_resumes_exactly(subject, voc_root, tmp_path, monkeypatch):
    cfg = detection.make_config("voc-c4", "small", **dict(TINY_DET, iterations=4))
    uninterrupted = _quiet(detection.run, subject, [voc_root], cfg, work_dir=tmp_path / "straight", progress=False)
    straight = _saved_model(tmp_path / "straight")

    real_lr_at = transfer.Schedule.lr_at

    def stop_during_iteration_1(self, iteration):
        if iteration == 1:  # SIGTERM mid-iteration: the loop finishes it, saves and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(self, iteration)

    monkeypatch.setattr(transfer.Schedule, "lr_at", stop_during_iteration_1)
    with pytest.raises(Interrupted, match="interrupted after iteration 2"):
        _quiet(detection.run, subject, [voc_root], cfg, work_dir=tmp_path / "resumed", progress=False)
    monkeypatch.setattr(transfer.Schedule, "lr_at", real_lr_at)
    result = _quiet(detection.run, subject, [voc_root], cfg, work_dir=tmp_path / "resumed", progress=False)
    assert result.details["resumed_from_iteration"] == 2
    # the resumed run trained on the same (iteration, image) pairs: the checksum survives the saved state
    assert result.details["trained_samples_checksum"] == uninterrupted.details["trained_samples_checksum"] is not None
    resumed = _saved_model(tmp_path / "resumed")
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_coco_mask_rcnn_reports_box_and_mask_ap(subject, voc_root, tmp_path):
    coco = dense.synthetic_coco(voc_root, tmp_path / "coco")
    cfg = detection.make_config("coco-fpn", "small", train_split="train2017", test_split="val2017",
                                **dict(TINY_DET, iterations=2))
    result = _quiet(detection.run, subject, [coco], cfg, work_dir=tmp_path / "w", progress=False)
    assert {"bbox_AP", "bbox_AP50", "mask_AP", "mask_AP50"} <= set(result.metrics)
    assert result.dataset["categories"] == 20 and result.dataset["layout"] == "coco"


def test_voc_fcn_finetune_and_frozen(subject, voc_root, tmp_path):
    for mode in ("finetune", "frozen"):
        cfg = segmentation.make_config("voc-fcn", "small", mode=mode, **TINY_SEG)
        result = _quiet(segmentation.run, subject, voc_root, cfg, work_dir=tmp_path / mode, progress=False)
        assert set(result.metrics) == {"mIoU", "aAcc"} and 0.0 <= result.metrics["mIoU"] <= 100.0
        assert len(result.details["per_class_iou"]) == 21
        trained = _saved_model(tmp_path / mode)
        same = torch.equal(trained["backbone.layer4.1.conv2.weight"],
                           subject.backbone.state_dict()["layer4.1.conv2.weight"])
        assert same == (mode == "frozen")
        assert result.protocol == "seg_voc_fcn"


def test_reference_preset_checks_the_voc12aug_counts(subject, voc_root, tmp_path):
    cfg = segmentation.make_config("voc-fcn", "reference", aug_split="", **TINY_SEG)
    with pytest.raises(dense.DenseDataError, match="the reference protocol"):
        _quiet(segmentation.run, subject, voc_root, cfg, work_dir=tmp_path / "w", progress=False)


def test_cityscapes_fcn_runs_with_sliding_windows(subject, voc_root, tmp_path):
    city = dense.synthetic_cityscapes(voc_root, tmp_path / "cityscapes")
    cfg = segmentation.make_config("cityscapes-fcn", "small", **dict(TINY_SEG, iterations=2))
    result = _quiet(segmentation.run, subject, city, cfg, work_dir=tmp_path / "w", progress=False)
    assert len(result.details["per_class_iou"]) == 19
    assert result.details["model"]["test_cfg"]["mode"] == "slide"


def test_cli_segmentation_writes_a_result(checkpoint, voc_root, tmp_path, capsys):
    code = cli.main(["eval", "seg_voc_fcn", "--checkpoint", str(checkpoint), "--data", str(voc_root),
                     "--preset", "small", "--iterations", "2", "--batch-size", "2", "--crop-size", "48",
                     "--work-dir", str(tmp_path / "w"), "--results", str(tmp_path / "results"), "--workers", "0",
                     "--no-progress", "--train-split", "train", "--test-split", "val"])
    assert code == 0
    out = capsys.readouterr().out
    assert "mIoU" in out
    [path] = [line.removeprefix("result: ") for line in out.splitlines() if line.startswith("result: ")]
    stored = json.loads(Path(path).read_text())
    assert stored["protocol"] == "seg_voc_fcn" and stored["checkpoint"]["format"] and stored["scale"] == "small"


def test_cli_says_what_is_wrong_in_one_line(checkpoint, voc_root, tmp_path, capsys):
    no_masks = tmp_path / "VOC2007"
    no_masks.mkdir()
    for name in ("JPEGImages", "Annotations", "ImageSets"):
        (no_masks / name).symlink_to(voc_root / name)
    code = cli.main(["eval", "seg_voc_fcn", "--checkpoint", str(checkpoint), "--data", str(no_masks),
                     "--preset", "small", "--results", str(tmp_path / "results"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "has no segmentation masks" in err[-1] and err[-1].startswith("densecl-bench: error:")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 24 dense runs: ~2.5 min idle, ~5 min on 2 busy cores
def test_replicate_dense_stores_runs_judges_claims_and_resumes(voc_root, tmp_path_factory, bench_log):
    import yaml

    from replication.pipelines import ReplicateDenseConfig, replicate_dense
    from replication.results import ResultsStore

    tmp = tmp_path_factory.mktemp("dense-pipeline")
    preset = tmp / "tiny.yaml"
    preset.write_text(yaml.safe_dump(dict(arch="resnet18", image_size=32, epochs=1, batch_size=8, lr=0.03,
                                          queue_size=16, epoch_order="halves", workers=0, save_every=1, log_every=2)))
    cfg = ReplicateDenseConfig(preset=str(preset), pretrain_images=str(voc_root / "JPEGImages"), synthetic_images=24,
                               det_iterations=2, seg_iterations=2, workers=0, device="cpu",
                               runs=str(tmp / "runs"), pretrain_runs=str(tmp / "pretrain"),
                               results=str(tmp / "results"),
                               progress=False)
    outcome = replicate_dense(cfg)
    assert len(outcome["runs"]) == 24  # 2 methods x 3 seeds x 2 tasks x 2 modes
    verdicts = {line.split(",")[0]: line.split(",")[1]
                for line in (outcome["report"].parent / "verdicts.csv").read_text().splitlines()[1:]}
    for claim in ("dir.det_voc_c4.ap.densecl-vs-mocov2", "dir.seg_voc_fcn.miou.densecl-vs-mocov2",
                  "dir.det_voc_c4_frozen.ap.densecl-vs-mocov2", "dir.seg_voc_fcn_frozen.miou.densecl-vs-mocov2",
                  "dir.det_voc_c4_frozen_minus_finetune.ap.densecl-vs-mocov2"):
        assert verdicts[claim] in ("reproduced", "contradicted", "inconclusive"), claim
    assert verdicts["dir.det_coco_mask_fpn.bbox_ap.densecl-vs-mocov2"] == "not run"
    assert verdicts["readme.det_voc_c4.ap.densecl.in1k200"] == "not comparable (scale)"
    assert (outcome["report"].parent / "plots" / "dense.png").stat().st_size > 1000
    records = [r for r in ResultsStore(cfg.results, read_only=True).load_runs("replicate-dense")
               if r.protocol != "report"]
    assert {(r.config["task"], r.config["mode"]) for r in records} == {
        (t, m) for t in ("voc-c4", "voc-fcn") for m in ("finetune", "frozen")}
    bench_log.clear()
    again = replicate_dense(cfg)
    assert again["batch"] == outcome["batch"] and bench_log.text.count("already stored") == 24


def test_torchrun_launches_that_cannot_split_the_batch_are_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(TorchrunError, match="the total batch of 16 images does not split over 3 processes"):
        transfer._ranks("cpu", 16)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TorchrunError, match="cuda:1 under torchrun"):
        transfer._ranks("cuda:1", 16)
