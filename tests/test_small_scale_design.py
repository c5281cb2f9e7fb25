"""What the small-scale design rests on: the 7x7 grid, paired seeds, the dense probe, learning checks."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import subject_of, tiny_config

from baselines import config as configs
from baselines.backbone import create_backbone
from baselines.train import PretrainConfig, build_model
from protocols import dense_probe
from replication.pipelines import ReplicateVOCConfig, learning_summary


def test_output_stride_16_gives_the_paper_grid_with_the_same_tensors():
    dilated = create_backbone("resnet18", output_stride=16)
    assert dilated.reductions["feature5"] == 16
    maps = dilated(torch.zeros(1, 3, 112, 112))
    assert tuple(maps["feature5"].shape[-2:]) == (7, 7)  # DenseCL's S = 7 (spec pretraining.md §2.3)
    plain = create_backbone("resnet18")
    plain.load_state_dict(dilated.state_dict(), strict=True)  # the checkpoint evaluates as a standard ResNet
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        create_backbone("resnet18", output_stride=12)


def test_require_paper_grid_refuses_a_small_grid_in_one_line():
    cfg = PretrainConfig(method="densecl", image_size=64, data="x", out="y", require_paper_grid=True)
    with pytest.raises(configs.ConfigError, match=r"dense grid is 2x2 .* below the paper's 7x7") as err:
        cfg.validate()
    assert "\n" not in str(err.value)
    PretrainConfig(method="densecl", image_size=112, output_stride=16, data="x", out="y",
                   require_paper_grid=True).validate()


def test_one_seed_gives_both_methods_the_same_start_and_the_same_views(pretrain_images, tmp_path):
    """Paired seeds: the backbone and the global head start identical, and the data order and views match."""
    from baselines.augment import TwoViews, mocov2_augmentation
    from baselines.data import PretrainImages, PretrainSampler, find_images
    from baselines.infra import seed_everything

    models = {}
    for method in ("mocov2", "densecl"):
        seed_everything(3)
        models[method] = build_model(PretrainConfig(method=method, arch="resnet18", data="-", out="-")).state_dict()
    shared = [k for k in models["mocov2"] if k.startswith(("encoder_q.0.", "encoder_q.1.mlp."))]
    assert len(shared) > 100
    for key in shared:
        assert torch.equal(models["mocov2"][key], models["densecl"][key]), key
    files = find_images(pretrain_images)
    views = []
    for _ in range(2):  # what each method's run would see for the same seed
        sampler = PretrainSampler(len(files), 8, seed=3)
        sampler.set_epoch(0)
        dataset = PretrainImages(files, TwoViews(mocov2_augmentation(32)), seed=3)
        views.append([dataset[key][0] for key in list(sampler)[:8]])
    assert all(torch.equal(a, b) for a, b in zip(*views, strict=True))


def test_pipeline_needs_two_paired_seeds():
    with pytest.raises(configs.ConfigError, match="at least 2 paired seeds"):
        ReplicateVOCConfig(seeds=(0,)).validate()


@pytest.mark.parametrize("pipeline", ["voc", "dense"])
def test_both_pipelines_pretrain_for_the_epochs_asked(pipeline, tmp_path):
    """`replicate dense --epochs` must reach the pretraining it reuses or runs, as `replicate voc --epochs` does
    (designs D5/D6 in docs/small-scale-design.md): otherwise the dense claims would be judged on checkpoints
    labelled, or trained, with the preset's epochs."""
    from replication import cli
    from replication.pipelines import Job, pretraining_config

    args = cli.build_parser().parse_args(["replicate", pipeline, "--epochs", "20", "--pretrain-size", "64"])
    cfg = (cli.replicate_dense_config_from if pipeline == "dense" else cli.replicate_voc_config_from)(args)
    resolved = pretraining_config(Job("densecl", 3), cfg, str(tmp_path))
    assert (resolved.epochs, resolved.seed, resolved.method) == (20, 3, "densecl")
    default = pretraining_config(Job("densecl", 3), dataclasses.replace(cfg, epochs=0), str(tmp_path))
    assert default.epochs == configs.resolve(PretrainConfig, cfg.preset, {"data": "-", "out": "-"}).epochs != 20


def test_learning_summary_compares_with_chance(tmp_path):
    log = tmp_path / "log.jsonl"
    chance = math.log(193)
    log.write_text("\n".join(json.dumps({"step": i, "loss": chance, "loss_global": chance, "acc_global": 0.5})
                             for i in range(3)))
    stuck = learning_summary(log, 192)
    assert stuck["learned"] is False and stuck["chance_loss"] == pytest.approx(chance)
    log.write_text(json.dumps({"step": 9, "loss": 3.0, "loss_global": 3.0, "acc_global": 20.0}))
    assert learning_summary(log, 192)["learned"] is True
    assert learning_summary(tmp_path / "none.jsonl", 192) == {}


@pytest.fixture(scope="module")
def probe_voc(tmp_path_factory):
    from protocols.datasets import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("probe") / "VOC2007", images=40, size=64, seed=0,
                              progress=False)


def test_dense_probe_is_deterministic_and_reads_as_the_claims_name_it(probe_voc):
    torch.manual_seed(0)
    subject = subject_of(create_backbone("resnet18"))
    cfg = dense_probe.DenseProbeConfig(input_size=64, train_split="trainval", test_split="test", device="cpu",
                                       max_iter=30)
    first = dense_probe.run(subject, probe_voc, cfg, progress=False)
    again = dense_probe.run(subject, probe_voc, cfg, progress=False)
    assert first.metrics == again.metrics and set(first.metrics) == {"feature4/mIoU", "feature5/mIoU"}
    assert all(0 < v < 100 for v in first.metrics.values())
    assert first.details["layers"]["feature4"]["grid"] == 4 and first.details["layers"]["feature5"]["grid"] == 2
    readings = dense_probe.measurements(first)
    assert {(r.protocol_id, r.layer, r.metric) for r in readings} == {
        ("seg_voc_dense_probe", "feature4", "mIoU"), ("seg_voc_dense_probe", "feature5", "mIoU")}


def test_dense_probe_scores_like_mmseg():
    """IoU per class over the whole set, nan-mean over the classes that occur (spec §4.4)."""
    confusion = np.zeros((21, 21), dtype=np.int64)
    confusion[0, 0], confusion[0, 1], confusion[1, 1] = 8, 2, 2  # gt rows, predictions columns
    value, per_class = dense_probe.miou(confusion)
    assert per_class[0] == pytest.approx(80.0) and per_class[1] == pytest.approx(50.0)
    assert value == pytest.approx(65.0) and math.isnan(per_class[2])
    labels = dense_probe.cell_labels(np.array([[[1, 1, 0, 0], [1, 1, 0, 255], [0, 0, 255, 255], [0, 0, 255, 255]]]), 2)
    assert labels.tolist() == [[[1, 0], [0, 255]]]


def test_dense_probe_needs_masks(probe_voc, tmp_path):
    import shutil

    broken = tmp_path / "VOC2007"
    shutil.copytree(probe_voc, broken)
    first = (broken / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    (broken / "SegmentationClass" / f"{first}.png").unlink()
    cfg = dense_probe.DenseProbeConfig(input_size=64, train_split="trainval", test_split="test", device="cpu")
    with pytest.raises(FileNotFoundError, match=f"{first}.png not found: the dense probe needs a segmentation mask"):
        dense_probe.run(subject_of(create_backbone("resnet18")), broken, cfg, progress=False)


def test_tiny_pretraining_log_feeds_the_learning_summary(pretrain_images, tmp_path):
    from baselines.train import pretrain

    cfg = tiny_config(pretrain_images, tmp_path / "run", method="mocov2", epochs=1, progress=False)
    pretrain(cfg)
    summary = learning_summary(tmp_path / "run" / "log.jsonl", cfg.queue_size)
    assert set(summary) >= {"first_loss_global", "last_loss_global", "chance_loss", "learned"}


def test_dense_pipeline_detection_decays_its_lr_within_its_iterations():
    """replicate-dense runs C4 for 120 iterations; the `small` preset's LR steps (150, 185 of 200) must move with
    the run, or the LR never decays (as in batch 20261202T033948Z-1e60fe). Steps given explicitly stay as given."""
    from protocols.registry import get_protocol
    from protocols.transfer import Schedule
    from replication.pipelines import SMALL_DENSE_ITERATIONS

    protocol = get_protocol("det_voc_c4")
    iterations = SMALL_DENSE_ITERATIONS["det"]
    cfg = protocol.make_config({"iterations": iterations, "preset": "small"}, synthetic=True)
    assert cfg.steps == (90, 111)
    schedule = Schedule(iterations=cfg.iterations, lr=cfg.lr, weight_decay=cfg.weight_decay, steps=cfg.steps)
    assert schedule.lr_at(iterations - 1) == pytest.approx(cfg.lr * 0.01)
    assert protocol.make_config({"preset": "small"}, synthetic=True).steps == (150, 185)
    assert protocol.make_config({"iterations": 60, "steps": (50,), "preset": "small"}, synthetic=True).steps == (50,)
    assert protocol.make_config({"iterations": 12000}, synthetic=False).steps == (9000, 11000)
